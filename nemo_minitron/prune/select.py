"""Which units to keep: top-ranked by importance, by weight magnitude, or at random.

Every kept index list is returned in ascending original order, so pruning to the
original sizes keeps every weight where it was (the identity), and relative order
(RoPE positions inside a head, channel order) never changes.

Per layer, query groups are ranked by their ``query_groups`` score and heads inside
each kept group by their own score, so every group keeps the same number of heads
(GQA stays balanced). ``magnitude`` scores a unit by the squared L2 norm of every
weight it owns (a neuron: its gate and up rows and its down column; a head: its query
rows and output-projection columns; a group: its heads, key and value rows; a channel:
its column or row in every matrix, norm and embedding); ``random`` by a seeded
permutation. Both are baselines.
"""

from __future__ import annotations

import dataclasses

import torch

from nemo_minitron.errors import UsageError, require
from nemo_minitron.model.description import ModelDescription

ORDERS = ("importance", "magnitude", "random")


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
    """Kept original indices (ascending) for every axis; per layer where layers differ."""

    hidden: torch.Tensor
    layers: list[int]                     # original layer index of each new layer
    ffn: dict[int, torch.Tensor]          # original layer -> kept neurons
    groups: dict[int, torch.Tensor]       # original layer -> kept query groups
    heads: dict[int, torch.Tensor]        # original layer -> kept heads (global head index)

    def summary(self) -> dict:
        return {"hidden": self.hidden.tolist(), "layers": self.layers,
                "ffn": {str(k): v.tolist() for k, v in self.ffn.items()},
                "query_groups": {str(k): v.tolist() for k, v in self.groups.items()},
                "heads": {str(k): v.tolist() for k, v in self.heads.items()}}


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


def layers_to_keep(old: ModelDescription, new: ModelDescription, metric: str, summary: dict,
                   layer_scores: torch.Tensor | None = None) -> list[int]:
    """Original indices of the kept layers. ``metric``: contiguous | loss | block | an explicit
    comma-separated list of layers to drop. Raises before any weight is touched."""
    drop = old.num_layers - new.num_layers
    if drop == 0:
        return list(range(old.num_layers))
    layers = summary.get("layers", {})
    if metric == "contiguous":
        blocks = layers.get("contiguous_blocks", {})
        require(str(drop) in blocks, f"--layer-metric contiguous: the importance run has no best contiguous block "
                                     f"of {drop} layers; rerun importance with --drop-blocks {drop}, or use "
                                     "--layer-metric loss|block")
        dropped = set(blocks[str(drop)]["layers"])
    elif metric in ("loss", "block"):
        ranked = layers["ranked_by_loss_drop" if metric == "loss" else "ranked_by_block_importance"]
        dropped = set(ranked[-drop:])
    elif metric == "scores":
        assert layer_scores is not None
        dropped = set(torch.argsort(layer_scores.double(), stable=True)[:drop].tolist())
    else:
        try:
            dropped = {int(i) for i in metric.split(",") if i.strip()}
        except ValueError:
            raise UsageError(f"--layer-metric must be contiguous, loss, block, or layers to drop such as 3,7,9 "
                             f"(got '{metric}')") from None
        require(all(0 <= i < old.num_layers for i in dropped), f"--layer-metric {metric}: layers must be in "
                                                               f"0..{old.num_layers - 1}")
        require(len(dropped) == drop, f"--layer-metric {metric} drops {len(dropped)} layers, the target "
                                      f"removes {drop}")
    return [i for i in range(old.num_layers) if i not in dropped]


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
