"""Pruning transforms on tiny models: identity, counts, every kept weight, baselines,
layer choice, TP=2 / PP=2 against TP=1, and bad input rejected before any weight is read."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import cli_in_process, run_workers
from tiny_models import MOE_KINDS
from tolerances import transformer_logits

_MADE: dict = {}


CALIBRATION = dict(samples=8, seq_len=32, layer_samples=4, drop_blocks=[1, 2])


@pytest.fixture(scope="module")
def scored(tiny_checkpoint, tmp_path_factory):
    """Factory: kind -> (checkpoint, importance directory). ``llama`` and ``llama_tied`` get
    real scores (contiguous blocks of 1 and 2 recorded); other kinds seeded random scores."""
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.importance.api import compute_importance

    def get(kind="llama"):
        if kind not in _MADE:
            out = tmp_path_factory.mktemp("imp") / kind
            ckpt = tiny_checkpoint(kind)
            if kind in ("llama", "llama_tied"):
                compute_importance(str(ckpt), ["builtin:calib"], str(out), progress=False, **CALIBRATION)
            else:
                out.mkdir()
                synthetic_scores(read_info(ckpt).description, out, seed=len(kind))
            _MADE[kind] = (ckpt, out)
        return _MADE[kind]

    return get


@pytest.fixture(scope="module")
def layer_reference(tiny_hf, tiny_checkpoint):
    """Factory: kind -> depth importance by definition, from the HF model of the same weights
    on the same calibration samples as ``scored`` (layers deleted, cosines from hooks)."""
    from references import hf_layer_scores

    from nemo_minitron.checkpoint.store import load_tokenizer
    from nemo_minitron.config import DEFAULT_SEED
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.importance.api import calibration_samples

    made: dict = {}

    def get(kind="llama"):
        if kind not in made:
            calib = calibration_samples(check_corpus(["builtin:calib"]), load_tokenizer(tiny_checkpoint(kind)),
                                        seq_len=CALIBRATION["seq_len"], samples=CALIBRATION["samples"],
                                        seed=DEFAULT_SEED)
            made[kind] = hf_layer_scores(tiny_hf(kind), calib, CALIBRATION["layer_samples"],
                                         tuple(CALIBRATION["drop_blocks"]))
        return made[kind]

    return get


def _lowest(values, k: int) -> list[int]:
    return sorted(sorted(range(len(values)), key=lambda i: values[i])[:k])


def shape_from_weights(after: dict, head_dim: int) -> dict[str, int]:
    """The architecture a set of canonical tensors has, read from their shapes."""
    layers = sorted({int(k.split(".")[2]) for k in after if k.startswith("decoder.layers.")})
    first = f"decoder.layers.{layers[0]}."
    heads = after[first + "self_attention.linear_proj.weight"].shape[1] // head_dim
    groups = (after[first + "self_attention.linear_qkv.weight"].shape[0] // head_dim - heads) // 2
    shape = {"hidden": after["embedding.word_embeddings.weight"].shape[1], "heads": heads, "query_groups": groups,
             "layers": len(layers)}
    if first + "mlp.router.weight" not in after:
        return {**shape, "ffn": after[first + "mlp.linear_fc2.weight"].shape[1]}
    shape["experts"] = after[first + "mlp.router.weight"].shape[0]
    shape["moe_ffn"] = after[first + "mlp.experts.local_experts.0.linear_fc2.weight"].shape[1]
    if first + "mlp.shared_experts.linear_fc2.weight" in after:
        shape["shared_ffn"] = after[first + "mlp.shared_experts.linear_fc2.weight"].shape[1]
    return shape


def synthetic_scores(desc, directory: Path, seed: int) -> None:
    from nemo_minitron.importance.scores import ImportanceScores

    g = torch.Generator().manual_seed(seed)
    L, H = desc.num_layers, desc.hidden_size
    heads = torch.rand(L, desc.num_attention_heads, generator=g)
    tensors = {"heads": heads, "query_groups": heads.reshape(L, desc.num_query_groups, -1).sum(-1),
               "ffn": torch.rand(L, desc.ffn_hidden_size, generator=g), "hidden": torch.rand(H, generator=g),
               "hidden_per_layer": torch.rand(L, H, generator=g), "layer_block_importance": torch.rand(L, generator=g),
               "layer_loss_drop": torch.rand(L, generator=g)}
    if desc.is_moe:
        tensors.update(experts=torch.rand(L, desc.num_experts, generator=g),
                       moe_ffn=torch.rand(L, desc.num_experts, desc.moe_ffn_hidden_size, generator=g),
                       shared_ffn=torch.rand(L, desc.moe_shared_ffn_hidden_size, generator=g))
    ImportanceScores(tensors, {"model": desc.fingerprint()}).save(directory)


def _state(checkpoint):
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.model.params import named_weights

    opened = open_model(str(checkpoint))
    return opened, {k: v.detach().clone() for k, v in named_weights(opened.model)}


def _topk(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores.double(), k).indices.tolist())


def expected_kept(scores, old, new, dropped_layers) -> dict:
    """What should be kept: the top-ranked units of every axis, recomputed here."""
    hpg_new = new.heads_per_group
    kept = {"hidden": _topk(scores["hidden"], new.hidden_size),
            "layers": [i for i in range(old.num_layers) if i not in dropped_layers], "ffn": {}, "groups": {},
            "heads": {}}
    if old.is_moe:  # experts by their scores; inside each kept expert its own neurons
        kept.update(ffn=None, experts={}, moe_ffn={}, shared_ffn={})
    for layer in kept["layers"]:
        if old.is_moe:
            kept["experts"][layer] = _topk(scores["experts"][layer], new.num_experts)
            kept["moe_ffn"][layer] = [_topk(scores["moe_ffn"][layer, e], new.moe_ffn_hidden_size)
                                      for e in kept["experts"][layer]]
            if old.moe_shared_ffn_hidden_size:
                kept["shared_ffn"][layer] = _topk(scores["shared_ffn"][layer], new.moe_shared_ffn_hidden_size)
        else:
            kept["ffn"][layer] = _topk(scores["ffn"][layer], new.ffn_hidden_size)
        kept["groups"][layer] = _topk(scores["query_groups"][layer], new.num_query_groups)
        per_group = scores["heads"][layer].reshape(old.num_query_groups, -1)
        kept["heads"][layer] = [g * old.heads_per_group + j for g in kept["groups"][layer]
                                for j in _topk(per_group[g], hpg_new)]
    return kept


def expected_weights(before: dict, old, new, kept: dict) -> dict:
    """The pruned model's every tensor, cut from the original ones by viewing each fused
    matrix in its documented layout (qkv [group][q..., k, v][head_dim]; fc1 [gate; up], or
    the neurons without a gate). Norms over hidden (weights and LayerNorm biases) lose the
    pruned channels; QK-norms (over head_dim, shared by the heads) stay whole."""
    h, d, G, hpg = torch.tensor(kept["hidden"]), old.head_dim, old.num_query_groups, old.heads_per_group
    out = {"embedding.word_embeddings.weight": before["embedding.word_embeddings.weight"][:, h]}
    for part in ("weight", "bias"):
        if f"decoder.final_layernorm.{part}" in before:
            out[f"decoder.final_layernorm.{part}"] = before[f"decoder.final_layernorm.{part}"][h]
    if not old.tie_embeddings:
        out["output_layer.weight"] = before["output_layer.weight"][:, h]
    for new_i, old_i in enumerate(kept["layers"]):
        src, dst = f"decoder.layers.{old_i}.", f"decoder.layers.{new_i}."
        heads = kept["heads"][old_i]
        for norm in ("input_layernorm.weight", "pre_mlp_layernorm.weight", "input_layernorm.bias",
                     "pre_mlp_layernorm.bias"):
            if src + norm in before:
                out[dst + norm] = before[src + norm][h]
        for norm in ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"):
            if src + norm in before:
                out[dst + norm] = before[src + norm]
        for suffix in ("weight", "bias"):
            if src + "self_attention.linear_qkv." + suffix not in before:
                continue
            qkv = before[src + "self_attention.linear_qkv." + suffix]
            qkv = qkv.reshape(G, hpg + 2, d, *qkv.shape[1:])
            rows = []
            for g in kept["groups"][old_i]:
                rows += [qkv[g, j] for j in range(hpg) if g * hpg + j in heads] + [qkv[g, hpg], qkv[g, hpg + 1]]
            cut = torch.cat(rows)
            out[dst + "self_attention.linear_qkv." + suffix] = cut[:, h] if suffix == "weight" else cut
        proj = before[src + "self_attention.linear_proj.weight"].reshape(old.hidden_size, G * hpg, d)
        out[dst + "self_attention.linear_proj.weight"] = proj[h][:, torch.tensor(heads)].flatten(1)
        if not old.is_moe:
            _cut_mlp(out, before, src + "mlp.", dst + "mlp.", kept["ffn"][old_i], h)
            continue
        # the router keeps the kept experts' rows; new expert j is the j-th kept one (original order)
        out[dst + "mlp.router.weight"] = before[src + "mlp.router.weight"][torch.tensor(kept["experts"][old_i])][:, h]
        for j, (e, neurons) in enumerate(zip(kept["experts"][old_i], kept["moe_ffn"][old_i])):
            _cut_mlp(out, before, f"{src}mlp.experts.local_experts.{e}.", f"{dst}mlp.experts.local_experts.{j}.",
                     neurons, h)
        if old.moe_shared_ffn_hidden_size:
            _cut_mlp(out, before, src + "mlp.shared_experts.", dst + "mlp.shared_experts.",
                     kept["shared_ffn"][old_i], h)
            out[dst + "mlp.shared_experts.gate_weight"] = before[src + "mlp.shared_experts.gate_weight"][:, h]
    return out


def _cut_mlp(out: dict, before: dict, src: str, dst: str, neurons: list, h: torch.Tensor) -> None:
    """One MLP (dense, an expert, the shared expert) cut to ``neurons`` and channels ``h``;
    fc1 is [gate; up] with a gate, the neurons' rows without one."""
    fc1, fc2, ffn = before[src + "linear_fc1.weight"], before[src + "linear_fc2.weight"], torch.tensor(neurons)
    out[dst + "linear_fc1.weight"] = fc1.reshape(-1, fc2.shape[1], fc1.shape[1])[:, ffn][:, :, h].flatten(0, 1)
    out[dst + "linear_fc2.weight"] = fc2[h][:, ffn]


