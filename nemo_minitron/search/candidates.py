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

With ``per_layer`` the search adds the uniform MLP-only shape (kind ``mlp-only``): every
layer's MLP cut to the widest width on the planner's grid within the budget, hidden size,
attention and layers the parent's (``plan.mlp_only``). It is the point the per-layer space
shares with the uniform one, so a benchmark can tell the gain of choosing per layer from
that of keeping the hidden size. Then it tries per-layer architectures, chosen under the same
budget by prune/per_layer.py's 0-1 program over the block-variant scores, after the
uniform ones:

    optimum       the least summed score: what ``prune --per-layer`` makes
    attention     when the optimum removes some layer's attention: the optimum with every
                  layer's attention kept (K/V groups may still shrink). A removed block's
                  score is measured untrained and one block at a time, and whether a layer
                  without attention recovers under distillation is what the scores judge
                  least; the search measures it instead of trusting them
    next best     then the least summed score at least ``blocks_apart`` (MIN_DISTANCE of
                  the 2 x layers blocks, at least 1) blocks away from every earlier one: the
                  solver's own order without near-copies (the plain second-best solution
                  usually differs in one block, one MLP a width step narrower, and teaches
                  the search as little as the planner's near-copies). Each is the exact
                  optimum under distance cuts added to the program (at most 2 x layers -
                  blocks_apart of an earlier candidate's options chosen again)

until ``per_layer_candidates`` are found or the program has no other solution. With ``refit``
the MLP widths are scored refit (importance --second-moments), as ``prune --per-layer --refit``
chooses them. The TP size
leaves out the options it cannot split, as for prune. Uniform shapes meet the budget as
the planner's do (within ``tolerance``); under a memory budget they are the planner's for
the parameters left beside the parent's KV cache, kept when their memory (weights and KV
cache) is within the tolerance, and none is an error only when no per-layer one exists;
likewise under a FLOPs budget, for the parameters whose 2 FLOPs each fit beside what the
parent spends apart from them (attention over the context, less the embedding lookup's).
"""

from __future__ import annotations

import dataclasses
import math

from nemo_minitron.config import Names
from nemo_minitron.errors import UsageError
from nemo_minitron.importance.scores import ImportanceScores
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.prune.per_layer import (Budget, PerLayerChoice, budget_of, ffn_scores_key, per_layer_choice,
                                           solve)
from nemo_minitron.prune.plan import Candidate, _why, mlp_only, plan
from nemo_minitron.prune.targets import apply_target, parse_param_count
from nemo_minitron.search.config import MIN_DISTANCE, SearchConfig

KINDS = ("width", "depth", "mixed")
PER_LAYER = "per-layer"
MLP_ONLY = "mlp-only"   # the uniform shape that cuts only the MLP (with per_layer)


@dataclasses.dataclass(frozen=True)
class SearchCandidate:
    name: str                    # c1, c2, ... in the order they were chosen
    description: ModelDescription
    kind: str                    # uniform: width | depth | mixed | mlp-only (| identity: nothing cut); or per-layer
    source: str                  # planner | explicit | solver
    why: str
    choice: PerLayerChoice | None = None  # a per-layer candidate's options and summed score

    def target(self) -> dict[str, int] | None:
        """A uniform candidate's shape (prune's target); None for a per-layer one."""
        d = self.description
        if d.layer_shapes:
            return None
        return {"hidden": d.hidden_size, "ffn": d.ffn_hidden_size, "heads": d.num_attention_heads,
                "query_groups": d.num_query_groups, "layers": d.num_layers}

    @property
    def directory_name(self) -> str:
        t = self.target()
        if t is None:
            return f"{self.name}-per-layer"
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


def search_candidates(original: ModelDescription, cfg: SearchConfig, *, tp: int = 1, pp: int = 1, names: Names,
                      scores: ImportanceScores | None = None) -> list[SearchCandidate]:
    """The candidates of a search, named c1, c2, ...: the planner's, the explicit ones not
    already among them, then (``per_layer``, with the importance run's ``scores``; without
    them none: a recipe's preflight, before the importance run) the per-layer ones. Raises a
    one-line error when no architecture meets the budget."""
    picked: list[SearchCandidate] = []
    if cfg.candidates:
        for kind, c in choose(original, _uniform(original, cfg, tp, pp, names), cfg.candidates):
            picked.append(SearchCandidate(f"c{len(picked) + 1}", c.description, kind, "planner", c.why))
    for target in cfg.candidate:
        desc = apply_target(original, dict(target), tp=tp, pp=pp, flag=names("candidate"))
        if any(p.description == desc for p in picked):
            continue
        picked.append(SearchCandidate(f"c{len(picked) + 1}", desc, kind_of(original, desc), "explicit",
                                      _why(original, desc)))
    if cfg.per_layer:
        desc = mlp_only_candidate(original, cfg, tp=tp, names=names)
        if desc is not None:
            cut = 1 - desc.ffn_hidden_size / original.ffn_hidden_size
            why = (f"uniform MLP-only: ffn -{cut:.0%}; keeps the hidden size, attention and all {original.num_layers} "
                   "layers (the widest MLP on the planner's grid within the budget)")
            same = next((i for i, p in enumerate(picked) if p.description == desc), None)
            if same is None:
                picked.append(SearchCandidate(f"c{len(picked) + 1}", desc, MLP_ONLY, "planner", why))
            else:  # already picked: distilled once, named as what it also is
                picked[same] = dataclasses.replace(picked[same], kind=MLP_ONLY, why=f"{why}; also {picked[same].why}")
    if cfg.per_layer and scores is not None:
        for desc, choice, why in per_layer_candidates(original, scores, cfg, tp=tp, names=names):
            picked.append(SearchCandidate(f"c{len(picked) + 1}", desc, PER_LAYER, "solver", why, choice))
    return picked


def search_budget(cfg: SearchConfig, names: Names) -> Budget:
    """The budget every candidate meets: parameters, or with ``per_layer`` its budget."""
    if cfg.per_layer:
        return budget_of(cfg, cfg.target_params, names)
    return Budget("params", parse_param_count(str(cfg.target_params), names("target_params")), names("target_params"))


def _uniform(original: ModelDescription, cfg: SearchConfig, tp: int, pp: int, names: Names) -> list[Candidate]:
    """The planner's ranked uniform shapes for the search's budget (see the module doc)."""
    budget = search_budget(cfg, names)
    if not cfg.per_layer:  # the planner's one-line error when no shape meets it
        return plan(original, budget.limit, cfg.plan_config(), tp=tp, pp=pp, names=names)
    params = _uniform_params(original, budget)
    try:  # per-layer candidates are searched too: no uniform shape is no error
        ranked = plan(original, params, cfg.plan_config(), tp=tp, pp=pp, names=names) if params > 0 else []
    except UsageError:
        ranked = []
    return [c for c in ranked if abs(budget.total(c.description) - budget.limit) <= cfg.tolerance * budget.limit]


def _uniform_params(original: ModelDescription, budget: Budget) -> int:
    """The parameters a uniform shape may have under a per-layer budget (see the module doc):
    exact for a shape that keeps the parent's attention."""
    if budget.kind == "memory":
        kv = original.kv_cache_bytes_per_token(budget.bytes_per_value) * budget.context * budget.batch
        return (budget.limit - kv) // budget.bytes_per_value
    if budget.kind == "flops":  # 2 a parameter, beside what the parent spends otherwise (attention's context)
        return int(budget.limit - (budget.total(original) - 2 * original.num_parameters())) // 2
    return budget.limit


def mlp_only_candidate(original: ModelDescription, cfg: SearchConfig, *, tp: int,
                       names: Names) -> ModelDescription | None:
    """The uniform MLP-only shape under a per-layer search's budget (``plan.mlp_only``; None when
    no MLP width fits, or for a model per-layer search refuses: experts, Mamba layers)."""
    if original.is_moe or original.is_hybrid:
        return None
    params = _uniform_params(original, search_budget(cfg, names))
    cand = mlp_only(original, params, tp=tp) if params > 0 else None
    return None if cand is None else cand.description


def per_layer_candidates(original: ModelDescription, scores: ImportanceScores, cfg: SearchConfig, *, tp: int,
                         names: Names) -> list[tuple[ModelDescription, PerLayerChoice, str]]:
    """(description, choice, why) of the per-layer candidates, in the module doc's order
    (one-line errors: no block-variant scores, a budget no per-layer architecture meets)."""
    variants, optimum = per_layer_choice(original, scores, cfg, cfg.target_params, names, tp=tp, refit=cfg.refit)
    budget = search_budget(cfg, names)
    ffn_key = ffn_scores_key(scores, cfg.block_score, cfg.refit)
    tables = (scores[f"block_attention_{cfg.block_score}"], scores[ffn_key])
    scored = cfg.block_score + (", MLP widths refit" if ffn_key != f"block_ffn_{cfg.block_score}" else "")
    apart = max(1, math.ceil(MIN_DISTANCE * 2 * original.num_layers))
    found = [(optimum, f"optimum of the summed {cfg.block_score} score")]
    if any(s.num_query_groups == 0 for s in optimum.shapes) and len(found) < cfg.per_layer_candidates:
        kept = solve(original, variants, *tables, budget, tp, keep_attention=True)
        if kept is not None:
            found.append((kept, "optimum with every layer's attention kept"))
    while len(found) < cfg.per_layer_candidates:
        nxt = solve(original, variants, *tables, budget, tp, apart_from=tuple(c for c, _ in found), blocks_apart=apart)
        if nxt is None:
            break
        found.append((nxt, f"next best, at least {apart} block{'s' * (apart > 1)} away from the ones before"))
    out = []
    for choice, why in found:
        counts = {what: sum(not getattr(s, field) for s in choice.shapes)
                  for field, what in (("num_query_groups", "attention"), ("ffn_hidden_size", "MLP"))}
        removed = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
        out.append((original.replace(layer_shapes=choice.shapes), choice,
                    f"per layer: {why} ({scored} {choice.score:.4f}, {budget.describe(choice.cost)}"
                    + (f"; removes {removed})" if removed else ")")))
    return out
