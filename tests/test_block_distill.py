"""Blockwise local distillation of the per-layer block variants (importance
--block-distill-steps): the trained variants reproduce the parent blocks better than the
initialised ones (measured here with transformers' modules holding the stored weights), are
scored with their trained weights, are what prune --per-layer builds (bit-equal, logits equal
a transformers model with those modules), are refused for another parent, are the same at
DP=2 as at DP=1, and the bad inputs are refused in one line."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from conftest import cli_in_process, torch_threads
from test_per_layer import _loss_and_logp, _resized_attention, _resized_mlp, forced_scores
from tiny_models import _Removed
from tolerances import log_softmax_sum, transformer_logits

SEQ, SEED = 24, 5
BLOCK_SAMPLES, DISTILL_SAMPLES, BATCH = 4, 8, 2
SAMPLES = BLOCK_SAMPLES + DISTILL_SAMPLES
STEPS, LR = 20, 1e-3
KIND = "llama_wide_mlp"  # 4 K/V groups (2 and 1 trained), MLP 768 (512 and 256 trained)
OPTIONS = {"samples": SAMPLES, "seq_len": SEQ, "layer_samples": 1, "drop_blocks": [], "block_variants": True,
           "ffn_variants": 2, "block_samples": BLOCK_SAMPLES, "seed": SEED, "dtype": "float32",
           "block_distill_samples": DISTILL_SAMPLES, "block_distill_batch": BATCH, "block_distill_lr": LR}


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    """Importance of the tiny llama_wide_mlp with block variants, untrained and trained (one
    thread, as the data-parallel workers run)."""
    from nemo_minitron.importance.api import compute_importance

    root = tmp_path_factory.mktemp("block_distill")
    parent = tiny_checkpoint(KIND)
    with torch_threads(1):
        for name, steps in (("untrained", 0), ("trained", STEPS)):
            compute_importance(str(parent), ["builtin:calib"], str(root / name), progress=False,
                               block_distill_steps=steps, **OPTIONS)
    return {"parent": parent, "root": root, "untrained": root / "untrained", "trained": root / "trained"}


def _stored(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "block_variants.safetensors"))


def _block(stored, layer, kind, size):
    prefix = f"layers.{layer}.{kind}.{size}."
    return {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------- transformers' modules from the stored tensors
def _hf_mlp(hf, tensors):
    """transformers' MLP holding a variant's canonical tensors (fc1 = [gate; up])."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = copy.deepcopy(hf.config)
    fc1, fc2 = tensors["mlp.linear_fc1.weight"], tensors["mlp.linear_fc2.weight"]
    cfg.intermediate_size = fc2.shape[1]
    mlp = LlamaMLP(cfg)
    with torch.no_grad():
        gate, up = fc1.chunk(2)
        mlp.gate_proj.weight.copy_(gate), mlp.up_proj.weight.copy_(up), mlp.down_proj.weight.copy_(fc2)
    return mlp


