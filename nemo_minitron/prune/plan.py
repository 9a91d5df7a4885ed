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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

from nemo_minitron.config import DEFAULT_SEQ_LEN
from nemo_minitron.errors import require
from nemo_minitron.model.description import ModelDescription
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

    def target(self) -> dict[str, int]:
        d = self.description
        return {"hidden": d.hidden_size, "ffn": d.ffn_hidden_size, "heads": d.num_attention_heads,
                "query_groups": d.num_query_groups, "layers": d.num_layers}


def _grid(size: int) -> int:
    return 64 if size < 2048 else 128


def _cut(old: int, new: int) -> float:
    return 1 - new / old


def _why(desc: ModelDescription, new: ModelDescription) -> str:
    """How a candidate reaches the budget, in words: what it cuts and what it keeps whole."""
    cuts = [f"{axis} -{_cut(a, b):.0%}" for axis, a, b in (
        ("hidden", desc.hidden_size, new.hidden_size), ("ffn", desc.ffn_hidden_size, new.ffn_hidden_size),
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


def enumerate_candidates(desc: ModelDescription, budget: int, cfg: PlanConfig, *, tp: int = 1,
                         pp: int = 1) -> list[Candidate]:
    out: list[Candidate] = []
    max_width_cut, max_depth_cut, tolerance = cfg.max_width_cut, cfg.max_depth_cut, cfg.tolerance
    grid_h, grid_f = _grid(desc.hidden_size), math.lcm(_grid(desc.ffn_hidden_size), tp)
    min_layers = max(pp, math.ceil(desc.num_layers * (1 - max_depth_cut) - 1e-9))
    min_hidden = math.ceil(desc.hidden_size * (1 - max_width_cut) - 1e-9)
    hiddens = sorted({desc.hidden_size} | set(range(math.ceil(min_hidden / grid_h) * grid_h, desc.hidden_size, grid_h)))
    for layers in range(min_layers, desc.num_layers + 1):
        for groups, heads in _attention_options(desc, tp, max_width_cut):
            for hidden in hiddens:
                base = desc.replace(num_layers=layers, num_query_groups=groups, num_attention_heads=heads,
                                    hidden_size=hidden, ffn_hidden_size=grid_f)
                # params are linear in ffn: count = fixed + layers * m * hidden * ffn
                # (m: hidden x ffn matrices per MLP, 3 with a gate, 2 without)
                m = base.mlp_matrices
                fixed = base.num_parameters() - layers * m * hidden * grid_f
                exact = (budget - fixed) / (m * hidden * layers)
                options = {min(desc.ffn_hidden_size, max(grid_f, round(exact / grid_f) * grid_f)),
                           desc.ffn_hidden_size}
                for ffn in options:
                    if ffn % tp or _cut(desc.ffn_hidden_size, ffn) > max_width_cut + 1e-9:
                        continue
                    cand = base.replace(ffn_hidden_size=ffn)
                    if abs(cand.num_parameters() - budget) <= tolerance * budget:
                        out.append(Candidate(cand, _why(desc, cand)))
    return out


def rank(desc: ModelDescription, candidates: list[Candidate], budget: int, prefer: str = "width") -> list[Candidate]:
    def widths_cut(c: ModelDescription) -> list[float]:
        return [_cut(desc.hidden_size, c.hidden_size), _cut(desc.ffn_hidden_size, c.ffn_hidden_size),
                _cut(desc.num_attention_heads, c.num_attention_heads)]

    def key(cand: Candidate):
        c = cand.description
        closeness = abs(c.num_parameters() - budget) / budget
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
    from nemo_minitron.config import build, cli_names

    names = names or cli_names(PlanConfig)
    cfg = build(PlanConfig, config, names, **options)
    flag = names("target_params")
    require(budget < desc.num_parameters(), f"{flag} {format_count(budget)} is not smaller than the model "
                                            f"({format_count(desc.num_parameters())})")
    found = enumerate_candidates(desc, budget, cfg, tp=tp, pp=pp)
    require(bool(found), f"{flag} {format_count(budget)}: no architecture within {cfg.tolerance:.0%} meets the "
                         f"limits ({names('max_width_cut')} {cfg.max_width_cut}, {names('max_depth_cut')} "
                         f"{cfg.max_depth_cut}, --tp {tp}); raise the limits or the budget")
    return rank(desc, found, budget, cfg.prefer)


def format_table(desc: ModelDescription, candidates: list[Candidate], budget: int, top: int = 10,
                 seq_len: int = DEFAULT_SEQ_LEN) -> str:
    rows = [("#", "params", "vs budget", "hidden", "ffn", "heads", "groups", "layers", "GFLOPs/token",
             "KV bytes/token", "how")]
    base = [("0", f"{desc.num_parameters() / 1e6:,.1f}M", "original", str(desc.hidden_size),
             str(desc.ffn_hidden_size), str(desc.num_attention_heads), str(desc.num_query_groups),
             str(desc.num_layers), f"{desc.flops_per_token(seq_len) / 1e9:.2f}",
             f"{desc.kv_cache_bytes_per_token():,}", "")]
    body = []
    for i, c in enumerate(candidates[:top], 1):
        d = c.description
        body.append((str(i), f"{d.num_parameters() / 1e6:,.1f}M", f"{d.num_parameters() / budget - 1:+.1%}",
                     str(d.hidden_size), str(d.ffn_hidden_size), str(d.num_attention_heads),
                     str(d.num_query_groups), str(d.num_layers), f"{d.flops_per_token(seq_len) / 1e9:.2f}",
                     f"{d.kv_cache_bytes_per_token():,}", c.why))
    table = rows + base + body
    widths = [max(len(r[i]) for r in table) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i < len(widths) - 1 else cell for i, (cell, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + f"\n({len(candidates)} candidates within tolerance; FLOPs at context {seq_len})"
