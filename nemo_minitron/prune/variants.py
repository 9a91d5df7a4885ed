"""Per-layer block variants (Puzzle-style): what each layer's attention and MLP may become,
and what one layer of a given shape costs.

Every layer may keep its attention, keep it with fewer K/V groups (the query heads stay:
the heterogeneous format fixes the head count model-wide, so each remaining K/V group
serves more query heads), or lose it; and keep its MLP, narrow it to one of a few widths,
or lose it. The same options are offered at every layer; the scores (importance/blocks.py)
and the budget (prune/per_layer.py) choose among them.

Initialisation from the parent, shared by the scoring and the pruning so that what was
scored is what is built:
- a narrower MLP keeps its most important neurons (``select.top`` of the ``ffn`` scores);
- fewer K/V groups: the parent's groups, ranked by their ``query_groups`` scores, are cut
  into consecutive runs of G/g groups (the most important groups merge together); each run
  becomes one group whose K and V (weights and biases) are the mean of the run's, serving
  the run's query heads. Runs are numbered by their lowest original group, so keeping every
  group is the identity.
"""

from __future__ import annotations

import dataclasses

import torch

from nemo_minitron.errors import require
from nemo_minitron.model.description import LayerShape, ModelDescription, layer_costs
from nemo_minitron.prune.select import top


@dataclasses.dataclass(frozen=True)
class BlockVariants:
    """The options every layer has: K/V groups of its attention and widths of its MLP, the
    parent's first, 0 (removed) last."""

    query_groups: tuple[int, ...]
    ffn: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"query_groups": list(self.query_groups), "ffn": list(self.ffn)}

    @classmethod
    def from_dict(cls, data: dict) -> "BlockVariants":
        return cls(tuple(int(g) for g in data["query_groups"]), tuple(int(f) for f in data["ffn"]))


def ffn_widths(parent: int, count: int, multiple: int) -> list[int]:
    """``count`` widths evenly spaced below ``parent``, each rounded to a multiple of
    ``multiple`` (the export format's ffn_mult rounds to 256), without repeats, 0 or the parent."""
    widths = {multiple * round(parent * k / (count + 1) / multiple) for k in range(1, count + 1)}
    return sorted((w for w in widths if 0 < w < parent), reverse=True)


def block_variants(desc: ModelDescription, ffn_count: int, ffn_multiple: int) -> BlockVariants:
    """The options for ``desc``'s layers: every smaller divisor of its K/V groups, the MLP
    widths of ``ffn_widths``, and removal of either."""
    require(not desc.is_moe and not desc.is_hybrid, f"per-layer variants are for dense transformer models; this "
                                                    f"{desc.architecture} model has "
                                                    + ("experts" if desc.is_moe else "Mamba layers"))
    G = desc.num_query_groups
    groups = [G] + [g for g in range(G - 1, 0, -1) if G % g == 0] + [0]
    return BlockVariants(tuple(groups), tuple([desc.ffn_hidden_size] + ffn_widths(desc.ffn_hidden_size, ffn_count,
                                                                                  ffn_multiple) + [0]))


def merged_groups(group_scores: torch.Tensor, groups: int) -> list[list[int]]:
    """The parent's groups (original indices) that make each of ``groups`` new K/V groups
    (see the module doc): runs of the importance ranking, each run ascending, runs ordered
    by their first group."""
    G = len(group_scores)
    assert groups >= 1 and G % groups == 0, (G, groups)
    ranked = torch.argsort(group_scores.double(), descending=True, stable=True).tolist()
    size = G // groups
    runs = [sorted(ranked[k * size:(k + 1) * size]) for k in range(groups)]
    return sorted(runs)


def kept_neurons(ffn_scores: torch.Tensor, width: int) -> torch.Tensor:
    """The neurons a layer's MLP of ``width`` keeps, ascending."""
    return top(ffn_scores, width)


# ---------------------------------------------------------------------- costs
def layer_parameters(desc: ModelDescription, shape: LayerShape) -> int:
    """Parameters of one layer of ``shape`` as the exported model counts them (a removed
    attention or MLP takes its norm along)."""
    return layer_costs(desc, shape).parameters


def layer_flops_per_token(desc: ModelDescription, shape: LayerShape, context: int) -> int:
    """Forward FLOPs per token of one layer of ``shape``, attention over ``context`` tokens."""
    return layer_costs(desc, shape, context).flops_per_token


def layer_kv_bytes_per_token(desc: ModelDescription, shape: LayerShape, bytes_per_element: int = 2) -> int:
    return layer_costs(desc, shape, bytes_per_element=bytes_per_element).kv_cache_bytes_per_token


def fixed_parameters(desc: ModelDescription) -> int:
    """Parameters outside the layers: embeddings, output layer, final norm."""
    return desc.embedding_parameters() + desc.norm_parameters(desc.hidden_size)
