"""Cut canonical (TP=1) weight tensors down to the kept units. Pure tensor code.

Layouts (see model/params.py): ``linear_qkv`` rows are [group][q_0..q_{hpg-1}, k, v] x
head_dim; ``linear_proj`` columns are [group][q_0..q_{hpg-1}] x head_dim; ``linear_fc1``
rows are [gate; up] (gated MLPs) or the neurons (squared ReLU, no gate); the residual
stream (hidden) is the input dimension of qkv and fc1, the output dimension of proj and
fc2, the embedding and output-layer columns, and every norm over it (weights and
LayerNorm biases). The QK-norms (``q_layernorm``/``k_layernorm``) run over head_dim,
shared by every head, so no pruning axis cuts them.

Mixtures of experts: the router (``mlp.router.weight``, experts x hidden) keeps the rows
of the kept experts; each kept expert (``mlp.experts.local_experts.{e}``, named here by
its original index) is a SwiGLU MLP cut to its own kept neurons; the shared expert like
a dense MLP, its gate (``gate_weight``, 1 x hidden) over hidden only.
"""

from __future__ import annotations

import torch

from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.params import expert_of, layer_of
from nemo_minitron.prune.select import KeepPlan

#: norms over head_dim (one per layer for queries, one for keys): never cut
_HEAD_DIM_NORMS = ("self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
                   "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias")
_HIDDEN_NORMS = ("layernorm.weight", "layernorm.bias")  # input, pre-MLP and final norms


def _qkv_rows(old: ModelDescription, groups: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Row indices into linear_qkv for the kept groups, their kept query heads, k and v."""
    d, hpg = old.head_dim, old.heads_per_group
    rows_per_group = (hpg + 2) * d
    kept = set(heads.tolist())
    rows = []
    for g in groups.tolist():
        base = g * rows_per_group
        for j in range(hpg):
            if g * hpg + j in kept:
                rows.append(torch.arange(base + j * d, base + (j + 1) * d))
        rows.append(torch.arange(base + hpg * d, base + (hpg + 2) * d))  # k and v
    return torch.cat(rows)


def _proj_columns(old: ModelDescription, heads: torch.Tensor) -> torch.Tensor:
    d = old.head_dim
    return torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads.tolist()])


def _cut_mlp(suffix: str, full: torch.Tensor, neurons: torch.Tensor, h: torch.Tensor, gated: bool) -> torch.Tensor:
    """An MLP's first ([gate; up] or the neurons) or second linear cut to ``neurons`` and channels ``h``."""
    if suffix.endswith("linear_fc2.weight"):
        return full[h][:, neurons]
    if not gated:
        return full[neurons][:, h]
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate[neurons], up[neurons]], dim=0)[:, h]


def prune_tensor(name: str, full: torch.Tensor, old: ModelDescription, keep: KeepPlan,
                 old_layer: int | None) -> torch.Tensor:
    """The kept part of the canonical tensor ``name`` (``old_layer``: its original layer; an
    expert's tensor is named by its original expert index)."""
    h = keep.hidden
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return full[:, h]
    if name.startswith("decoder.final_layernorm."):
        return full[h]
    suffix = name.split(f"decoder.layers.{layer_of(name)}.", 1)[1]
    if suffix in _HEAD_DIM_NORMS:
        return full
    if suffix.endswith(_HIDDEN_NORMS):
        return full[h]
    if suffix == "self_attention.linear_qkv.weight":
        return full[_qkv_rows(old, keep.groups[old_layer], keep.heads[old_layer])][:, h]
    if suffix == "self_attention.linear_qkv.bias":
        return full[_qkv_rows(old, keep.groups[old_layer], keep.heads[old_layer])]
    if suffix == "self_attention.linear_proj.weight":
        return full[h][:, _proj_columns(old, keep.heads[old_layer])]
    if suffix in ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight"):
        return _cut_mlp(suffix, full, keep.ffn[old_layer], h, old.gated)
    if suffix == "mlp.router.weight":
        return full[keep.experts[old_layer]][:, h]
    expert = expert_of(name)
    if expert is not None:
        position = keep.experts[old_layer].tolist().index(expert)
        return _cut_mlp(suffix, full, keep.moe_ffn[old_layer][position], h, old.gated)
    if suffix in ("mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight"):
        return _cut_mlp(suffix, full, keep.shared_ffn[old_layer], h, old.gated)
    if suffix == "mlp.shared_experts.gate_weight":
        return full[:, h]
    raise KeyError(name)


def magnitudes(name: str, full: torch.Tensor, desc: ModelDescription) -> dict[str, torch.Tensor]:
    """Squared-L2 weight mass per unit that this tensor contributes (for --order magnitude).

    Keys: "hidden" [H] for any tensor touching the residual stream; per-layer "ffn" [F],
    "heads" [heads], "query_groups" [groups]; a mixture of experts' per-layer "experts"
    [E] (an expert: its router row and its MLP), "shared_ffn" [F_shared], and for one
    expert's tensor "expert" (a number) and "moe_ffn" [F_moe]. A zero-centred norm weight
    counts as the gamma it applies (weight + 1); the QK-norms belong to no unit."""
    if name.endswith(_HEAD_DIM_NORMS):
        return {}
    if desc.zero_centered_gamma and name.endswith("layernorm.weight"):
        full = full + 1
    w = full.detach().double().square()
    d, hpg, G = desc.head_dim, desc.heads_per_group, desc.num_query_groups
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return {"hidden": w.sum(0)}
    if name.endswith(_HIDDEN_NORMS):
        return {"hidden": w}
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        rows = w.sum(1) if w.dim() == 2 else w
        grouped = rows.reshape(G, hpg + 2, d).sum(-1)                    # [G, hpg + 2]
        out = {"heads": grouped[:, :hpg].reshape(-1), "query_groups": grouped.sum(-1)}
        if w.dim() == 2:
            out["hidden"] = w.sum(0)
        return out
    if name.endswith("linear_proj.weight"):
        heads = w.sum(0).reshape(G * hpg, d).sum(-1)
        return {"hidden": w.sum(1), "heads": heads, "query_groups": heads.reshape(G, hpg).sum(-1)}
    if name.endswith("mlp.router.weight"):
        return {"hidden": w.sum(0), "experts": w.sum(1)}
    if name.endswith("gate_weight"):
        return {"hidden": w.sum(0)}
    axis = "moe_ffn" if expert_of(name) is not None else "shared_ffn" if ".shared_experts." in name else "ffn"
    if name.endswith("linear_fc1.weight"):
        if not desc.gated:
            neurons = w.sum(1)
        else:
            gate, up = w.chunk(2, dim=0)
            neurons = gate.sum(1) + up.sum(1)
        out = {"hidden": w.sum(0), axis: neurons}
    elif name.endswith("linear_fc2.weight"):
        out = {"hidden": w.sum(1), axis: w.sum(0)}
    else:
        return {}
    if axis == "moe_ffn":
        out["expert"] = w.sum()
    return out
