"""The architecture planner: candidate pruned shapes for a parameter budget.

Needs only a ``ModelDescription`` (no weights), so it answers for a 70B model on a laptop.

Enumeration: every depth from (1 - max_depth_cut) * layers to layers; attention kept,
or fewer heads per group, or fewer whole query groups (within max_width_cut and the TP
divisibility rules); the hidden size on a grid of multiples of 64 (128 from hidden
2048 up). For each such choice the MLP width is solved from the budget (parameters are
linear in it) and rounded to the grid; a candidate is kept when its parameter count is
within ``tolerance`` of the budget and no width lost more than ``max_width_cut``.

Ranking: ``width`` first (default; the paper found width pruning recovers best after
retraining): keep every layer, keep attention whole, then the most even cut (smallest
largest relative cut of hidden, ffn and heads), then the closest count. ``depth`` first:
the smallest largest width cut (every width kept when the budget allows), attention
kept, then the closest count.

The MLP width is rounded to a multiple of 64 (128 from 2048 up) and of the TP size, so
tensor parallel layouts stay valid; heads and query groups must divide by the TP size.

Mixtures of experts: the number of experts is enumerated too (the original, then steps
of 1/16 of it down to the width limit, never below top-k), and the experts' width is
solved from the budget as the MLP width is (shared experts and top-k stay as they are:
target them explicitly). ``param_count`` says whether the budget counts every parameter
(``total``) or those one token uses (``active``: top-k experts, not all); the table shows
both, and FLOPs per token of the active ones.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

from nemo_minitron.config import DEFAULT_SEQ_LEN, build, cli_names
from nemo_minitron.errors import require
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.hybrid import not_yet
from nemo_minitron.prune.config import PlanConfig
from nemo_minitron.prune.targets import format_count


#: How each preference orders the candidates (printed above the table).
RANKING = {
    "width": "width first (the paper's advice): all layers kept, then attention kept, then the most even "
             "width cut, then the closest to the budget",
    "depth": "depth first: widths kept (the smallest largest width cut), then attention kept, then the "
             "closest to the budget",
}


@dataclasses.dataclass(frozen=True)
class Candidate:
    description: ModelDescription
    why: str

    @property
    def params(self) -> int:
        return self.description.num_parameters()

    @property
    def active_params(self) -> int:
        return self.description.num_active_parameters()

    def target(self) -> dict[str, int]:
        d = self.description
        shape = {"hidden": d.hidden_size, "heads": d.num_attention_heads, "query_groups": d.num_query_groups,
                 "layers": d.num_layers}
        if not d.is_moe:
            return {**shape, "ffn": d.ffn_hidden_size}
        return {**shape, "experts": d.num_experts, "moe_ffn": d.moe_ffn_hidden_size, "top_k": d.moe_top_k,
                **({"shared_ffn": d.moe_shared_ffn_hidden_size} if d.moe_shared_ffn_hidden_size else {})}


def counted(desc: ModelDescription, param_count: str) -> int:
    """The parameters a budget counts: all of them, or those one token uses."""
    return desc.num_parameters(active=param_count == "active")


def _mlp_width(d: ModelDescription) -> int:
    return d.moe_ffn_hidden_size if d.is_moe else d.ffn_hidden_size


def _widths(d: ModelDescription) -> dict[str, int]:
    """The widths the planner cuts (and ranks candidates by)."""
    out = {"hidden": d.hidden_size, "ffn": _mlp_width(d), "heads": d.num_attention_heads}
    return {**out, "experts": d.num_experts} if d.is_moe else out


def _grid(size: int) -> int:
    return 64 if size < 2048 else 128


def _cut(old: int, new: int) -> float:
    return 1 - new / old


def _why(desc: ModelDescription, new: ModelDescription) -> str:
    """How a candidate reaches the budget, in words: what it cuts and what it keeps whole."""
    ffn = "moe_ffn" if desc.is_moe else "ffn"
    cuts = [f"{axis} -{_cut(a, b):.0%}" for axis, a, b in (
        ("hidden", desc.hidden_size, new.hidden_size), (ffn, _mlp_width(desc), _mlp_width(new)),
        ("experts", desc.num_experts, new.num_experts),
        ("heads", desc.num_attention_heads, new.num_attention_heads),
        ("groups", desc.num_query_groups, new.num_query_groups)) if b != a]
    dropped = desc.num_layers - new.num_layers
    kind = "width + depth" if cuts and dropped else "width" if cuts else "depth"
    what = cuts + ([f"-{dropped} layers"] if dropped else [])
    kept = ([f"all {desc.num_layers} layers"] if not dropped else []) + (
        ["attention"] if (new.num_attention_heads, new.num_query_groups)
        == (desc.num_attention_heads, desc.num_query_groups) else [])
    return f"{kind}: {', '.join(what)}" + (f"; keeps {' and '.join(kept)}" if kept else "")


def _attention_options(desc: ModelDescription, tp: int, max_cut: float) -> Iterator[tuple[int, int]]:
    """(query_groups, heads) pairs: unchanged, fewer heads per group, fewer groups."""
    seen = set()
    hpg, groups = desc.heads_per_group, desc.num_query_groups
    for g in range(groups, 0, -1):
        for h in range(hpg, 0, -1):
            heads = g * h
            if (g % tp or heads % tp or _cut(desc.num_attention_heads, heads) > max_cut + 1e-9
                    or (g, heads) in seen):
                continue
            if g != groups and h != hpg:
                continue  # cut one way at a time: whole groups, or heads inside every group
            seen.add((g, heads))
            yield g, heads


def _expert_options(desc: ModelDescription, max_cut: float) -> list[int]:
    """Numbers of experts to try: the original, then steps of 1/16 of it down to the limit (>= top-k)."""
    if not desc.is_moe:
        return [0]
    step = max(1, desc.num_experts // 16)
    lowest = max(desc.moe_top_k, math.ceil(desc.num_experts * (1 - max_cut) - 1e-9))
    return [e for e in range(desc.num_experts, lowest - 1, -step)]


def enumerate_candidates(desc: ModelDescription, budget: int, cfg: PlanConfig, *, tp: int = 1,
                         pp: int = 1) -> list[Candidate]:
    out: list[Candidate] = []
    max_width_cut, max_depth_cut, tolerance = cfg.max_width_cut, cfg.max_depth_cut, cfg.tolerance
    width_field = "moe_ffn_hidden_size" if desc.is_moe else "ffn_hidden_size"
    width = _mlp_width(desc)
    grid_h, grid_f = _grid(desc.hidden_size), math.lcm(_grid(width), tp)
    min_layers = max(pp, math.ceil(desc.num_layers * (1 - max_depth_cut) - 1e-9))
    min_hidden = math.ceil(desc.hidden_size * (1 - max_width_cut) - 1e-9)
    hiddens = sorted({desc.hidden_size} | set(range(math.ceil(min_hidden / grid_h) * grid_h, desc.hidden_size, grid_h)))
    for layers in range(min_layers, desc.num_layers + 1):
        for groups, heads in _attention_options(desc, tp, max_width_cut):
            for hidden in hiddens:
                for experts in _expert_options(desc, max_width_cut):
                    base = desc.replace(num_layers=layers, num_query_groups=groups, num_attention_heads=heads,
                                        hidden_size=hidden, num_experts=experts, **{width_field: grid_f})
                    # the count is linear in the MLP width: fixed + slope * width (slope: layers x
                    # hidden x the matrices per MLP (3 with a gate, 2 without) x the experts counted)
                    per_layer = (base.moe_top_k if cfg.param_count == "active" else experts) if desc.is_moe else 1
                    slope = layers * hidden * base.mlp_matrices * per_layer
                    exact = grid_f + (budget - counted(base, cfg.param_count)) / slope
                    options = {min(width, max(grid_f, round(exact / grid_f) * grid_f)), width}
                    for ffn in options:
                        if ffn % tp or _cut(width, ffn) > max_width_cut + 1e-9:
                            continue
                        cand = base.replace(**{width_field: ffn})
                        if abs(counted(cand, cfg.param_count) - budget) <= tolerance * budget:
                            out.append(Candidate(cand, _why(desc, cand)))
    return out


def rank(desc: ModelDescription, candidates: list[Candidate], budget: int, prefer: str,
         param_count: str) -> list[Candidate]:
    def widths_cut(c: ModelDescription) -> list[float]:
        before = _widths(desc)
        return [_cut(before[axis], size) for axis, size in _widths(c).items()]

    def key(cand: Candidate):
        c = cand.description
        closeness = abs(counted(c, param_count) - budget) / budget
        attention_changed = (c.num_attention_heads, c.num_query_groups) != (desc.num_attention_heads,
                                                                             desc.num_query_groups)
        if prefer == "width":
            return (c.num_layers != desc.num_layers, desc.num_layers - c.num_layers, attention_changed,
                    round(max(widths_cut(c)), 3), closeness)
        return (round(max(widths_cut(c)), 3), attention_changed, closeness)

    return sorted(candidates, key=key)


def plan(desc: ModelDescription, budget: int, config: PlanConfig | None = None, *, tp: int = 1, pp: int = 1,
         names=None, **options) -> list[Candidate]:
    """Ranked candidates meeting ``budget`` within the config's tolerance; raises when none
    does. ``options``: PlanConfig fields overriding ``config``."""
    names = names or cli_names(PlanConfig)
    cfg = build(PlanConfig, config, names, **options)
    not_yet(desc, "planning and pruning")
    flag = names("target_params")
    kind = "active " if desc.is_moe and cfg.param_count == "active" else ""
    require(budget < counted(desc, cfg.param_count), f"{flag} {format_count(budget)} is not smaller than the "
                                                     f"model's {kind}parameters "
                                                     f"({format_count(counted(desc, cfg.param_count))})")
    found = enumerate_candidates(desc, budget, cfg, tp=tp, pp=pp)
    require(bool(found), f"{flag} {format_count(budget)}: no architecture within {cfg.tolerance:.0%} meets the "
                         f"limits ({names('max_width_cut')} {cfg.max_width_cut}, {names('max_depth_cut')} "
                         f"{cfg.max_depth_cut}, --tp {tp}); raise the limits or the budget")
    return rank(desc, found, budget, cfg.prefer, cfg.param_count)


def format_table(desc: ModelDescription, candidates: list[Candidate], budget: int, *, top: int, param_count: str,
                 seq_len: int = DEFAULT_SEQ_LEN) -> str:
    moe = desc.is_moe
    rows = [("#", "params", *(("active",) if moe else ()), "vs budget", "hidden",
             *(("experts", "moe_ffn") if moe else ("ffn",)), "heads", "groups", "layers", "GFLOPs/token",
             "KV bytes/token", "how")]

    def row(label: str, d: ModelDescription, versus: str, why: str) -> tuple:
        return (label, f"{d.num_parameters() / 1e6:,.1f}M",
                *((f"{d.num_active_parameters() / 1e6:,.1f}M",) if moe else ()), versus, str(d.hidden_size),
                *((str(d.num_experts), str(d.moe_ffn_hidden_size)) if moe else (str(d.ffn_hidden_size),)),
                str(d.num_attention_heads), str(d.num_query_groups), str(d.num_layers),
                f"{d.flops_per_token(seq_len) / 1e9:.2f}", f"{d.kv_cache_bytes_per_token():,}", why)

    base = [row("0", desc, "original", "")]
    body = [row(str(i), c.description, f"{counted(c.description, param_count) / budget - 1:+.1%}", c.why)
            for i, c in enumerate(candidates[:top], 1)]
    table = rows + base + body
    widths = [max(len(r[i]) for r in table) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i < len(widths) - 1 else cell for i, (cell, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + f"\n({len(candidates)} candidates within tolerance; FLOPs at context {seq_len})"
