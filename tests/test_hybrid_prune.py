"""Importance and pruning of hybrid Mamba-Transformer models (Nemotron-H, issue 22 phase 2):
every score against a reference computed here from transformers' NemotronH activations,
the pruned weights against slices of the original cut here from the scores, counts and
logits against transformers' model of the exported config, TP=2 / PP=2 / DP=2 against
TP=1 (one 2-process run), bad input, and the planner on the published teachers' configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import cli_in_process, run_workers
from references import hf_layer_scores
from tolerances import fp32, log_softmax_sum, transformer_logits

KIND = "nemotron_h"  # pattern M*-M-M: Mamba heads 8 x 8 in 2 groups, attention 4 heads in 2 groups, ffn 96
SEQ, SAMPLES, LAYER_SAMPLES, SEED = 24, 4, 2, 11
IMPORTANCE = dict(samples=SAMPLES, seq_len=SEQ, micro_batch=2, layer_samples=LAYER_SAMPLES, drop_blocks=[2],
                  seed=SEED, progress=False)
DATA = Path(__file__).parent / "data" / "hf_configs"
# Scores: float32 megatron activations against float64 HF ones, each carrying a forward
# pass's rounding (the widest accumulation: the mixers' scan over state + sequence, 16 + 24,
# or the MLP's 96 inputs; 6 layers); the aggregations then run in float64.
SCORE_RTOL = fp32(96 * (2 * 6 + 1), 1.0)
LOSS_TOL = log_softmax_sum(1000, 1.0)  # per-token cross-entropy: a log-softmax over the vocabulary


def _samples(checkpoint) -> torch.Tensor:
    from nemo_minitron.checkpoint.store import load_tokenizer
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.importance.api import calibration_samples

    return calibration_samples(check_corpus(["builtin:calib"]), load_tokenizer(checkpoint), seq_len=SEQ,
                               samples=SAMPLES, seed=SEED)


def _capture(hf, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every activation the scores are defined on, from hooks on transformers' NemotronH
    (float64 copies, each [b, s, ...]): each layer's norm output and input/output, a Mamba
    mixer's in_proj output and out_proj input, attention's o_proj input, the MLP's
    down_proj input, the final norm's output."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, which: str):
        def hook(module, args, output):
            value = args[0] if which == "in" else output[0] if isinstance(output, tuple) else output
            seen[name] = value.detach().double()
        return hook

    handles = [hf.model.norm_f.register_forward_hook(keep("final_norm", "out"))]
    for i, layer in enumerate(hf.model.layers):
        handles += [layer.norm.register_forward_hook(keep(f"{i}.norm", "out")),
                    layer.register_forward_hook(keep(f"{i}.in", "in")),
                    layer.register_forward_hook(keep(f"{i}.out", "out"))]
        mixer = layer.mixer
        if layer.block_type == "linear_attention":
            handles += [mixer.in_proj.register_forward_hook(keep(f"{i}.in_proj", "out")),
                        mixer.out_proj.register_forward_hook(keep(f"{i}.mamba_out", "in"))]
        elif layer.block_type == "full_attention":
            handles.append(mixer.o_proj.register_forward_hook(keep(f"{i}.attn_out", "in")))
        else:
            handles.append(mixer.down_proj.register_forward_hook(keep(f"{i}.ffn", "in")))
    with torch.no_grad():
        hf(tokens, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def _aggregate(x: torch.Tensor, seq: str, batch: str) -> torch.Tensor:
    """The aggregations, written out: x [b, s, units] -> [units]."""
    per_sample = {"mean": lambda t: t.abs().mean(1), "l2": lambda t: t.pow(2).sum(1).sqrt(),
                  "var": lambda t: ((t - t.mean(1, keepdim=True)) ** 2).mean(1)}[seq](x)
    return {"mean": lambda v: v.mean(0), "l2": lambda v: v.pow(2).sum(0).sqrt(),
            "var": lambda v: ((v - v.mean(0)) ** 2).mean(0)}[batch](per_sample)


def _heads(x: torch.Tensor, head_dim: int, seq: str, batch: str, head_score: str) -> torch.Tensor:
    """Head scores of x [b, s, heads * head_dim]: each channel aggregated then the L2 norm over
    the head's channels (channel), or each token's head norm aggregated (token)."""
    if head_score == "token":
        return _aggregate(x.unflatten(-1, (-1, head_dim)).norm(dim=-1), seq, batch)
    return _aggregate(x, seq, batch).unflatten(-1, (-1, head_dim)).norm(dim=-1)


def _reference(acts: dict, desc, seq: str, batch: str, head_score: str, mamba: str) -> dict[str, torch.Tensor]:
    """Every calibration-pass axis by its definition; zeros where a layer has no such unit."""
    L, H, P = desc.num_layers, desc.mamba_num_heads, desc.mamba_head_dim
    out = {"heads": torch.zeros(L, desc.num_attention_heads, dtype=torch.float64),
           "ffn": torch.zeros(L, desc.ffn_hidden_size, dtype=torch.float64),
           "mamba_heads": torch.zeros(L, H, dtype=torch.float64),
           "mamba_head_dim": torch.zeros(L, P, dtype=torch.float64),
           "hidden_per_layer": torch.stack([_aggregate(acts[f"{i}.norm"], seq, batch) for i in range(L)]),
           "final_norm": _aggregate(acts["final_norm"], seq, batch),
           "layer_block_importance": torch.stack([1 - torch.nn.functional.cosine_similarity(
               acts[f"{i}.in"], acts[f"{i}.out"], dim=-1).mean() for i in range(L)])}
    for i, symbol in enumerate(desc.hybrid_pattern):
        if symbol == "M":  # the gated norm's output, or in_proj's x section [z, x, B, C, dt]
            x = acts[f"{i}.mamba_out"] if mamba == "output" else acts[f"{i}.in_proj"][..., H * P:2 * H * P]
            out["mamba_heads"][i] = _heads(x, P, seq, batch, head_score)
            out["mamba_head_dim"][i] = _aggregate(x, seq, batch).view(H, P).norm(dim=0)
        elif symbol == "*":
            out["heads"][i] = _heads(acts[f"{i}.attn_out"], desc.head_dim, seq, batch, head_score)
        else:
            out["ffn"][i] = _aggregate(acts[f"{i}.ffn"], seq, batch)
    out["hidden"] = out["hidden_per_layer"].sum(0)
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread, or each small product waits at a thread barrier on a busy
    machine (transformers' float64 forward of the tiny hybrid: 0.1 s instead of seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _close(ours: torch.Tensor, ref: torch.Tensor, rtol: float) -> bool:
    return ours.shape == ref.shape and (ours.double() - ref).abs().max().item() <= rtol * ref.abs().max().item()


@pytest.fixture(scope="module")
def hybrid(tiny_hf, tiny_checkpoint, tmp_path_factory):
    """The tiny hybrid checkpoint, its calibration samples, the HF model's activations on
    them, and its importance directory at TP=1 (layer loss drops, blocks of 2, greedy)."""
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.importance.api import compute_importance

    ckpt = tiny_checkpoint(KIND)
    samples = _samples(ckpt)
    imp = tmp_path_factory.mktemp("hybrid_importance") / "imp"
    scores = compute_importance(str(ckpt), ["builtin:calib"], str(imp), **IMPORTANCE)
    return {"checkpoint": ckpt, "samples": samples, "desc": read_info(ckpt).description, "importance": imp,
            "scores": scores, "acts": _capture(load_hf_model(tiny_hf(KIND)), samples[:, :-1])}


@pytest.mark.parametrize("seq, batch, head_score, mamba", [("mean", "l2", "channel", "output"),
                                                           ("l2", "mean", "token", "x"),
                                                           ("var", "var", "channel", "x")])
def test_scores_equal_transformers_activations(hybrid, seq, batch, head_score, mamba):
    """Mamba heads and head channels (the gated norm's output, or in_proj's x section),
    attention heads, MLP neurons, hidden channels (every layer's one norm and the final
    norm) and Block Importance, from one calibration pass, equal the definitions applied
    to transformers' activations; the default run (first case) is the importance directory's."""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.importance.api import calibration_pass

    desc = hybrid["desc"]
    reference = _reference(hybrid["acts"], desc, seq, batch, head_score, mamba)
    if (seq, batch, head_score, mamba) == ("mean", "l2", "channel", "output"):  # the defaults
        scores = hybrid["scores"].tensors
        reference["query_groups"] = reference["heads"].unflatten(1, (desc.num_query_groups, -1)).sum(-1)
    else:
        model = open_model(str(hybrid["checkpoint"])).model
        scores = calibration_pass(model, hybrid["samples"], micro_batch=2, seq_agg=seq, batch_agg=batch,
                                  neuron_activation="post", num_layers=desc.num_layers, head_score=head_score,
                                  mamba_activation=mamba, progress=False)
    for axis, ref in reference.items():
        assert _close(scores[axis], ref, SCORE_RTOL), (axis, seq, batch, head_score, mamba)


def test_layer_scores_equal_transformers_without_the_layers(hybrid, tiny_hf):
    """Depth over the mixed pattern: the loss without each layer, the best contiguous block
    of 2 and greedy elimination equal transformers' NemotronH with those layers deleted
    (any kind: Mamba, attention, MLP), on the same samples."""
    ref = hf_layer_scores(tiny_hf(KIND), hybrid["samples"], LAYER_SAMPLES, (2,))
    summary = hybrid["scores"].summary["layers"]
    assert abs(hybrid["scores"].summary["full_loss"] - ref["full_loss"]) < LOSS_TOL
    drops = hybrid["scores"]["layer_loss_drop"]
    assert (drops.double() - torch.tensor(ref["loss_drop"])).abs().max().item() < 2 * LOSS_TOL
    assert summary["contiguous_blocks"]["2"]["layers"] == ref["blocks"][2]["layers"]
    assert summary["greedy"]["order"] == [e["layer"] for e in ref["greedy"]]
    assert abs(summary["greedy"]["loss"][1] - ref["greedy"][1]["loss"]) < 2 * LOSS_TOL


# ---------------------------------------------------------------------- pruning
def _topk(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores.double(), k).indices.tolist())


def expected_kept(scores, old, new, dropped: list[int]) -> dict:
    """The units the scores say to keep, by their definition: the top channels; per kept
    layer, the units of its kind (attention: top groups, top heads inside each; MLP: top
    neurons; Mamba: the top heads inside every B/C group, as many in each, and the top head
    channels)."""
    G, hpg = old.mamba_num_groups, old.mamba_num_heads // old.mamba_num_groups
    kept = {"hidden": _topk(scores["hidden"], new.hidden_size), "layers": [i for i in range(old.num_layers)
                                                                          if i not in dropped],
            "groups": {}, "heads": {}, "ffn": {}, "mamba_heads": {}, "mamba_head_dim": {}}
    for i in kept["layers"]:
        if old.hybrid_pattern[i] == "*":
            kept["groups"][i] = _topk(scores["query_groups"][i], new.num_query_groups)
            per_group = scores["heads"][i].view(old.num_query_groups, -1)
            kept["heads"][i] = [g * old.heads_per_group + j for g in kept["groups"][i]
                                for j in _topk(per_group[g], new.heads_per_group)]
        elif old.hybrid_pattern[i] == "-":
            kept["ffn"][i] = _topk(scores["ffn"][i], new.ffn_hidden_size)
        else:
            per_group = scores["mamba_heads"][i].view(G, hpg)
            kept["mamba_heads"][i] = [g * hpg + j for g in range(G)
                                      for j in _topk(per_group[g], new.mamba_num_heads // G)]
            kept["mamba_head_dim"][i] = _topk(scores["mamba_head_dim"][i], new.mamba_head_dim)
    return kept


def expected_weights(before: dict, old, kept: dict) -> dict:
    """Every tensor of the pruned model, cut from the original ones by viewing each in its
    documented layout: in_proj rows [z, x, B, C, dt] with z and x [heads, head_dim], conv1d
    channels [x, B, C], qkv [group][q..., k, v][head_dim]; B, C and their conv channels whole."""
    h = torch.tensor(kept["hidden"])
    H, P, d = old.mamba_num_heads, old.mamba_head_dim, old.head_dim
    inner, bc = H * P, 2 * old.mamba_num_groups * old.mamba_state_dim
    out = {"embedding.word_embeddings.weight": before["embedding.word_embeddings.weight"][:, h],
           "output_layer.weight": before["output_layer.weight"][:, h],
           "decoder.final_norm.weight": before["decoder.final_norm.weight"][h]}
    for new_i, i in enumerate(kept["layers"]):
        src, dst = f"decoder.layers.{i}.", f"decoder.layers.{new_i}."
        if old.hybrid_pattern[i] == "M":
            heads, dims = torch.tensor(kept["mamba_heads"][i]), torch.tensor(kept["mamba_head_dim"][i])

            def inner_cut(t: torch.Tensor) -> torch.Tensor:  # [H * P, ...] -> kept heads' kept channels
                return t.reshape(H, P, *t.shape[1:])[heads][:, dims].flatten(0, 1)

            w = before[src + "mixer.in_proj.weight"]
            out[dst + "mixer.in_proj.weight"] = torch.cat([
                inner_cut(w[:inner]), inner_cut(w[inner:2 * inner]), w[2 * inner:2 * inner + bc],
                w[2 * inner + bc:][heads]])[:, h]
            for part in ("weight", "bias"):
                conv = before[src + f"mixer.conv1d.{part}"]
                out[dst + f"mixer.conv1d.{part}"] = torch.cat([inner_cut(conv[:inner]), conv[inner:]])
            for name in ("A_log", "D", "dt_bias"):
                out[dst + f"mixer.{name}"] = before[src + f"mixer.{name}"][heads]
            out[dst + "mixer.norm.weight"] = inner_cut(before[src + "mixer.norm.weight"])
            out[dst + "mixer.out_proj.weight"] = inner_cut(before[src + "mixer.out_proj.weight"][h].T).T
            out[dst + "norm.weight"] = before[src + "norm.weight"][h]
        elif old.hybrid_pattern[i] == "*":
            G, hpg = old.num_query_groups, old.heads_per_group
            qkv = before[src + "self_attention.linear_qkv.weight"].reshape(G, hpg + 2, d, -1)
            rows = []
            for g in kept["groups"][i]:
                rows += [qkv[g, j] for j in range(hpg) if g * hpg + j in kept["heads"][i]] + [qkv[g, hpg], qkv[g, -1]]
            out[dst + "self_attention.linear_qkv.weight"] = torch.cat(rows)[:, h]
            proj = before[src + "self_attention.linear_proj.weight"].reshape(old.hidden_size, G * hpg, d)
            out[dst + "self_attention.linear_proj.weight"] = proj[h][:, torch.tensor(kept["heads"][i])].flatten(1)
            out[dst + "input_layernorm.weight"] = before[src + "input_layernorm.weight"][h]
        else:
            ffn = torch.tensor(kept["ffn"][i])
            out[dst + "mlp.linear_fc1.weight"] = before[src + "mlp.linear_fc1.weight"][ffn][:, h]
            out[dst + "mlp.linear_fc2.weight"] = before[src + "mlp.linear_fc2.weight"][h][:, ffn]
            out[dst + "pre_mlp_layernorm.weight"] = before[src + "pre_mlp_layernorm.weight"][h]
    return out


def _state(checkpoint):
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.model.params import named_weights

    opened = open_model(str(checkpoint))
    return opened, {k: v.detach().clone() for k, v in named_weights(opened.model)}


def _recorded(out) -> dict:
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.prune.select import mask_to_indices

    kept = read_info(out).provenance["kept"]
    return {"hidden": kept["hidden"], "layers": kept["layers"],
            "groups": {int(k): v for k, v in kept["query_groups"].items()},
            "heads": {int(k): v for k, v in kept["heads"].items()},
            "ffn": {int(k): mask_to_indices(v) for k, v in kept["ffn_mask"].items()},
            "mamba_heads": {int(k): v for k, v in kept["mamba_heads"].items()},
            "mamba_head_dim": {int(k): v for k, v in kept["mamba_head_dim"].items()}}


@pytest.mark.parametrize("target, metric, dropped", [
    # every axis at once; one Mamba and one MLP layer go, the lowest loss drop of each kind
    ({"hidden": 48, "ffn": 64, "heads": 2, "mamba_heads": 4, "mamba_head_dim": 6, "mamba_layers": 2,
      "mlp_layers": 1}, "loss", None),
    # ModelOpt's names; a whole query group; the greedy order's first two layers, of any kind
    ({"mamba_num_heads": 6, "num_query_groups": 1, "num_layers": 4}, "greedy", None),
])
def test_pruned_weights_counts_and_logits(hybrid, tmp_path, target, metric, dropped):
    """The pruned model: every weight the original's at the indices the scores rank first
    (B/C rows and conv channels whole, every group keeping as many heads); the description's
    parameter count == the saved tensors' == transformers' model of the exported config,
    which loads in NemotronHForCausalLM and gives our logits."""
    from nemo_minitron.checkpoint.api import export
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.prune.api import prune
    from test_conversion import widest

    old, scores = hybrid["desc"], hybrid["scores"]
    out = prune(str(hybrid["checkpoint"]), str(hybrid["importance"]), str(tmp_path / "pruned"), target=target,
                layer_metric=metric)
    new = read_info(out).description
    loss = scores["layer_loss_drop"].tolist()
    if metric == "loss":  # per kind: the one Mamba and the one MLP layer of lowest loss drop
        dropped = [min((i for i, s in enumerate(old.hybrid_pattern) if s == kind), key=lambda i: loss[i])
                   for kind in "M-"]
    else:
        dropped = scores.summary["layers"]["greedy"]["order"][:2]
    assert new.hybrid_pattern == "".join(s for i, s in enumerate(old.hybrid_pattern) if i not in dropped)
    kept = expected_kept(scores, old, new, dropped)
    assert _recorded(out) == kept
    _, before = _state(hybrid["checkpoint"])
    pruned, after = _state(out)
    expected = expected_weights(before, old, kept)
    assert sorted(after) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(after[name], tensor), name

    counted = sum(t[: new.vocab_size].numel() if k.startswith(("embedding.", "output_layer.")) else t.numel()
                  for k, t in after.items())  # the padded vocabulary rows are no parameters
    hf = load_hf_model(export(str(out), str(tmp_path / "hf")))
    assert type(hf).__name__ == "NemotronHForCausalLM"
    assert counted == new.num_parameters() == sum(p.numel() for p in hf.parameters())
    tokens = torch.randint(0, new.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = full_logits(pruned.model, tokens, new.vocab_size)
        theirs = hf(tokens, use_cache=False).logits.float()
    assert (ours - theirs).abs().max().item() <= transformer_logits(widest(new, SEQ), new.num_layers, theirs)


def test_prune_to_the_original_shape_is_the_identity(hybrid, tmp_path):
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.prune.api import prune
    from nemo_minitron.prune.targets import sizes

    original, before = _state(hybrid["checkpoint"])
    d = original.description
    out = prune(str(hybrid["checkpoint"]), str(hybrid["importance"]), str(tmp_path / "same"),
                target={k: v for k, v in sizes(d).items() if v})
    pruned, after = _state(out)
    assert pruned.description == d
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    tokens = torch.randint(0, d.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    before_logits = full_logits(original.model, tokens, d.vocab_size)
    assert torch.equal(before_logits, full_logits(pruned.model, tokens, d.vocab_size))


@pytest.mark.multirank
def test_tp2_pp2_dp2_equal_tp1(hybrid, tmp_path):
    """One 2-process run: importance at TP=2 (a rank holds one B/C group: the gated norm's
    output, and in_proj's x section, split by heads), PP=2 (3 layers a stage) and DP=2 equals
    TP=1; pruning at TP=2 and PP=2 (from the TP=1 scores; by importance with layers of each
    kind, and by weight magnitude gathered over the ranks) writes exactly the TP=1 weights,
    and the pruned models hold as many parameters as their descriptions count."""
    from nemo_minitron.importance.api import compute_importance
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.prune.api import prune

    layer_kwargs = dict(IMPORTANCE, drop_blocks=[])  # loss drops per layer; blocks and greedy are layout-free
    # at TP=2 also in_proj's x section (this rank's x rows sit between its z and B rows) and token head norms
    variants = {"imp": {}, "imp-x": {"mamba_activation": "x", "head_score": "token"}}
    base = {name: compute_importance(str(hybrid["checkpoint"]), ["builtin:calib"], str(tmp_path / f"tp1-{name}"),
                                     **layer_kwargs, **v) for name, v in variants.items()}
    jobs = [  # at PP=2 the stages [M * -] [M - M] keep 2 layers each: layers 2 and 3 go
        {"name": "importance", "target": {"hidden": 48, "mamba_heads": 6, "mamba_head_dim": 6, "ffn": 64,
                                          "mamba_layers": 2, "mlp_layers": 1}, "order": "importance",
         "layer_metric": "2,3"},
        {"name": "magnitude", "target": {"hidden": 40, "mamba_heads": 4, "heads": 2}, "order": "magnitude",
         "layer_metric": "auto"}]
    expected = {job["name"]: _state(prune(str(hybrid["checkpoint"]), str(hybrid["importance"]),
                                          str(tmp_path / f"tp1-{job['name']}"), target=job["target"],
                                          order=job["order"], layer_metric=job["layer_metric"]))[1] for job in jobs}
    layouts = {"tp2": [2, 1], "pp2": [1, 2], "dp2": [1, 1]}
    runs = {"tp2": variants, "pp2": {"imp": {}}, "dp2": {"imp": {}}}
    job = {"checkpoint": str(hybrid["checkpoint"]), "scores": str(hybrid["importance"]), "layouts": layouts,
           "importance": {k: v for k, v in layer_kwargs.items() if k != "progress"}, "variants": runs,
           "prune": jobs, "out": str(tmp_path / "out" / "{layout}")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    run_workers("hybrid_prune_layouts.py", tmp_path / "job.json", out=tmp_path / "out")
    for layout in layouts:
        for name in runs[layout]:
            other = ImportanceScores.load(tmp_path / "out" / layout / name)
            assert other.tensors.keys() == base[name].tensors.keys()
            for axis, ref in base[name].tensors.items():
                if axis == "layer_loss_drop":  # differences of two losses
                    assert (other[axis] - ref).abs().max().item() <= 2 * LOSS_TOL, (layout, name, axis)
                else:  # another split of the same float32 forward, and DP's sums added in another order
                    assert _close(other[axis], ref.double(), 2 * SCORE_RTOL), (layout, name, axis)
        if layout == "dp2":
            continue
        for j in jobs:
            _, got = _state(tmp_path / "out" / layout / j["name"])
            want = expected[j["name"]]
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (layout, j["name"])


# ---------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def weightless(hybrid, tmp_path_factory):
    """The tiny hybrid checkpoint without weights: an error raised after loading them would
    read differently, so these prove that nothing was loaded."""
    copy = tmp_path_factory.mktemp("hybrid_weightless") / "ckpt"
    copy.mkdir()
    shutil.copy(hybrid["checkpoint"] / "nemo_minitron.json", copy)
    shutil.copytree(hybrid["checkpoint"] / "tokenizer", copy / "tokenizer")
    (copy / "weights").mkdir()
    return copy


@pytest.mark.parametrize("flags, words", [
    (["--target", "mamba_heads=5"], "--target: mamba_heads=5 splits a Mamba head group: each of the 2 groups (whose "
                                    "heads share B and C) keeps the same number of heads; allowed: 2, 4, 6, 8"),
    (["--target", "mamba_num_heads=3"], "--target: mamba_heads=3 splits a Mamba head group"),
    (["--target", "mamba_head_dim=9"], "--target: mamba_head_dim=9 is larger than the original model's 8"),
    (["--target", "mamba_head_dim=0"], "--target: mamba_head_dim must be a whole number >= 1 (got 0)"),
    (["--target", "layers=5", "--pp", "2"], "--target: layers=5 does not split evenly over --pp 2 pipeline stages"),
    (["--target", "layers=4", "--pp", "2", "--layer-metric", "0,1"],
     "--pp 2: the layers kept leave 1, 3 on the pipeline stages; a hybrid model's stages hold equal numbers"),
    (["--target", "mamba_layers=2", "--layer-metric", "contiguous"],
     "--layer-metric contiguous: a block of layers cannot honour the target's layers of each kind"),
    (["--target", "attention_layers=0", "--layer-metric", "3"],
     "--layer-metric 3 keeps 2 Mamba-2 mixer, 1 attention, 2 MLP, the target 3 Mamba-2 mixer, 0 attention, 2 MLP"),
    (["--target", "mamba_layers=2,layers=3"], "--target: layers=3 disagrees with the sum of the layers of each kind "
                                              "(mamba_layers, attention_layers, mlp_layers, moe_layers) = 5"),
    (["--target", "experts=2"], "--target: experts applies to mixtures of experts"),
    (["--target", "ffn=64", "--refit"], "--refit refits dense MLPs and attention; this nemotron_h model has Mamba"),
])
def test_bad_input_is_one_line_before_any_weight_is_read(weightless, hybrid, tmp_path, capsys, flags, words):
    out = tmp_path / "out"
    code, stderr = cli_in_process(capsys, "prune", weightless, "--importance", hybrid["importance"], "--out", out,
                                  *flags)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("nemo-minitron prune: error: ") and words in stderr, (flags, stderr)
    assert not out.exists()


def test_bad_input_elsewhere(weightless, tiny_checkpoint, tmp_path, capsys):
    """Mamba axes on a model without Mamba layers, second moments of a hybrid, a pattern
    symbol nothing implements in a config.json given to plan: one line, exit 2."""
    out = tmp_path / "out"
    code, stderr = cli_in_process(capsys, "importance", weightless, "--data", "builtin:calib", "--out", out,
                                  "--second-moments")
    assert code == 2 and "--second-moments (for prune --refit) is for dense MLPs and attention; this nemotron_h " \
                         "model has Mamba layers" in stderr, stderr
    code, stderr = cli_in_process(capsys, "plan", tiny_checkpoint("llama"), "--target-params", "200K")
    assert code == 0, stderr
    config = json.loads((DATA / "nvidia__Nemotron-H-8B-Base-8K.json").read_text(), parse_constant=float)
    config["hybrid_override_pattern"] = config["hybrid_override_pattern"].replace("*", "G", 1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, stderr = cli_in_process(capsys, "plan", tmp_path / "config.json", "--target-params", "4B")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "layer symbol 'G' is not supported" in stderr
    from nemo_minitron.errors import UsageError
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.prune.targets import apply_target

    with pytest.raises(UsageError, match="--target: mamba_head_dim applies to hybrid Mamba-Transformer models; this "
                                         "llama model has no Mamba layers"):
        apply_target(read_info(tiny_checkpoint("llama")).description, {"mamba_head_dim": 4})
    # megatron-core gives each TP rank heads / tp heads (in groups / tp whole groups); prune
    # checks the layout first (--tp must divide the groups, so whole groups' heads divide too)
    with pytest.raises(UsageError, match="--target: mamba_heads=6 is not divisible by --tp 4"):
        apply_target(read_info(weightless).description, {"mamba_heads": 6}, tp=4)
    assert not out.exists()


# ---------------------------------------------------------------------- the published shapes
def _teacher(name: str):
    from nemo_minitron.checkpoint.hf_format import description_from_hf_config

    return description_from_hf_config(json.loads((DATA / name).read_text()))


@pytest.mark.parametrize("teacher, published, billions, limits", [
    # Nemotron-H 8B -> 4B (Minitron-SSM, arXiv 2504.11409; nvidia/Nemotron-H-4B-Base-8K): every
    # one of the 52 layers kept, hidden 4096 -> 3072, Mamba heads 128 -> 112, ffn 21504 -> 12288
    ("nvidia__Nemotron-H-8B-Base-8K.json", {"hidden": 3072, "mamba_heads": 112, "ffn": 12288, "layers": 52,
                                            "mamba_head_dim": 64, "heads": 32, "query_groups": 8}, 4, {}),
    # Nemotron Nano 12B v2 -> 9B (arXiv 2508.14444; nvidia/NVIDIA-Nemotron-Nano-9B-v2): 62 -> 56 layers
    # (28 -> 27 Mamba, 6 -> 4 attention, 28 -> 25 MLP), hidden 5120 -> 4480, ffn 20480 -> 15680;
    # Mamba heads, head dim 80 and attention kept
    ("nvidia__NVIDIA-Nemotron-Nano-12B-v2-Base.json",
     {"hidden": 4480, "ffn": 15680, "layers": 56, "mamba_layers": 27, "attention_layers": 4, "mlp_layers": 25,
      "mamba_heads": 128, "mamba_head_dim": 80, "heads": 40, "query_groups": 8}, 9,
     ["--max-depth-cut", "0.1", "--max-width-cut", "0.25"]),
])
def test_plan_lists_the_published_shapes(teacher, published, billions, limits, tmp_path, capsys):
    """``plan`` on the teacher's config.json alone lists the published student among its
    candidates for the student's parameter count (Nano 9B: within the depth and width cuts
    the published student made; at the default limits the layer kinds' combinations exceed
    what the table lists); its count equals transformers' count of the published config and
    the size the paper names, and the table shows the SSM state bytes next to the KV bytes."""
    from nemo_minitron.checkpoint.hf_format import hf_config_dict
    from nemo_minitron.prune.targets import apply_target
    from test_families import _hf_model

    desc = _teacher(teacher)
    student = apply_target(desc, published)
    if "mamba_layers" in published:  # the published pattern (nvidia/NVIDIA-Nemotron-Nano-9B-v2)
        student = student.replace(hybrid_pattern="M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-")
    assert student.num_parameters() == sum(p.numel() for p in _hf_model(hf_config_dict(student)).parameters())
    assert round(student.num_parameters() / 1e9) == billions
    out = tmp_path / "plan.json"
    code, stderr = cli_in_process(capsys, "plan", DATA / teacher, "--target-params", student.num_parameters(),
                                  "--json", out, *limits)
    assert code == 0, stderr
    rows = json.loads(out.read_text())
    targets = [{k: r["target"][k] for k in published} for r in rows]
    assert published in targets
    row = rows[targets.index(published)]
    # the recurrent state of one sequence in bf16: per Mamba layer, heads x head_dim x state and
    # the conv window (kernel - 1 steps of the x, B and C channels)
    H, P, N, G = student.mamba_num_heads, student.mamba_head_dim, student.mamba_state_dim, student.mamba_num_groups
    ssm = student.hybrid_pattern.count("M") * (H * P * N + (H * P + 2 * G * N) * (student.mamba_conv_kernel - 1)) * 2
    assert row["params"] == student.num_parameters() and row["ssm_state_bytes"] == ssm