def _hf_attention(hf, layer, tensors, groups):
    """transformers' attention of ``groups`` K/V groups holding a variant's canonical tensors
    (qkv rows per group: its query heads, then k, then v)."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    cfg = copy.deepcopy(hf.config)
    H, d = cfg.num_attention_heads, cfg.head_dim
    cfg.num_key_value_heads = groups
    attention = LlamaAttention(cfg, layer)
    qkv = tensors["self_attention.linear_qkv.weight"].view(groups, H // groups + 2, d, -1)
    with torch.no_grad():
        attention.q_proj.weight.copy_(qkv[:, :-2].reshape(H * d, -1))
        attention.k_proj.weight.copy_(qkv[:, -2].reshape(groups * d, -1))
        attention.v_proj.weight.copy_(qkv[:, -1].reshape(groups * d, -1))
        attention.o_proj.weight.copy_(tensors["self_attention.linear_proj.weight"])
    return attention


def _samples(checkpoint, start, stop):
    from nemo_minitron.checkpoint.store import load_tokenizer, read_info
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.importance.api import calibration_samples

    desc = read_info(checkpoint).description
    corpus = check_corpus(["builtin:calib"], vocab_size=desc.vocab_size)
    return calibration_samples(corpus, load_tokenizer(checkpoint), seq_len=SEQ, samples=SAMPLES, seed=SEED)[start:stop]


def _hf(tiny_hf):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_hf(KIND), dtype=torch.float32).eval()


def _block_calls(hf, tokens):
    """Per layer and block: the parent's (args, kwargs, output) of each block's call."""
    calls = {}
    handles = []
    for i, layer in enumerate(hf.model.layers):
        for kind, module in (("attention", layer.self_attn), ("ffn", layer.mlp)):
            def hook(mod, args, kwargs, out, key=(i, kind)):
                calls[key] = (args, kwargs, out[0] if isinstance(out, tuple) else out)
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        hf(tokens, use_cache=False)
    for h in handles:
        h.remove()
    return calls


def _error(module, call):
    args, kwargs, target = call
    with torch.no_grad():
        out = module(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return ((out - target).square().sum() / target.square().sum()).item()


# ---------------------------------------------------------------------- training
def test_local_training_lowers_each_variants_block_error(runs, tiny_hf):
    """On the samples local distillation trained on, each trained variant's block (transformers'
    module with the stored weights, fed the parent's block input) is closer to the parent
    block's output than the variant initialised from the parent; the recorded errors are these."""
    from nemo_minitron.importance.scores import ImportanceScores

    scores = ImportanceScores.load(runs["trained"])
    record = scores.summary["block_variants"]["distill"]
    assert {k: record[k] for k in ("steps", "lr", "samples", "batch")} == \
        {"steps": STEPS, "lr": LR, "samples": DISTILL_SAMPLES, "batch": BATCH}
    stored = _stored(runs["trained"])
    hf = _hf(tiny_hf)
    calls = _block_calls(hf, _samples(runs["parent"], BLOCK_SAMPLES, SAMPLES)[:, :-1])
    variants = scores.summary["block_variants"]
    trained = 0
    for layer in range(4):
        for kind, options in (("attention", variants["query_groups"]), ("ffn", variants["ffn"])):
            for j, size in enumerate(options[1:-1], start=1):
                tensors = _block(stored, layer, kind, size)
                if kind == "ffn":
                    neurons = torch.argsort(scores["ffn"][layer], descending=True, stable=True)[:size].sort().values
                    before = _error(_resized_mlp(hf, layer, neurons), calls[layer, kind])
                    after = _error(_hf_mlp(hf, tensors), calls[layer, kind])
                else:
                    before = _error(_resized_attention(hf, layer, scores["query_groups"][layer], size),
                                    calls[layer, kind])
                    after = _error(_hf_attention(hf, layer, tensors, size), calls[layer, kind])
                assert after < before, (layer, kind, size, before, after)
                for when, value in (("before", before), ("after", after)):
                    assert record["nmse"][kind][when][layer][j] == pytest.approx(value, rel=1e-3), (layer, kind, when)
                trained += 1
    assert trained == 16 and len({k.rsplit(".", 1)[0] for k in stored}) == 16 * 2  # two linears per variant


