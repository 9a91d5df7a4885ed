"""Which architectures a search tries: a few of the planner's candidates that differ from
each other, plus the user's own.

The planner ranks every shape within tolerance of the budget by a fixed rule; its first
rows are near-copies of one another (the same cut, the MLP a grid step wider or
narrower). A search learns most from shapes that differ, so the candidates are taken
from three kinds in turn:

    width   every layer kept; hidden, ffn and/or attention cut (the planner's order)
    depth   every width kept; layers dropped (the planner's order)
    mixed   both; first the depth halfway between the width and depth candidates, the
            most even width cut there (then the planner's order)

and each pick must differ from every earlier one by at least MIN_DISTANCE on some axis
(relative to the original size). Shapes the user lists are added as they are.
"""

from __future__ import annotations

import dataclasses

from nemo_minitron.config import Names
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.prune.plan import Candidate, _why, plan
from nemo_minitron.prune.targets import apply_target
from nemo_minitron.search.config import MIN_DISTANCE, SearchConfig

KINDS = ("width", "depth", "mixed")


@dataclasses.dataclass(frozen=True)
class SearchCandidate:
    name: str                    # c1, c2, ... in the order they were chosen
    description: ModelDescription
    kind: str                    # width | depth | mixed (| identity: nothing cut)
    source: str                  # planner | explicit
    why: str

    def target(self) -> dict[str, int]:
        d = self.description
        return {"hidden": d.hidden_size, "ffn": d.ffn_hidden_size, "heads": d.num_attention_heads,
                "query_groups": d.num_query_groups, "layers": d.num_layers}

    @property
    def directory_name(self) -> str:
        t = self.target()
        return f"{self.name}-h{t['hidden']}-f{t['ffn']}-a{t['heads']}-g{t['query_groups']}-l{t['layers']}"


def kind_of(original: ModelDescription, new: ModelDescription) -> str:
    widths = lambda d: (d.hidden_size, d.ffn_hidden_size, d.num_attention_heads, d.num_query_groups)  # noqa: E731
    width_cut, depth_cut = widths(new) != widths(original), new.num_layers != original.num_layers
    return "mixed" if width_cut and depth_cut else "width" if width_cut else "depth" if depth_cut else "identity"


def distance(original: ModelDescription, a: ModelDescription, b: ModelDescription) -> float:
    """Largest difference of any axis between two shapes, relative to the original size."""
    axes = lambda d: (d.hidden_size, d.ffn_hidden_size, d.num_attention_heads, d.num_query_groups,  # noqa: E731
                      d.num_layers)
    return max(abs(x - y) / o for x, y, o in zip(axes(a), axes(b), axes(original)))


def _mixed_order(original: ModelDescription, mixed: list[Candidate], depth: list[Candidate],
                 all_candidates: list[Candidate]) -> list[Candidate]:
    """Mixed candidates, those nearest to halfway in depth first (ties: the planner's order)."""
    if not mixed:
        return []
    deepest_cut = depth[0].description.num_layers if depth else min(c.description.num_layers for c in all_candidates)
    halfway = (original.num_layers + deepest_cut) / 2
    rank = {id(c): i for i, c in enumerate(mixed)}
    return sorted(mixed, key=lambda c: (abs(c.description.num_layers - halfway), rank[id(c)]))


def choose(original: ModelDescription, ranked: list[Candidate], count: int) -> list[tuple[str, Candidate]]:
    """``count`` candidates of the planner's ranked list, kinds in turn, each at least
    MIN_DISTANCE from the ones before (topped up in the planner's order when too few differ)."""
    by_kind = {k: [c for c in ranked if kind_of(original, c.description) == k] for k in KINDS}
    by_kind["mixed"] = _mixed_order(original, by_kind["mixed"], by_kind["depth"], ranked)
    chosen: list[tuple[str, Candidate]] = []

    def differs(c: Candidate) -> bool:
        return all(distance(original, c.description, d.description) >= MIN_DISTANCE for _, d in chosen)

    found = True
    while len(chosen) < count and found:  # one of each kind per round, while any differs enough
        found = False
        for kind in KINDS:
            pick = next((c for c in by_kind[kind] if differs(c)), None) if len(chosen) < count else None
            if pick is not None:
                by_kind[kind].remove(pick)
                chosen.append((kind, pick))
                found = True
    taken = {id(c) for _, c in chosen}
    for c in ranked:  # too few different shapes: the planner's next ones
        if len(chosen) >= count:
            break
        if id(c) not in taken:
            chosen.append((kind_of(original, c.description), c))
    return chosen


def search_candidates(original: ModelDescription, budget: int, cfg: SearchConfig, *, tp: int = 1, pp: int = 1,
                      names: Names) -> list[SearchCandidate]:
    """The candidates of a search, named c1, c2, ...: the planner's (raises a one-line error
    when no architecture meets the budget) and then the explicit ones not already among them."""
    picked: list[SearchCandidate] = []
    if cfg.candidates:
        ranked = plan(original, budget, cfg.plan_config(), tp=tp, pp=pp, names=names)
        for kind, c in choose(original, ranked, cfg.candidates):
            picked.append(SearchCandidate(f"c{len(picked) + 1}", c.description, kind, "planner", c.why))
    for target in cfg.candidate:
        desc = apply_target(original, dict(target), tp=tp, pp=pp, flag=names("candidate"))
        if any(p.description == desc for p in picked):
            continue
        picked.append(SearchCandidate(f"c{len(picked) + 1}", desc, kind_of(original, desc), "explicit",
                                      _why(original, desc)))
    return picked
