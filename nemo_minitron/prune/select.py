"""Which units to keep: top-ranked by importance, by weight magnitude, or at random.

Every kept index list is returned in ascending original order, so pruning to the
original sizes keeps every weight where it was (the identity), and relative order
(RoPE positions inside a head, channel order) never changes.

Per layer, query groups are ranked by their ``query_groups`` score and heads inside
each kept group by their own score, so every group keeps the same number of heads
(GQA stays balanced). Mixtures of experts: experts are ranked per layer, then each kept
expert's neurons by that expert's own scores (every expert keeps the same number), and
the shared expert's neurons like a dense MLP's; a kept expert keeps its place in the
original order (and its router row). Hybrid models: each layer keeps the units of its
kind (attention heads and groups, MLP neurons, or Mamba heads and head channels); Mamba
heads are ranked within each B/C group and every group keeps the same number (ModelOpt's
``MambaNumHeadsHp``), head channels by one ranking per layer shared by all its heads.
``magnitude`` scores a unit by the squared L2 norm of every
weight it owns (a neuron: its gate and up rows, or its up row without a gate, and its
down column; a head: its query rows and output-projection columns; a group: its heads,
key and value rows; a channel: its column or row in every matrix, norm and embedding; a
layer: all its weights); ``random`` by a seeded permutation. Both are baselines.

Layers to drop (``--layer-metric``):
    auto        greedy when the target cuts only layers, contiguous when it cuts width too
                (benchmarks/pruning_quality.py: greedy wins depth-only cuts, but its sets,
                chosen on the full-width model, lose to the contiguous block once hidden,
                ffn and heads are cut as well); when the importance run did not record
                that (its ``--drop-blocks`` did not include the number of layers dropped),
                loss, which every run records: the default importance run then serves the
                default prune, and prune's log says which rule it used and why
    greedy      the first layers removed by the importance run's greedy elimination
                (``summary["layers"]["greedy"]["order"]``, recorded down to the largest
                ``--drop-blocks`` size)
    best        of the contiguous, greedy, loss and block sets for that many layers, the
                one whose removal cost least on the importance run's samples
                (``summary["layers"]["drop_sets"]``, recorded for every ``--drop-blocks`` size)
    contiguous  the best contiguous block of that many layers recorded by the importance
                run (``summary["layers"]["contiguous_blocks"]``). When the run did not
                record that block size this is an error telling the user to rerun
                importance with ``--drop-blocks k`` or to choose ``loss``/``block``: a
                silent fallback would hide that the chosen rule was not applied (the
                same for ``greedy`` and ``best``).
    loss        the layers whose removal raised the LM loss least (``layer_loss_drop``)
    block       the lowest Block Importance (``layer_block_importance``)
    3,7,9       exactly these layers (original numbering)
A hybrid target that fixes the layers kept of each kind (``mamba_layers``,
``attention_layers``, ``mlp_layers``) drops, with ``loss``/``block`` (and the baselines),
the lowest-scored layers of each kind; with ``greedy`` the first layers of each kind in the
greedy order (an approximation: the elimination itself did not know the counts); ``auto``
is greedy for a depth-only cut, else loss; a block (``contiguous``, ``best``) cannot honour
such counts and is refused, and an explicit list must have them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from nemo_minitron.errors import UsageError, require
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.hybrid import ATTENTION, LAYER_KINDS, MAMBA, MLP, MOE, kept_pattern, kind_counts
from nemo_minitron.prune.config import LAYER_METRICS


@dataclasses.dataclass
class UnitScores:
    """Scores per axis in the importance directory's layout (higher = keep)."""

    hidden: torch.Tensor          # [H]
    ffn: torch.Tensor             # [L, F]
    heads: torch.Tensor           # [L, heads]
    query_groups: torch.Tensor    # [L, groups]
    layers: torch.Tensor          # [L]
    experts: torch.Tensor | None = None      # [L, E]        mixtures of experts
    moe_ffn: torch.Tensor | None = None      # [L, E, F_moe]
    shared_ffn: torch.Tensor | None = None   # [L, F_shared]
    mamba_heads: torch.Tensor | None = None     # [L, mamba heads]   hybrid models
    mamba_head_dim: torch.Tensor | None = None  # [L, mamba head dim]


