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

Hybrid models' Mamba-2 mixers (``model/hybrid.py``; d_inner = heads x head_dim, head h's
channel p at h * head_dim + p): ``in_proj`` keeps the z and x rows of the kept heads' kept
channels, every B and C row (the groups stay whole) and the dt rows of the kept heads, and
the kept hidden columns; ``conv1d`` (weight and bias) the same x channels and every B/C
channel; ``A_log``, ``D``, ``dt_bias`` the kept heads; the gated norm's weight the kept
d_inner channels (its groups shrink with them: every group keeps as many heads);
``out_proj`` the kept hidden rows and d_inner columns. The layer's own norm
(``decoder.layers.{i}.norm``) and the final norm (``decoder.final_norm``) run over hidden.
"""

from __future__ import annotations

import torch

from nemo_minitron.model import hybrid
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.params import expert_of, layer_of
from nemo_minitron.prune.select import KeepPlan

#: norms over head_dim (one per layer for queries, one for keys): never cut
_HEAD_DIM_NORMS = ("self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
                   "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias")
_HIDDEN_NORMS = ("layernorm.weight", "layernorm.bias")  # input, pre-MLP and final norms
_MIXER = "mixer."  # a hybrid model's Mamba-2 mixer


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


def _inner_channels(old: ModelDescription, heads: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """Indices into d_inner (head-major) of the kept heads' kept channels."""
    P = old.mamba_head_dim
    return (heads[:, None] * P + dims[None, :]).flatten()


