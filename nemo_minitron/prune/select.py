"""Which units to keep: top-ranked by importance, by weight magnitude, or at random.

Every kept index list is returned in ascending original order, so pruning to the
original sizes keeps every weight where it was (the identity), and relative order
(RoPE positions inside a head, channel order) never changes.

Per layer, query groups are ranked by their ``query_groups`` score and heads inside
each kept group by their own score, so every group keeps the same number of heads
(GQA stays balanced). ``magnitude`` scores a unit by the squared L2 norm of every
weight it owns (a neuron: its gate and up rows, or its up row without a gate, and its
down column; a head: its query rows and output-projection columns; a group: its heads,
key and value rows; a channel: its column or row in every matrix, norm and embedding; a
layer: all its weights); ``random`` by a seeded permutation. Both are baselines.

Layers to drop (``--layer-metric``):
    best        of the contiguous, loss and block sets for that many layers, the one whose
                removal cost least on the importance run's samples
                (``summary["layers"]["drop_sets"]``, recorded for every ``--drop-blocks`` size)
    contiguous  the best contiguous block of that many layers recorded by the importance
                run (``summary["layers"]["contiguous_blocks"]``). When the run did not
                record that block size this is an error telling the user to rerun
                importance with ``--drop-blocks k`` or to choose ``loss``/``block``: a
                silent fallback would hide that the paper's best choice was not made.
    loss        the layers whose removal raised the LM loss least (``layer_loss_drop``)
    block       the lowest Block Importance (``layer_block_importance``)
    3,7,9       exactly these layers (original numbering)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from nemo_minitron.errors import UsageError, require
from nemo_minitron.model.description import ModelDescription

LAYER_METRICS = ("contiguous", "best", "loss", "block")


@dataclasses.dataclass
class UnitScores:
    """Scores per axis in the importance directory's layout (higher = keep)."""

    hidden: torch.Tensor          # [H]
    ffn: torch.Tensor             # [L, F]
    heads: torch.Tensor           # [L, heads]
    query_groups: torch.Tensor    # [L, groups]
    layers: torch.Tensor          # [L]


@dataclasses.dataclass
class KeepPlan:
    """Kept original indices (ascending) for every axis; per original layer where layers differ."""

    hidden: torch.Tensor
    layers: list[int]                     # original layer index of each new layer
    ffn: dict[int, torch.Tensor]          # original layer -> kept neurons
    groups: dict[int, torch.Tensor]       # original layer -> kept query groups
    heads: dict[int, torch.Tensor]        # original layer -> kept heads (global head index)

    def summary(self) -> dict:
        """JSON for the checkpoint's provenance. MLP neurons are stored as hex bit masks
        (``mask_to_indices`` reads them back): an 8B model's index lists would be megabytes."""
        out = {"hidden": self.hidden.tolist(), "layers": list(self.layers),
               "query_groups": {str(k): v.tolist() for k, v in self.groups.items()},
               "heads": {str(k): v.tolist() for k, v in self.heads.items()},
               "ffn_mask": {str(k): indices_to_mask(v) for k, v in self.ffn.items()}}
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
    return UnitScores(hidden=torch.rand(desc.hidden_size, generator=g),
                      ffn=torch.rand(L, desc.ffn_hidden_size, generator=g),
                      heads=torch.rand(L, desc.num_attention_heads, generator=g),
                      query_groups=torch.rand(L, desc.num_query_groups, generator=g),
                      layers=torch.rand(L, generator=g))


def parse_layer_metric(metric: str, num_layers: int, flag: str = "--layer-metric") -> str | list[int]:
    """'contiguous' | 'loss' | 'block', or an explicit list of layers to drop."""
    if metric in LAYER_METRICS:
        return metric
    try:
        dropped = sorted({int(i) for i in metric.split(",") if i.strip()})
    except ValueError:
        raise UsageError(f"{flag} must be contiguous, best, loss, block, or the layers to drop such as 3,7,9 "
                         f"(got '{metric}')") from None
    require(bool(dropped), f"{flag} '{metric}' names no layers")
    require(all(0 <= i < num_layers for i in dropped),
            f"{flag} {metric}: layers must be in 0..{num_layers - 1}")
    return dropped


def layers_to_keep(old: ModelDescription, new: ModelDescription, metric: str, summary: dict,
                   layer_scores: dict[str, torch.Tensor] | None = None, flag: str = "--layer-metric") -> list[int]:
    """Original indices of the kept layers, chosen by ``metric`` (see the module doc);
    ``metric="scores"`` drops the lowest ``layer_scores["scores"]`` (the baselines).
    Raises before any weight is touched."""
    drop = old.num_layers - new.num_layers
    if metric == "scores":
        assert layer_scores is not None
        dropped = torch.argsort(layer_scores["scores"].double(), stable=True)[:drop].tolist()
        return [i for i in range(old.num_layers) if i not in dropped]
    chosen = parse_layer_metric(metric, old.num_layers, flag)
    if isinstance(chosen, list):
        require(len(chosen) == drop, f"{flag} {metric} drops {len(chosen)} layers but the target removes "
                                     f"{drop}; set layers={old.num_layers - len(chosen)} in --target")
        dropped = chosen
    elif drop == 0:
        dropped = []
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
        dropped = torch.argsort(scores.double(), stable=True)[:drop].tolist()
    return [i for i in range(old.num_layers) if i not in set(dropped)]


def keep_plan(old: ModelDescription, new: ModelDescription, scores: UnitScores, kept_layers: list[int]) -> KeepPlan:
    hpg_old, hpg_new = old.heads_per_group, new.heads_per_group
    ffn, groups, heads = {}, {}, {}
    for layer in kept_layers:
        ffn[layer] = top(scores.ffn[layer], new.ffn_hidden_size)
        groups[layer] = top(scores.query_groups[layer], new.num_query_groups)
        per_group = scores.heads[layer].reshape(old.num_query_groups, hpg_old)
        heads[layer] = torch.cat([g * hpg_old + top(per_group[g], hpg_new) for g in groups[layer].tolist()])
    return KeepPlan(hidden=top(scores.hidden, new.hidden_size), layers=kept_layers, ffn=ffn, groups=groups,
                    heads=heads)