@dataclasses.dataclass
class KeepPlan:
    """Kept original indices (ascending) for every axis; per original layer where layers differ."""

    hidden: torch.Tensor
    layers: list[int]                     # original layer index of each new layer
    ffn: dict[int, torch.Tensor]          # original layer -> kept neurons
    groups: dict[int, torch.Tensor]       # original layer -> kept query groups
    heads: dict[int, torch.Tensor]        # original layer -> kept heads (global head index)
    experts: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)     # layer -> kept experts
    moe_ffn: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)     # layer -> [kept experts, neurons]
    shared_ffn: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # layer -> kept shared neurons
    mamba_heads: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)     # layer -> kept Mamba heads
    mamba_head_dim: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # layer -> kept head channels

    def summary(self) -> dict:
        """JSON for the checkpoint's provenance. MLP neurons are stored as hex bit masks
        (``mask_to_indices`` reads them back): an 8B model's index lists would be megabytes."""
        out = {"hidden": self.hidden.tolist(), "layers": list(self.layers),
               "query_groups": {str(k): v.tolist() for k, v in self.groups.items()},
               "heads": {str(k): v.tolist() for k, v in self.heads.items()},
               "ffn_mask": {str(k): indices_to_mask(v) for k, v in self.ffn.items()}}
        if self.experts:
            out["experts"] = {str(k): v.tolist() for k, v in self.experts.items()}
            out["moe_ffn_mask"] = {str(k): [indices_to_mask(row) for row in v] for k, v in self.moe_ffn.items()}
            if self.shared_ffn:
                out["shared_ffn_mask"] = {str(k): indices_to_mask(v) for k, v in self.shared_ffn.items()}
        if self.mamba_heads:
            out["mamba_heads"] = {str(k): v.tolist() for k, v in self.mamba_heads.items()}
            out["mamba_head_dim"] = {str(k): v.tolist() for k, v in self.mamba_head_dim.items()}
        out["sha256"] = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()
        return out


def indices_to_mask(indices: torch.Tensor) -> str:
    """Ascending indices -> hex string of a bit mask (bit i set when unit i is kept)."""
    bits = ["0"] * (int(indices.max()) + 1 if len(indices) else 1)
    for i in indices.tolist():
        bits[-1 - i] = "1"
    return format(int("".join(bits), 2), "x")


def mask_to_indices(mask: str) -> list[int]:
    bits = bin(int(mask, 16))[2:][::-1]
    return [i for i, bit in enumerate(bits) if bit == "1"]


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ascending (ties broken by position, deterministically)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return order[:k].sort().values


def random_scores(desc: ModelDescription, seed: int) -> UnitScores:
    g = torch.Generator().manual_seed(seed)
    L = desc.num_layers
    scores = UnitScores(hidden=torch.rand(desc.hidden_size, generator=g),
                        ffn=torch.rand(L, desc.ffn_hidden_size, generator=g),
                        heads=torch.rand(L, desc.num_attention_heads, generator=g),
                        query_groups=torch.rand(L, desc.num_query_groups, generator=g),
                        layers=torch.rand(L, generator=g))
    if desc.is_moe:  # drawn after the dense axes: a dense model's draws are unchanged
        scores.experts = torch.rand(L, desc.num_experts, generator=g)
        scores.moe_ffn = torch.rand(L, desc.num_experts, desc.moe_ffn_hidden_size, generator=g)
        scores.shared_ffn = torch.rand(L, desc.moe_shared_ffn_hidden_size, generator=g)
    if desc.is_hybrid:  # likewise
        scores.mamba_heads = torch.rand(L, desc.mamba_num_heads, generator=g)
        scores.mamba_head_dim = torch.rand(L, desc.mamba_head_dim, generator=g)
    return scores


def parse_layer_metric(metric: str, num_layers: int, flag: str = "--layer-metric") -> str | list[int]:
    """One of LAYER_METRICS, or an explicit list of layers to drop."""
    if metric in LAYER_METRICS:
        return metric
    try:
        dropped = sorted({int(i) for i in metric.split(",") if i.strip()})
    except ValueError:
        raise UsageError(f"{flag} must be {', '.join(LAYER_METRICS)}, or the layers to drop such as 3,7,9 "
                         f"(got '{metric}')") from None
    require(bool(dropped), f"{flag} '{metric}' names no layers")
    require(all(0 <= i < num_layers for i in dropped),
            f"{flag} {metric}: layers must be in 0..{num_layers - 1}")
    return dropped