def test_trained_variants_are_scored_with_their_weights(runs, tiny_hf):
    """Each trained variant's score equals transformers' model with that block swapped for the
    trained module; the parent's and the removed blocks score exactly as without training."""
    from nemo_minitron.importance.scores import BLOCK_AXES, ImportanceScores

    trained, untrained = ImportanceScores.load(runs["trained"]), ImportanceScores.load(runs["untrained"])
    assert "distill" not in untrained.summary["block_variants"]
    assert not (runs["untrained"] / "block_variants.safetensors").exists()
    for axis in BLOCK_AXES:
        for column in (0, -1):
            assert torch.equal(trained[axis][:, column], untrained[axis][:, column]), axis
        assert not torch.equal(trained[axis][:, 1:-1], untrained[axis][:, 1:-1]), axis
    stored = _stored(runs["trained"])
    hf = _hf(tiny_hf)
    samples = _samples(runs["parent"], 0, BLOCK_SAMPLES)
    parent_loss, parent_logp, logits = _loss_and_logp(hf, samples, 1000)
    tol = 2 * (transformer_logits(768 * 4, 4, logits) + log_softmax_sum(1000, logits.abs().max().item()))
    variants = trained.summary["block_variants"]
    for layer in range(4):
        for kind, options in (("attention", variants["query_groups"]), ("ffn", variants["ffn"])):
            for j, size in enumerate(options[1:-1], start=1):
                model = copy.deepcopy(hf)
                tensors = _block(stored, layer, kind, size)
                if kind == "ffn":
                    model.model.layers[layer].mlp = _hf_mlp(hf, tensors)
                else:
                    model.model.layers[layer].self_attn = _hf_attention(hf, layer, tensors, size)
                loss, logp, _ = _loss_and_logp(model, samples, 1000)
                kl = (parent_logp.exp() * (parent_logp - logp)).sum(-1).mean().item()
                assert trained[f"block_{kind}_loss"][layer, j].item() == pytest.approx(loss - parent_loss, abs=tol)
                assert trained[f"block_{kind}_kl"][layer, j].item() == pytest.approx(kl, abs=tol), (layer, kind)


# ---------------------------------------------------------------------- prune --per-layer
#: (groups, width) per layer: every trained variant once, with the parent's and removed blocks
FORCED = ((2, 512), (0, 256), (1, 768), (4, 0))


@pytest.fixture(scope="module")
def pruned(runs):
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.prune.api import prune

    importance = forced_scores(runs["trained"], runs["root"] / "forced", FORCED)
    size = read_info(runs["parent"]).description.num_parameters()
    out = prune(str(runs["parent"]), str(importance), str(runs["root"] / "pruned"), per_layer=True,
                target_params=str(size))
    return {**runs, "importance": importance, "pruned": out, "size": size}