def _recorded_kept(out: Path) -> dict:
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.prune.select import mask_to_indices

    kept = read_info(out).provenance["kept"]
    out = {"hidden": kept["hidden"], "layers": kept["layers"],
           "ffn": {int(k): mask_to_indices(v) for k, v in kept["ffn_mask"].items()} or None,
           "groups": {int(k): v for k, v in kept["query_groups"].items()},
           "heads": {int(k): v for k, v in kept["heads"].items()}}
    if "experts" in kept:
        out["experts"] = {int(k): v for k, v in kept["experts"].items()}
        out["moe_ffn"] = {int(k): [mask_to_indices(m) for m in v] for k, v in kept["moe_ffn_mask"].items()}
        out["shared_ffn"] = {int(k): mask_to_indices(v) for k, v in kept.get("shared_ffn_mask", {}).items()}
    return out


def _check_pruned(ckpt: Path, out: Path, kept: dict) -> tuple:
    """Every weight of ``out`` is the original cut at ``kept``; returns (pruned model, its state)."""
    original, before = _state(ckpt)
    pruned, after = _state(out)
    assert _recorded_kept(out) == kept
    expected = expected_weights(before, original.description, pruned.description, kept)
    assert sorted(after) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(after[name], tensor), name
    return pruned, after


@pytest.mark.parametrize("kind", ["llama", "qwen3", "nemotron", *MOE_KINDS])
def test_prune_to_original_sizes_is_bit_identical(scored, tmp_path, kind):
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.prune.api import prune
    from nemo_minitron.prune.targets import sizes

    ckpt, imp = scored(kind)
    original, before = _state(ckpt)
    d = original.description
    # every axis the model has (a mixture of experts: experts, their width, top-k, shared expert)
    out = prune(str(ckpt), str(imp), str(tmp_path / "same"), target={k: v for k, v in sizes(d).items() if v})
    pruned, after = _state(out)
    assert pruned.description == d
    tokens = torch.randint(0, d.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    before_logits = full_logits(original.model, tokens, d.vocab_size)
    assert torch.equal(before_logits, full_logits(pruned.model, tokens, d.vocab_size))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind, target, metric", [
    ("llama", {"hidden": 40}, "contiguous"),
    ("llama", {"ffn": 48}, "contiguous"),
    ("llama", {"heads": 2}, "contiguous"),                 # one head kept in each group
    ("llama", {"query_groups": 1}, "contiguous"),          # a whole K/V group with its heads
    ("llama", {"layers": 2}, "contiguous"),                # the best contiguous block of 2
    ("llama_tied", {"hidden": 48, "ffn": 64, "heads": 2, "query_groups": 2, "layers": 3}, "block"),
    ("qwen2", {"hidden": 56, "heads": 2, "layers": 2}, "loss"),   # q/k/v biases, tied embeddings
    ("llama_pruned_shape", {"hidden": 40, "ffn": 64, "query_groups": 1, "layers": 4}, "2"),
    ("qwen3", {"hidden": 48, "ffn": 64, "heads": 2, "layers": 2}, "block"),      # QK-norm with fewer heads
    ("nemotron", {"hidden": 40, "ffn": 48, "query_groups": 1, "layers": 2}, "1"),  # no gate, LayerNorm biases
])
def test_pruned_counts_and_kept_weights(scored, layer_reference, tmp_path, kind, target, metric):
    """Parameters: description == megatron model (padding excluded) == exported HF model;
    every weight is the original one at the top-ranked indices; logits match HF's."""
    from nemo_minitron.checkpoint.api import export
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.prune.api import prune

    ckpt, imp = scored(kind)
    old = read_info(ckpt).description
    # the plain cut (the default refits where the importance run stored second moments)
    out = prune(str(ckpt), str(imp), str(tmp_path / "pruned"), target=target, layer_metric=metric, refit=False)
    new = read_info(out).description

    scores = ImportanceScores.load(imp)
    drop = old.num_layers - target.get("layers", old.num_layers)
    if kind in ("llama", "llama_tied") and metric != "2":  # layer scores by definition, from the HF model
        ref = layer_reference(kind)
        dropped = {"contiguous": lambda: ref["blocks"][drop]["layers"] if drop else [],
                   "loss": lambda: _lowest(ref["loss_drop"], drop),
                   "block": lambda: _lowest(ref["block_importance"], drop)}[metric]()
    elif metric in ("loss", "block"):  # the test's own synthetic scores
        layer_scores = scores["layer_loss_drop" if metric == "loss" else "layer_block_importance"]
        dropped = _lowest(layer_scores.tolist(), drop)
    else:
        dropped = [int(i) for i in metric.split(",")]
    pruned, after = _check_pruned(ckpt, out, expected_kept(scores, old, new, dropped))
    original = {"hidden": old.hidden_size, "ffn": old.ffn_hidden_size, "heads": old.num_attention_heads,
                "query_groups": old.num_query_groups, "layers": old.num_layers}
    if "query_groups" in target and "heads" not in target:  # whole groups go with their heads
        original["heads"] = target["query_groups"] * old.heads_per_group
    assert shape_from_weights(after, old.head_dim) == {**original, **target}

    counted = 0
    for name, tensor in after.items():  # the padded vocabulary rows are no parameters
        vocab_rows = name.startswith(("embedding.", "output_layer."))
        counted += tensor[: new.vocab_size].numel() if vocab_rows else tensor.numel()
    assert ("output_layer.weight" in after) == (not new.tie_embeddings)
    assert counted == new.num_parameters()
    hf = load_hf_model(export(str(out), str(tmp_path / "hf")))
    assert sum(p.numel() for p in hf.parameters()) == new.num_parameters()
    tokens = torch.randint(0, new.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = full_logits(pruned.model, tokens, new.vocab_size)
        theirs = hf(tokens).logits.float()
    # megatron against transformers on the same float32 weights: a forward pass's rounding
    tol = transformer_logits(max(new.hidden_size, new.ffn_hidden_size, new.num_attention_heads * new.head_dim),
                             new.num_layers, theirs)
    assert torch.isfinite(ours).all() and (ours - theirs).abs().max() <= tol


@pytest.mark.parametrize("kind, target, metric", [
    ("mixtral", {"experts": 3, "moe_ffn": 32, "hidden": 48}, "1"),                   # renormalised top-2 of 3
    ("qwen3_moe", {"experts": 3, "moe_ffn": 24, "heads": 2}, "0"),                     # QK-norm
    # shared expert, QKV biases; top-1 of the (not renormalised) probabilities
    ("qwen2_moe", {"experts": 2, "top_k": 1, "moe_ffn": 40, "shared_ffn": 32, "query_groups": 1}, "2"),
])
def test_pruned_experts_counts_and_kept_weights(scored, tmp_path, kind, target, metric):
    """Fewer and narrower experts: parameters counted from the tensors == the planned
    description == the exported HF model; the router keeps the kept experts' rows and every
    kept expert its own top neurons (bit-equal to the original rows and columns); top-k is
    the target's; logits match HF's on the exported model."""
    from nemo_minitron.checkpoint.api import export
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.prune.api import prune
    from nemo_minitron.prune.targets import apply_target, sizes

    ckpt, imp = scored(kind)
    old = read_info(ckpt).description
    target = {**target, "layers": old.num_layers - 1}
    out = prune(str(ckpt), str(imp), str(tmp_path / "pruned"), target=target, layer_metric=metric)
    new = read_info(out).description
    assert new == apply_target(old, target)  # the planner's shape
    want = {k: v for k, v in {**sizes(old), **target}.items() if k != "ffn" and v}
    if "query_groups" in target:  # whole groups go with their heads
        want["heads"] = target["query_groups"] * old.heads_per_group
    assert sizes(new) == {**sizes(old), **want}
    pruned, after = _check_pruned(ckpt, out, expected_kept(ImportanceScores.load(imp), old, new, [int(metric)]))
    assert shape_from_weights(after, old.head_dim) == {k: v for k, v in want.items() if k != "top_k"}

    counted = sum(t[: new.vocab_size].numel() if k.startswith(("embedding.", "output_layer.")) else t.numel()
                  for k, t in after.items())  # the padded vocabulary rows are no parameters
    hf = load_hf_model(export(str(out), str(tmp_path / "hf")))
    assert counted == new.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert (hf.config.num_experts_per_tok, len(hf.model.layers[0].mlp.experts.down_proj)) == \
        (new.moe_top_k, new.num_experts)
    tokens = torch.randint(0, new.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = full_logits(pruned.model, tokens, new.vocab_size)
        theirs = hf(tokens).logits.float()
    # megatron against transformers on the same float32 weights: a forward pass's rounding
    # (the widest product: heads x head_dim = 64); a wrong expert or router row moves logits by ~0.1
    tol = transformer_logits(64, new.num_layers, theirs)
    assert torch.isfinite(ours).all() and (ours - theirs).abs().max() <= tol


@pytest.mark.parametrize("kind", ["llama", "nemotron"])
def test_magnitude_and_random_baselines(scored, tmp_path, kind):
    """magnitude keeps the units of largest weight mass; random the top of seeded random scores.
    Nemotron: a neuron owns its up row (no gate) and down column; a channel its LayerNorm
    biases and its gammas (stored zero-centred: the mass of weight + 1)."""
    from nemo_minitron.prune.api import prune
    from nemo_minitron.prune.targets import apply_target

    ckpt, imp = scored(kind)
    original, w = _state(ckpt)
    old = original.description
    target = {"hidden": 48, "ffn": 64, "query_groups": 1, "layers": 3 if kind == "llama" else 2}
    new = apply_target(old, target)

    gamma = 1 if old.zero_centered_gamma else 0
    sq = {k: (v + gamma if k.endswith("layernorm.weight") else v).double().square() for k, v in w.items()}
    G, hpg, d, F = old.num_query_groups, old.heads_per_group, old.head_dim, old.ffn_hidden_size
    hidden = sq["embedding.word_embeddings.weight"][: old.vocab_size].sum(0)
    hidden += sq["output_layer.weight"][: old.vocab_size].sum(0) + sq["decoder.final_layernorm.weight"]
    hidden += sq.get("decoder.final_layernorm.bias", 0)
    L = old.num_layers
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
    mass = {"hidden": hidden, "ffn": zeros(L, F), "heads": zeros(L, G * hpg), "query_groups": zeros(L, G)}
    layer_mass = zeros(L)
    for i in range(L):
        p = {k.split(f"decoder.layers.{i}.")[1]: v for k, v in sq.items() if k.startswith(f"decoder.layers.{i}.")}
        qkv, proj = p["self_attention.linear_qkv.weight"], p["self_attention.linear_proj.weight"]
        fc1, fc2 = p["mlp.linear_fc1.weight"], p["mlp.linear_fc2.weight"]
        hidden += p["input_layernorm.weight"] + p["pre_mlp_layernorm.weight"] + qkv.sum(0) + fc1.sum(0)
        hidden += p.get("input_layernorm.bias", 0) + p.get("pre_mlp_layernorm.bias", 0)
        hidden += proj.sum(1) + fc2.sum(1)
        up_rows = fc1.sum(1).reshape(-1, F).sum(0)  # [gate; up] rows of a neuron, or its up row
        mass["ffn"][i] = up_rows + fc2.sum(0)
        per_row = qkv.sum(1).reshape(G, hpg + 2, d).sum(-1)
        heads = per_row[:, :hpg].reshape(-1) + proj.sum(0).reshape(G * hpg, d).sum(-1)
        mass["heads"][i] = heads
        mass["query_groups"][i] = heads.reshape(G, hpg).sum(-1) + per_row[:, hpg:].sum(-1)
        layer_mass[i] = sum(v.double().square().sum() for k, v in w.items() if k.startswith(f"decoder.layers.{i}."))
    dropped = torch.argsort(layer_mass)[: L - new.num_layers].tolist()
    out = prune(str(ckpt), str(imp), str(tmp_path / "magnitude"), target=target, order="magnitude")
    _check_pruned(ckpt, out, expected_kept(mass, old, new, dropped))
    if kind != "llama":
        return  # random scores do not depend on the family

    # random: every unit's score is a uniform draw of torch's generator seeded with --seed,
    # axis after axis (hidden channels, each layer's neurons, heads, query groups, then one
    # per layer); the lowest-scored layers go
    g = torch.Generator().manual_seed(7)
    draws = {"hidden": torch.rand(old.hidden_size, generator=g), "ffn": torch.rand(L, F, generator=g),
             "heads": torch.rand(L, G * hpg, generator=g), "query_groups": torch.rand(L, G, generator=g)}
    dropped = torch.argsort(torch.rand(L, generator=g))[: L - new.num_layers].tolist()
    out = prune(str(ckpt), str(imp), str(tmp_path / "random"), target=target, order="random", seed=7)
    _check_pruned(ckpt, out, expected_kept(draws, old, new, dropped))


def test_budget_prunes_to_a_shape_within_the_budget(scored, tmp_path):
    """--target-params: the pruned model (counted from its tensors) meets the budget within
    the planner's 5%; width-first keeps every layer, depth-first cuts layers."""
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.prune.api import prune

    ckpt, imp = scored("llama")
    old = read_info(ckpt).description
    for prefer in ("width", "depth"):
        out = prune(str(ckpt), str(imp), str(tmp_path / prefer), target_params="200K", prefer=prefer,
                    layer_metric="loss")
        _, after = _state(out)
        count = sum(t[: old.vocab_size].numel() if k.startswith(("embedding.", "output_layer.")) else t.numel()
                    for k, t in after.items())
        assert abs(count - 200_000) <= 0.05 * 200_000, (prefer, count)
        shape = shape_from_weights(after, old.head_dim)
        assert (shape["layers"] == 4) == (prefer == "width"), (prefer, shape)


def test_layer_choice(scored, layer_reference):
    """greedy, contiguous, loss, block (and auto, by the target) choose the layers that the
    definitions (layers deleted from the HF model; cosines of HF layer inputs and outputs)
    say; explicit lists; mistakes are one-line errors."""
    from nemo_minitron.errors import UsageError
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.prune.select import layers_to_keep

    ckpt, imp = scored("llama")
    ref = layer_reference("llama")
    scores = ImportanceScores.load(imp)
    old = read_info(ckpt).description
    for keep in (3, 2):
        new = old.replace(num_layers=keep)
        drop = 4 - keep
        want = {"contiguous": ref["blocks"][drop]["layers"], "loss": _lowest(ref["loss_drop"], drop),
                "block": _lowest(ref["block_importance"], drop),
                "greedy": sorted(e["layer"] for e in ref["greedy"][:drop])}
        for metric, dropped in want.items():
            kept = layers_to_keep(old, new, metric, scores.summary, scores.tensors)
            assert kept == [i for i in range(4) if i not in dropped], (metric, keep, ref)
    new = old.replace(num_layers=2)
    # auto: greedy's set when only layers are cut, the contiguous block when width is cut too
    # (the two sets differ on this model, or the check could not fail)
    assert want["greedy"] != want["contiguous"], ref
    assert layers_to_keep(old, new, "auto", scores.summary, scores.tensors) == [
        i for i in range(4) if i not in want["greedy"]]
    assert layers_to_keep(old, new.replace(ffn_hidden_size=old.ffn_hidden_size // 2), "auto", scores.summary,
                          scores.tensors) == [i for i in range(4) if i not in want["contiguous"]]
    assert layers_to_keep(old, new, "3,0", scores.summary, scores.tensors) == [1, 2]
    assert layers_to_keep(old, old, "contiguous", {}, scores.tensors) == [0, 1, 2, 3]
    sets = scores.summary["layers"]["drop_sets"]["2"]
    # `want` holds the four sets of 2 layers from the reference (last loop pass)
    assert layers_to_keep(old, new, "best", scores.summary, scores.tensors) == [
        i for i in range(4) if i not in want[sets["best"]]]
    assert sets[sets["best"]]["loss"] == min(sets[m]["loss"] for m in ("contiguous", "greedy", "loss", "block"))
    for metric, words in (("1", "drops 1 layers but the target removes 2; set layers=3"),
                          ("1,9", "layers must be in 0..3"),
                          ("first", "--layer-metric must be auto, greedy, best, contiguous, loss, block")):
        with pytest.raises(UsageError, match=words):
            layers_to_keep(old, new, metric, scores.summary, scores.tensors)
    with pytest.raises(UsageError, match="no best contiguous block of 3 layers; rerun importance with --drop-blocks 3"):
        layers_to_keep(old, old.replace(num_layers=1), "contiguous", scores.summary, scores.tensors)
    with pytest.raises(UsageError, match="has not compared layer sets of 3 layers; rerun importance with --drop-blocks 3"):
        layers_to_keep(old, old.replace(num_layers=1), "best", scores.summary, scores.tensors)
    with pytest.raises(UsageError, match="removed 2 layers greedily, the target removes 3; rerun importance with "
                                         "--drop-blocks 3"):
        layers_to_keep(old, old.replace(num_layers=1), "greedy", scores.summary, scores.tensors)
    # a directory written before greedy elimination existed: the other metrics still work
    older = json.loads(json.dumps(scores.summary))
    del older["layers"]["greedy"]
    for sets_k in older["layers"]["drop_sets"].values():
        sets_k.pop("greedy")
    assert layers_to_keep(old, new, "contiguous", older, scores.tensors) == [
        i for i in range(4) if i not in want["contiguous"]]
    with pytest.raises(UsageError, match="removed 0 layers greedily"):
        layers_to_keep(old, new, "greedy", older, scores.tensors)


@pytest.mark.multirank
def test_prune_at_tp2_and_pp2_equals_tp1(scored, tmp_path):
    """Hidden, ffn, whole query groups, heads inside groups and layers, by importance and by
    magnitude (its scores reduced over ranks), pruned on models loaded at TP=2 and at PP=2:
    exactly the TP=1 weights. The worker also counts the parameters held across ranks."""
    from nemo_minitron.prune.api import prune

    jobs = []
    for name, kind, target, order, metric in (
            # layer 1 goes: at PP=2 the new model is built with stages of 1 and 2 layers, saved,
            # and reloaded balanced (2 and 1) for the parameter count
            ("groups", "llama_tied", {"hidden": 48, "ffn": 64, "query_groups": 2, "layers": 3}, "importance", "1"),
            ("heads", "llama", {"hidden": 40, "ffn": 48, "heads": 2, "layers": 3}, "magnitude", "contiguous"),
            # squared-ReLU MLP (fc1 without a gate, gathered and re-sliced whole), LayerNorm biases
            ("nemotron", "nemotron", {"hidden": 48, "ffn": 48, "heads": 2}, "magnitude", "loss"),
            # heads inside groups with QK-norm (replicated, never cut); drop layer 0 (stage 0 keeps 1)
            ("qwen3", "qwen3", {"hidden": 48, "heads": 2, "layers": 2}, "importance", "0")):
        ckpt, imp = scored(kind)
        jobs.append({"name": name, "checkpoint": str(ckpt), "importance": str(imp), "target": target,
                     "order": order, "layer_metric": metric, "seed": 1234})
    expected = {}
    for job in jobs:
        args = {k: v for k, v in job.items() if k not in ("name", "checkpoint", "importance")}
        expected[job["name"]] = _state(prune(job["checkpoint"], job["importance"],
                                             str(tmp_path / f"tp1-{job['name']}"), **args))[1]
    out = tmp_path / "out"
    for job in jobs:
        job["out"] = str(out / f"{{layout}}-{job['name']}")
    (tmp_path / "jobs.json").write_text(json.dumps({"layouts": {"tp2": [2, 1], "pp2": [1, 2]}, "jobs": jobs}))
    run_workers("prune_parallel.py", tmp_path / "jobs.json", out=out)
    for layout in ("tp2", "pp2"):
        for job in jobs:
            _, got = _state(job["out"].format(layout=layout))
            want = expected[job["name"]]
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want), (layout, job["name"])


# ---------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def weightless(scored, tmp_path_factory):
    """The tiny llama checkpoint with an empty weights/ directory: any prune that got as far
    as loading weights would fail differently, so these errors prove nothing was loaded."""
    ckpt, imp = scored("llama")
    copy = tmp_path_factory.mktemp("weightless") / "ckpt"
    copy.mkdir()
    shutil.copy(ckpt / "nemo_minitron.json", copy)
    shutil.copytree(ckpt / "tokenizer", copy / "tokenizer")
    (copy / "weights").mkdir()
    return copy, imp


def _another_models_scores(ckpt: Path, directory: Path) -> Path:
    from nemo_minitron.checkpoint.store import read_info

    directory.mkdir()
    synthetic_scores(read_info(ckpt).description.replace(hidden_size=48), directory, seed=0)
    return directory


@pytest.mark.parametrize("target", [{"ffn": 64, "layers": 3}, {"layers": 3}])
def test_default_layer_metric_serves_a_default_importance_run(scored, tmp_path, caplog, target):
    """A default importance run (no --drop-blocks) records neither contiguous blocks nor a
    greedy order: the default prune (auto) drops the layers whose removal raised the loss
    least, says which rule it used and why, and names and records the layers it dropped."""
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.prune.api import prune

    ckpt, imp = scored("llama")
    default_run = tmp_path / "imp"
    shutil.copytree(imp, default_run)
    summary = json.loads((default_run / "summary.json").read_text())
    summary["layers"].update(contiguous_blocks={}, drop_sets={}, greedy={"order": [], "loss": [], "candidates": []})
    (default_run / "summary.json").write_text(json.dumps(summary))
    with caplog.at_level("INFO", logger="nemo_minitron"):
        out = prune(str(ckpt), str(default_run), str(tmp_path / "pruned"), target=target)
    dropped = _lowest(ImportanceScores.load(default_run)["layer_loss_drop"].tolist(), 1)
    provenance = json.loads((out / "nemo_minitron.json").read_text())["provenance"]
    assert provenance["dropped_layers"] == {"numbered_from_1": [dropped[0] + 1], "numbered_from_0": dropped}
    assert provenance["kept"]["layers"] == [i for i in range(4) if i not in dropped]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("dropping layers"))
    assert line.startswith(f"dropping layers {dropped[0] + 1} (numbered from 1") and \
        f"decoder.layers.{{{dropped[0]}}}" in line
    assert "--layer-metric auto: loss" in line and "importance --drop-blocks 1 records it" in line


def test_a_shape_llamaconfig_refuses_is_said_when_pruning(scored, tmp_path, caplog):
    """Valid shapes are those megatron-core builds and a transformers class of the family
    holds. LlamaConfig refuses a hidden size that is not a multiple of the heads; Mistral
    holds it and computes the same function: prune says so before any weight is cut, and
    the export writes it so without a warning."""
    import logging

    from nemo_minitron.checkpoint.api import export
    from nemo_minitron.prune.api import prune

    ckpt, imp = scored("llama")
    caplog.clear()
    with caplog.at_level("INFO", logger="nemo_minitron"):
        out = prune(str(ckpt), str(imp), str(tmp_path / "pruned"), target={"hidden": 62})
    messages = [r.getMessage() for r in caplog.records]
    note = next(i for i, m in enumerate(messages) if "LlamaConfig refuses this shape" in m)
    assert "MistralForCausalLM" in messages[note] and "not a multiple of the number of attention heads" in \
        messages[note]
    assert note < next(i for i, m in enumerate(messages) if m.startswith("saved checkpoint"))
    caplog.clear()
    with caplog.at_level("INFO", logger="nemo_minitron"):
        hf = export(str(out), str(tmp_path / "hf"))
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("flags, words", [
    (["--target", "hidden=100"], "--target: hidden=100 is larger than the original model's 64"),
    (["--target", "heads=3"], "--target: heads=3 is not a multiple of query_groups=2"),
    (["--target", "query_groups=1", "--tp", "2"], "--target: query_groups=1 is not divisible by --tp 2"),
    (["--target", "ffn=95", "--tp", "2"], "--target: ffn=95 is not divisible by --tp 2"),
    (["--target-params", "10K"], "--target-params 10K: no architecture within 5%"),
    (["--target", "hidden=32", "OTHER"], "--importance scores were computed on another model (hidden_size 48 vs 64)"),
])
def test_bad_input_is_one_line_before_any_weight_is_read(weightless, tmp_path, capsys, flags, words):
    ckpt, imp = weightless
    if "OTHER" in flags:
        flags, imp = flags[:-1], _another_models_scores(ckpt, tmp_path / "other")
    out = tmp_path / "out"
    start = time.time()
    code, stderr = cli_in_process(capsys, "prune", ckpt, "--importance", imp, "--out", out, *flags)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("nemo-minitron prune: error: ") and words in stderr, stderr
    assert not out.exists() and time.time() - start < 30


def test_more_bad_input_before_any_weight_is_read(weightless, tmp_path):
    from nemo_minitron.errors import UsageError
    from nemo_minitron.prune.api import prune

    ckpt, imp = weightless
    summary = json.loads((imp / "summary.json").read_text())
    no_blocks = tmp_path / "no_blocks"
    shutil.copytree(imp, no_blocks)
    summary["layers"]["contiguous_blocks"] = {}
    summary["layers"].pop("greedy", None)
    no_moments = tmp_path / "no_moments"
    shutil.copytree(imp, no_moments)
    (no_moments / "second_moments.safetensors").unlink(missing_ok=True)
    (no_blocks / "summary.json").write_text(json.dumps(summary))
    for kwargs, words in (
            ({"target": {"hidden": 32}, "order": "largest"}, "--order must be one of importance, magnitude, random"),
            ({"target": {"layers": 3}, "importance": no_blocks, "layer_metric": "contiguous"},
             "no best contiguous block of 1 layers"),
            ({"target": {"layers": 3}, "importance": no_blocks, "layer_metric": "greedy"},
             "greedy: the importance run removed 0 layers greedily"),
            ({"target": {"hidden": 32}, "layer_metric": "2"}, "drops 1 layers but the target removes 0"),
            ({"target": {"layers": 2}, "layer_metric": "0,1", "pp": 2},
             "--pp 2: pipeline stage 0 holds layers 0..1, all of which are dropped; prune with --pp 1"),
            ({"target": {"layers": 3}, "target_params": "200K"}, "exactly one of a target and a budget"),
            ({"target": {"ffn": 64}, "tp": 2}, "does not divide the world size 1"),
            ({"target": {"ffn": 64}, "refit": True, "importance": no_moments}, "--refit: '"),
            ({"target": {"ffn": 64}, "refit": True, "order": "random"}, "--refit needs --order importance")):
        importance = kwargs.pop("importance", imp)
        with pytest.raises(UsageError, match=re.escape(words)):
            prune(str(ckpt), str(importance), str(tmp_path / "out"), **kwargs)
        assert not (tmp_path / "out").exists()


def test_expert_targets_bad_input_before_any_weight_is_read(weightless, scored, tmp_path, capsys):
    """Mixtures of experts: more experts than the model has, top-k above the experts kept
    (given, or the model's own top-2 left above one expert), expert widths the TP size does
    not divide, dense axes on an MoE model and expert axes on a dense one, the dense-only
    refit: one line, exit 2, nothing written, no weight read (the checkpoints have none)."""
    ckpt, imp = scored("qwen3_moe")
    moe = tmp_path / "moe"
    moe.mkdir()
    shutil.copy(ckpt / "nemo_minitron.json", moe)
    shutil.copytree(ckpt / "tokenizer", moe / "tokenizer")
    (moe / "weights").mkdir()
    dense, dense_imp = weightless
    out = tmp_path / "out"
    for model, scores, flags, words in (
            (moe, imp, ["--target", "experts=5"], "--target: experts=5 is larger than the original model's 4"),
            (moe, imp, ["--target", "top_k=3"], "--target: top_k=3 is larger than the original model's 2"),
            (moe, imp, ["--target", "experts=1"],  # the model's own top-2
             "--target: top_k=2 is larger than the 1 experts kept; lower top_k too (top_k=1..1)"),
            (moe, imp, ["--target", "top_k=1"], "--target: top_k=1: this qwen3_moe model renormalises its top-k "
                                                 "probabilities"),
            (moe, imp, ["--target", "moe_ffn=25", "--tp", "2"], "--target: moe_ffn=25 is not divisible by --tp 2"),
            (moe, imp, ["--target", "ffn=32"], "--target: ffn: this qwen3_moe model has no dense MLP; prune moe_ffn"),
            (moe, imp, ["--target", "shared_ffn=32"], "--target: shared_ffn: this qwen3_moe model has no shared"),
            (moe, imp, ["--target", "experts=2", "--refit"], "--refit refits dense MLPs and attention; this "
                                                             "qwen3_moe model has experts"),
            (dense, dense_imp, ["--target", "moe_ffn=32"],
             "--target: moe_ffn applies to mixtures of experts; this llama model has a dense MLP (prune ffn)")):
        code, stderr = cli_in_process(capsys, "prune", model, "--importance", scores, "--out", out, *flags)
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert stderr.startswith("nemo-minitron prune: error: ") and words in stderr, (flags, stderr)
        assert not out.exists()
    code, stderr = cli_in_process(capsys, "importance", moe, "--data", "builtin:calib", "--out", out,
                                  "--second-moments")
    assert code == 2 and "--second-moments (for prune --refit) is for dense MLPs" in stderr, stderr


def test_refit_is_the_default_where_it_applies(scored, tmp_path, caplog):
    """The default importance run of a small dense model stores its second moments (auto) and
    the default prune refits from them: the pruned second MLP linears are not the plain cut
    (refit=False), and the provenance says refit. Auto does not refit, and says why, without
    second moments, under --order random, or from fewer calibration tokens than the widest
    matrix has columns (the fit would be exact on those tokens)."""
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.prune.api import prune

    ckpt, imp = scored("llama")
    assert (imp / "second_moments.safetensors").is_file()  # CALIBRATION passes no second_moments: auto
    target = {"ffn": 64}
    runs = {}
    for name, kwargs in (("auto", {}), ("plain", {"refit": False})):
        caplog.clear()
        runs[name] = prune(str(ckpt), str(imp), str(tmp_path / name), target=target, **kwargs)
    assert read_info(runs["auto"]).provenance["refit"] is True
    assert read_info(runs["plain"]).provenance["refit"] is False
    _, auto = _state(runs["auto"])
    _, plain = _state(runs["plain"])
    for name in plain:
        if name.endswith("linear_fc2.weight"):
            assert not torch.equal(auto[name], plain[name]), name
        else:  # nothing else reads a removed neuron
            assert torch.equal(auto[name], plain[name]), name

    no_moments = tmp_path / "no_moments"
    shutil.copytree(imp, no_moments)
    (no_moments / "second_moments.safetensors").unlink()
    few_tokens = tmp_path / "few_tokens"
    shutil.copytree(imp, few_tokens)
    summary = json.loads((few_tokens / "summary.json").read_text())
    summary["tokens"] = read_info(ckpt).description.ffn_hidden_size - 1
    (few_tokens / "summary.json").write_text(json.dumps(summary))
    for name, importance, kwargs, why in (
            ("none", no_moments, {}, "holds no second moments"),
            ("random", imp, {"order": "random"}, "--order random"),
            ("few", few_tokens, {}, f"from {summary['tokens']} calibration tokens, fewer than the")):
        caplog.clear()
        out = prune(str(ckpt), str(importance), str(tmp_path / name), target=target, **kwargs)
        assert read_info(out).provenance["refit"] is False, name
        said = [r.getMessage() for r in caplog.records if "refit auto: off" in r.getMessage()]
        assert len(said) == 1 and why in said[0], (name, said)


def test_refit_warns_when_fewer_calibration_tokens_than_columns(tmp_path, caplog):
    """With fewer calibration tokens than a Gram matrix has columns the least-squares refit
    is exact on those tokens and generalises badly (measured: worse than no refit); say so."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from nemo_minitron.importance.scores import SECOND_MOMENTS_FILE
    from nemo_minitron.prune.api import _second_moments

    save_file({"fc2_gram": torch.eye(24).expand(2, 24, 24).contiguous(),
               "proj_gram": torch.eye(16).expand(2, 16, 16).contiguous()}, str(tmp_path / SECOND_MOMENTS_FILE))
    names = {"refit": "--refit"}.get
    for tokens, warned in ((23, True), (24, False)):
        caplog.clear()
        grams = _second_moments(str(tmp_path), SimpleNamespace(summary={"tokens": tokens}), names)
        assert set(grams) == {"fc2_gram", "proj_gram"}
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert bool(said) == warned, (tokens, said)
        if warned:
            assert "23 calibration tokens" in said[0] and "24 columns" in said[0], said