def _widths_kept(old: ModelDescription, new: ModelDescription) -> bool:
    """Whether ``new`` differs from ``old`` only in its layers."""
    return new.replace(num_layers=old.num_layers, hybrid_pattern=old.hybrid_pattern) == old


def _lowest_per_kind(pattern: str, scores: torch.Tensor, kinds: dict[str, int]) -> list[int]:
    """The lowest-scored layers of each kind, as many as ``kinds`` (kept counts) removes."""
    dropped = []
    for symbol, keep in kinds.items():
        mine = [i for i, s in enumerate(pattern) if s == symbol]
        order = sorted(mine, key=lambda i: (float(scores[i]), i))
        dropped += order[: len(mine) - keep]
    return dropped


def layers_to_keep(old: ModelDescription, new: ModelDescription, metric: str, summary: dict,
                   layer_scores: dict[str, torch.Tensor] | None = None, flag: str = "--layer-metric",
                   kinds: dict[str, int] | None = None) -> list[int]:
    """Original indices of the kept layers, chosen by ``metric`` (see the module doc);
    ``metric="scores"`` drops the lowest ``layer_scores["scores"]`` (the baselines);
    ``kinds`` (hybrid models): the layers of each kind to keep. Raises before any weight
    is touched."""
    drop = old.num_layers - new.num_layers
    if metric == "scores":
        assert layer_scores is not None
        if kinds is not None:
            dropped = _lowest_per_kind(old.hybrid_pattern, layer_scores["scores"], kinds)
        else:
            dropped = torch.argsort(layer_scores["scores"].double(), stable=True)[:drop].tolist()
        return [i for i in range(old.num_layers) if i not in dropped]
    chosen = parse_layer_metric(metric, old.num_layers, flag)
    if kinds is not None and chosen in ("contiguous", "best"):
        raise UsageError(f"{flag} {chosen}: a block of layers cannot honour the target's layers of each kind "
                         "(mamba_layers, attention_layers, mlp_layers); use greedy, loss or block")
    if isinstance(chosen, list):
        require(len(chosen) == drop, f"{flag} {metric} drops {len(chosen)} layers but the target removes "
                                     f"{drop}; set layers={old.num_layers - len(chosen)} in --target")
        dropped = chosen
        if kinds is not None:
            kept = kind_counts(kept_pattern(old.hybrid_pattern, [i for i in range(old.num_layers) if i not in chosen]))
            require(kept == kinds, f"{flag} {metric} keeps {_kinds_text(kept)}, the target {_kinds_text(kinds)}")
    elif drop == 0:
        dropped = []
    elif chosen == "auto":
        return layers_to_keep(old, new, auto_layer_metric(old, new, summary)[0], summary, layer_scores, flag, kinds)
    elif chosen == "greedy":
        order = summary.get("layers", {}).get("greedy", {}).get("order", [])
        if kinds is not None:  # the first layers of each kind in the greedy order, as many as cut
            left = {s: kind_counts(old.hybrid_pattern)[s] - n for s, n in kinds.items()}
            picked = []
            for i in order:
                if left[old.hybrid_pattern[i]] > 0:
                    left[old.hybrid_pattern[i]] -= 1
                    picked.append(i)
            order = picked
        require(len(order) >= drop, f"{flag} greedy: the importance run removed {len(order)} layers greedily"
                                    + (" of the kinds and numbers the target cuts" if kinds is not None else "")
                                    + f", the target removes {drop}; rerun importance with --drop-blocks "
                                    + (f"above {drop}" if kinds is not None else f"{drop}")
                                    + f" (and --greedy-layers), or use {flag} loss|block")
        dropped = list(order[:drop])
    elif chosen == "best":
        sets = summary.get("layers", {}).get("drop_sets", {})
        require(str(drop) in sets, f"{flag} best: the importance run has not compared layer sets of {drop} "
                                   f"layers; rerun importance with --drop-blocks {drop}, or use {flag} loss|block")
        dropped = list(sets[str(drop)][sets[str(drop)]["best"]]["layers"])
    elif chosen == "contiguous":
        blocks = summary.get("layers", {}).get("contiguous_blocks", {})
        require(str(drop) in blocks, f"{flag} contiguous: the importance run has no best contiguous block "
                                     f"of {drop} layers; rerun importance with --drop-blocks {drop}, or use "
                                     f"{flag} loss|block")
        dropped = list(blocks[str(drop)]["layers"])
    else:
        assert layer_scores is not None
        scores = layer_scores["layer_loss_drop" if chosen == "loss" else "layer_block_importance"]
        if kinds is not None:
            dropped = _lowest_per_kind(old.hybrid_pattern, scores, kinds)
        else:
            dropped = torch.argsort(scores.double(), stable=True)[:drop].tolist()
    return [i for i in range(old.num_layers) if i not in set(dropped)]