def _cut_mixer(suffix: str, full: torch.Tensor, old: ModelDescription, heads: torch.Tensor, dims: torch.Tensor,
               h: torch.Tensor) -> torch.Tensor:
    """A Mamba-2 mixer tensor cut to the kept heads, head channels and hidden channels."""
    inner, bc = hybrid.d_inner(old), 2 * hybrid.bc_channels(old)
    x = _inner_channels(old, heads, dims)
    if suffix == "in_proj.weight":  # rows [z, x, B, C, dt]
        rows = torch.cat([x, inner + x, 2 * inner + torch.arange(bc), 2 * inner + bc + heads])
        return full[rows][:, h]
    if suffix in ("conv1d.weight", "conv1d.bias"):  # channels [x, B, C]
        return full[torch.cat([x, inner + torch.arange(bc)])]
    if suffix in ("A_log", "D", "dt_bias"):
        return full[heads]
    if suffix == "norm.weight":
        return full[x]
    if suffix == "out_proj.weight":
        return full[h][:, x]
    raise KeyError(suffix)


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
    if name.startswith(("decoder.final_layernorm.", "decoder.final_norm.")):
        return full[h]
    suffix = name.split(f"decoder.layers.{layer_of(name)}.", 1)[1]
    if suffix in _HEAD_DIM_NORMS:
        return full
    if suffix.startswith(_MIXER):
        heads, dims = keep.mamba_heads[old_layer], keep.mamba_head_dim[old_layer]
        return _cut_mixer(suffix[len(_MIXER):], full, old, heads, dims, h)
    if suffix.endswith(_HIDDEN_NORMS) or suffix == "norm.weight":
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
    if suffix == "mlp.router.expert_bias":  # a sigmoid router's per-expert bias
        return full[keep.experts[old_layer]]
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
    expert's tensor "expert" (a number) and "moe_ffn" [F_moe]; a Mamba mixer's per-layer
    "mamba_heads" [H] and "mamba_head_dim" [P] (a head: its z, x and dt rows, conv
    channels, A_log, D, dt_bias, norm channels and out_proj columns; a head channel: those
    of its z, x, conv, norm and out_proj in every head; B and C belong to no unit). A
    zero-centred norm weight counts as the gamma it applies (weight + 1); the QK-norms
    belong to no unit."""
    if name.endswith(_HEAD_DIM_NORMS):
        return {}
    if desc.zero_centered_gamma and name.endswith("layernorm.weight"):
        full = full + 1
    w = full.detach().double().square()
    d, hpg, G = desc.head_dim, desc.heads_per_group, desc.num_query_groups
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return {"hidden": w.sum(0)}
    if ".mixer." in name:
        return _mixer_magnitudes(name.rsplit(".mixer.", 1)[1], w, desc)
    if name.endswith(_HIDDEN_NORMS) or name.endswith("norm.weight"):  # + a Mamba layer's and the final norm
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
    if name.endswith("router.expert_bias"):
        return {}  # a routing offset, not a weight of the expert's
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


def _mixer_magnitudes(suffix: str, w: torch.Tensor, desc: ModelDescription) -> dict[str, torch.Tensor]:
    """Squared weights ``w`` of one Mamba-2 mixer tensor, per head, head channel and hidden channel."""
    H, P, inner = desc.mamba_num_heads, desc.mamba_head_dim, hybrid.d_inner(desc)

    def per_inner(rows: torch.Tensor) -> dict[str, torch.Tensor]:  # [d_inner] head-major
        grid = rows.reshape(H, P)
        return {"mamba_heads": grid.sum(1), "mamba_head_dim": grid.sum(0)}

    if suffix == "in_proj.weight":  # rows [z, x, B, C, dt]
        rows = w.sum(1)
        out = per_inner(rows[:inner] + rows[inner:2 * inner])
        out["mamba_heads"] = out["mamba_heads"] + rows[-H:]
        return {**out, "hidden": w.sum(0)}
    if suffix in ("conv1d.weight", "conv1d.bias"):  # channels [x, B, C]
        return per_inner(w.reshape(w.shape[0], -1).sum(1)[:inner])
    if suffix in ("A_log", "D", "dt_bias"):
        return {"mamba_heads": w}
    if suffix == "norm.weight":
        return per_inner(w)
    if suffix == "out_proj.weight":
        return {**per_inner(w.sum(0)), "hidden": w.sum(1)}
    raise KeyError(suffix)


def merged_qkv(full: torch.Tensor, old: ModelDescription, runs: list[list[int]]) -> torch.Tensor:
    """``linear_qkv`` (weight or bias) of an attention whose K/V groups are merged: new group
    k holds the query heads of the parent's groups ``runs[k]`` (in that order, bit-equal) and
    the mean of their K and V rows (prune/variants.py)."""
    d, hpg = old.head_dim, old.heads_per_group
    grouped = full.view(old.num_query_groups, hpg + 2, d, *full.shape[1:])
    parts = []
    for run in runs:
        parts += [grouped[g, :hpg].reshape(hpg * d, *full.shape[1:]) for g in run]
        parts.append(grouped[run, hpg].mean(dim=0))      # k
        parts.append(grouped[run, hpg + 1].mean(dim=0))  # v
    return torch.cat(parts)


def merged_proj_columns(old: ModelDescription, runs: list[list[int]]) -> torch.Tensor:
    """``linear_proj`` columns in the query-head order of ``merged_qkv``."""
    hpg = old.heads_per_group
    return _proj_columns(old, torch.tensor([g * hpg + j for run in runs for g in run for j in range(hpg)]))


def per_layer_tensor(suffix: str, full: torch.Tensor, old: ModelDescription, neurons: torch.Tensor | None,
                     runs: list[list[int]] | None) -> torch.Tensor:
    """A layer's canonical tensor (``suffix`` after ``decoder.layers.{i}.``) in its per-layer
    shape: the MLP cut to ``neurons`` (None: all kept), the attention's groups merged by
    ``runs`` (None: kept as they are); the hidden size never changes here."""
    if neurons is not None and suffix in ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight"):
        return _cut_mlp(suffix, full, neurons, torch.arange(old.hidden_size), old.gated)
    if runs is not None and suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        return merged_qkv(full, old, runs)
    if runs is not None and suffix == "self_attention.linear_proj.weight":
        return full[:, merged_proj_columns(old, runs)]
    return full