def test_pruned_model_holds_the_trained_variants(pruned, tiny_hf):
    """The chosen trained variants' tensors are the stored ones, bit for bit (the other kept
    blocks the parent's), and the pruned model's logits equal transformers' parent with those
    layers' modules swapped for the trained ones (removed ones for removed blocks)."""
    from nemo_minitron.checkpoint.store import load_checkpoint, read_info
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.model.params import named_weights

    info = read_info(pruned["pruned"])
    assert tuple((s.num_query_groups, s.ffn_hidden_size) for s in info.description.layer_shapes) == FORCED
    assert info.provenance["per_layer"]["trained_variants"]["steps"] == STEPS
    model, _ = load_checkpoint(str(pruned["pruned"]), dtype=torch.float32)
    weights = {n: p.detach() for n, p in named_weights(model)}
    parent_model, _ = load_checkpoint(str(pruned["parent"]), dtype=torch.float32)
    parent = {n: p.detach() for n, p in named_weights(parent_model)}
    stored = _stored(pruned["importance"])
    hf = _hf(tiny_hf)
    reference = copy.deepcopy(hf)
    for layer, (groups, width) in enumerate(FORCED):
        block = reference.model.layers[layer]
        for kind, size, parent_size in (("attention", groups, 4), ("ffn", width, 768)):
            tensors = _block(stored, layer, kind, size)
            if size in (0, parent_size):
                assert not tensors
                if size == 0:
                    setattr(block, "self_attn" if kind == "attention" else "mlp", _Removed(kind == "attention"))
                continue
            for suffix, tensor in tensors.items():
                assert torch.equal(weights[f"decoder.layers.{layer}.{suffix}"], tensor), (layer, suffix)
            if kind == "ffn":
                block.mlp = _hf_mlp(hf, tensors)
            else:
                block.self_attn = _hf_attention(hf, layer, tensors, size)
        if groups == 4:  # an untrained block keeps the parent's weights
            name = f"decoder.layers.{layer}.self_attention.linear_qkv.weight"
            assert torch.equal(weights[name], parent[name])
    tokens = torch.randint(0, 1000, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(tokens).logits[..., :1000]
    got = full_logits(model, tokens, 1000)
    assert (got - expected).abs().max().item() <= transformer_logits(768, 4, expected)
    with torch.no_grad():  # the trained weights matter: the parent's variants give other logits
        assert (full_logits(parent_model, tokens, 1000) - expected).abs().max().item() > 1e-3


def test_prune_refuses_trained_variants_of_another_parent(pruned, tmp_path, capsys):
    """The same shape with one weight of a layer whose trained variant is chosen changed: one
    line, exit 2, nothing written; a missing trained file likewise. Loading the true parent in
    bf16 still matches (the digests cover the 16-bit casts)."""
    from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer, save_checkpoint
    from nemo_minitron.model.params import named_weights

    model, info = load_checkpoint(str(pruned["parent"]), dtype=torch.float32)
    with torch.no_grad():
        dict(named_weights(model))["decoder.layers.2.mlp.linear_fc2.weight"][0, 0] += 1e-3
    other = save_checkpoint(model, info, tmp_path / "other", tokenizer=load_tokenizer(str(pruned["parent"])))
    args = ("--importance", pruned["importance"], "--per-layer", "--target-params", str(pruned["size"]))
    code, err = cli_in_process(capsys, "prune", other, "--out", tmp_path / "p", *args)
    assert code == 2 and "trained block variants were trained from other weights" in err and "layer 2" in err \
        and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p").exists()
    missing = tmp_path / "missing"
    shutil.copytree(pruned["importance"], missing)
    (missing / "block_variants.safetensors").unlink()
    code, err = cli_in_process(capsys, "prune", pruned["parent"], "--out", tmp_path / "p", "--importance", missing,
                               *args[2:])
    assert code == 2 and "block_variants.safetensors is missing" in err and len(err.strip().splitlines()) == 1, err
    code, err = cli_in_process(capsys, "prune", pruned["parent"], "--out", tmp_path / "bf16", *args, "--dtype",
                               "bfloat16")
    assert code == 0, err


# ---------------------------------------------------------------------- data parallel, bad input
@pytest.mark.multirank
def test_trained_variants_at_dp2_equal_one_rank(runs, tmp_path):
    """Two data-parallel ranks train alternate layers and share them: the trained weights and
    their recorded errors are one rank's, bit for bit."""
    from conftest import run_workers

    spec = {"out": str(tmp_path / "out"), "layouts": {"dp2": [1, 1]}, "models": {KIND: str(runs["parent"])},
            "options": {**OPTIONS, "block_distill_steps": STEPS}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_workers("importance_layouts.py", tmp_path / "spec.json", out=tmp_path / "out")
    two, one = tmp_path / "out" / f"dp2-{KIND}", runs["trained"]
    got, want = _stored(two), _stored(one)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    record = {d: json.loads((d / "summary.json").read_text())["block_variants"]["distill"] for d in (one, two)}
    assert record[one]["nmse"] == record[two]["nmse"] and record[one]["parent_digests"] == record[two]["parent_digests"]


@pytest.mark.parametrize("args, says", [
    (("--block-distill-steps", "5"), "--block-distill-steps trains the block variants of --block-variants; give both"),
    (("--block-variants", "--block-distill-steps", "5", "--samples", "20"),
     "--block-distill-samples 16 needs --samples >= 24"),
    (("--block-variants", "--block-distill-steps", "5", "--block-distill-lr", "0"), "--block-distill-lr"),
    (("--block-variants", "--block-distill-steps", "5", "--block-distill-samples", "2", "--block-distill-batch", "3"),
     "--block-distill-batch 3 exceeds --block-distill-samples 2"),
    (("--block-variants", "--block-distill-steps", "5", "--tp", "2"), "--block-variants scores at --tp 1 --pp 1"),
])
def test_block_distill_flags_refused(tiny_checkpoint, tmp_path, capsys, args, says):
    code, err = cli_in_process(capsys, "importance", tiny_checkpoint(KIND), "--data", "builtin:calib", "--out",
                               tmp_path / "imp", "--seq-len", "16", *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "imp").exists()
