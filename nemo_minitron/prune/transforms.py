"""Cut canonical (TP=1) weight tensors down to the kept units. Pure tensor code.

Layouts (see model/params.py): ``linear_qkv`` rows are [group][q_0..q_{hpg-1}, k, v] x
head_dim; ``linear_proj`` columns are [group][q_0..q_{hpg-1}] x head_dim; ``linear_fc1``
rows are [gate; up] (gated MLPs) or the neurons (squared ReLU, no gate); the residual
stream (hidden) is the input dimension of qkv and fc1, the output dimension of proj and
fc2, the embedding and output-layer columns, and every norm over it (weights and
LayerNorm biases). The QK-norms (``q_layernorm``/``k_layernorm``) run over head_dim,
shared by every head, so no pruning axis cuts them.
"""

from __future__ import annotations

import torch

from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.params import layer_of
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


def prune_tensor(name: str, full: torch.Tensor, old: ModelDescription, keep: KeepPlan,
                 old_layer: int | None) -> torch.Tensor:
    """The kept part of the canonical tensor ``name`` (``old_layer``: its original layer)."""
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
    if suffix == "mlp.linear_fc1.weight":
        rows = keep.ffn[old_layer]
        if not old.gated:
            return full[rows][:, h]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate[rows], up[rows]], dim=0)[:, h]
    if suffix == "mlp.linear_fc2.weight":
        return full[h][:, keep.ffn[old_layer]]
    raise KeyError(name)


def magnitudes(name: str, full: torch.Tensor, desc: ModelDescription) -> dict[str, torch.Tensor]:
    """Squared-L2 weight mass per unit that this tensor contributes (for --order magnitude).

    Keys: "hidden" [H] for any tensor touching the residual stream; per-layer "ffn" [F],
    "heads" [heads], "query_groups" [groups]. A zero-centred norm weight counts as the
    gamma it applies (weight + 1); the QK-norms belong to no unit."""
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
    if name.endswith("linear_fc1.weight"):
        if not desc.gated:
            return {"hidden": w.sum(0), "ffn": w.sum(1)}
        gate, up = w.chunk(2, dim=0)
        return {"hidden": w.sum(0), "ffn": gate.sum(1) + up.sum(1)}
    if name.endswith("linear_fc2.weight"):
        return {"hidden": w.sum(1), "ffn": w.sum(0)}
    return {}