def auto_layer_metric(old: ModelDescription, new: ModelDescription, summary: dict) -> tuple[str, str]:
    """What ``auto`` means for this cut (see the module doc), and why, for the log."""
    drop = old.num_layers - new.num_layers
    depth_only = _widths_kept(old, new)
    if old.is_hybrid and not depth_only:
        return "loss", ("the target cuts widths too, and a contiguous block would not cut the numbers of each layer "
                        "kind the target sets: the layers of each kind whose removal raised the loss least")
    preferred, why = ("greedy", "the target cuts only layers") if depth_only else \
        ("contiguous", "the target cuts widths too")
    layers = summary.get("layers", {})
    recorded = len(layers.get("greedy", {}).get("order", [])) >= drop if depth_only else \
        str(drop) in layers.get("contiguous_blocks", {})
    if recorded:
        return preferred, why
    what = "greedy elimination" if depth_only else "best contiguous block"
    return "loss", (f"{why}, but the importance run recorded no {what} of {drop} layers (importance --drop-blocks "
                    f"{drop} records it); the layers whose removal raised the loss least instead")


def _kinds_text(counts: dict[str, int]) -> str:
    # (MoE layers named only where there are some: a dense hybrid's text stays as it was)
    return ", ".join(f"{n} {LAYER_KINDS[s]}" for s, n in counts.items() if n or s != MOE)


def keep_plan(old: ModelDescription, new: ModelDescription, scores: UnitScores, kept_layers: list[int]) -> KeepPlan:
    """The units every kept layer keeps (a hybrid layer: those of its own kind)."""
    hpg_old, hpg_new = old.heads_per_group, new.heads_per_group
    ffn, groups, heads = {}, {}, {}
    mamba_heads, mamba_head_dim = {}, {}
    for layer in kept_layers:
        kind = old.hybrid_pattern[layer] if old.is_hybrid else None
        if kind == MLP or (kind is None and not old.is_moe):
            ffn[layer] = top(scores.ffn[layer], new.ffn_hidden_size)
        if kind in (None, ATTENTION):
            groups[layer] = top(scores.query_groups[layer], new.num_query_groups)
            per_group = scores.heads[layer].reshape(old.num_query_groups, hpg_old)
            heads[layer] = torch.cat([g * hpg_old + top(per_group[g], hpg_new) for g in groups[layer].tolist()])
        if kind == MAMBA:  # every B/C group keeps its best heads, as many in each
            G = old.mamba_num_groups
            per_group = scores.mamba_heads[layer].reshape(G, old.mamba_num_heads // G)
            keep = new.mamba_num_heads // G
            mamba_heads[layer] = torch.cat([g * per_group.shape[1] + top(per_group[g], keep) for g in range(G)])
            mamba_head_dim[layer] = top(scores.mamba_head_dim[layer], new.mamba_head_dim)
    plan = KeepPlan(hidden=top(scores.hidden, new.hidden_size), layers=kept_layers, ffn=ffn, groups=groups,
                    heads=heads, mamba_heads=mamba_heads, mamba_head_dim=mamba_head_dim)
    if old.is_moe:
        for layer in (i for i in kept_layers if not old.is_hybrid or old.hybrid_pattern[i] == MOE):
            plan.experts[layer] = top(scores.experts[layer], new.num_experts)
            plan.moe_ffn[layer] = torch.stack([top(scores.moe_ffn[layer, e], new.moe_ffn_hidden_size)
                                               for e in plan.experts[layer].tolist()])
            if old.moe_shared_ffn_hidden_size:
                plan.shared_ffn[layer] = top(scores.shared_ffn[layer], new.moe_shared_ffn_hidden_size)
    return plan
