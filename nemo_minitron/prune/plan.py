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

Hybrid Mamba-Transformer models (Nemotron-H): the hidden size, the Mamba heads (multiples
of the B/C groups, ``mamba_heads``; every group keeps as many) and the layers of each
kind (every way of dropping at most ``max_depth_cut`` of the layers, as Mamba, attention
and MLP layers, keeping a multiple of the pipeline stages) are enumerated and the MLP
width solved from the budget, on a grid of 64 at any size (NVIDIA's own hybrids: Nemotron
Nano 9B v2's 15680 is 245 x 64); attention heads and the Mamba head dimension are kept
(few attention layers hold little; target either explicitly). A candidate's depth says
how many layers of each kind remain, not which: importance picks them when pruning, and
the pattern shown is a stand-in. Layer kinds multiply the shapes (an 8B model at the
default limits has ~10^5 within tolerance): the first ``HYBRID_LISTED`` by the ranking are
listed. With MoE layers (Nemotron 3) the experts are enumerated too (as for GPT mixtures of
experts) and the experts' width is the one solved; MoE layers are dropped like the others,
at least one kept. The table adds the Mamba heads and the SSM state bytes per sequence (constant in
the context) next to the KV-cache bytes per token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

from nemo_minitron.config import DEFAULT_SEQ_LEN, build, cli_names
from nemo_minitron.errors import require
from nemo_minitron.model import hybrid
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.prune.config import PlanConfig
from nemo_minitron.prune.targets import LAYER_KIND_AXES, format_count


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
        if d.is_hybrid:  # the layers kept of each kind: what the parameter count depends on
            kinds = hybrid.kind_counts(d.hybrid_pattern)
            shape.update(mamba_heads=d.mamba_num_heads, mamba_head_dim=d.mamba_head_dim,
                         **{axis: kinds[symbol] for axis, symbol in LAYER_KIND_AXES.items()})
        if d.has_dense_mlp:
            shape["ffn"] = d.ffn_hidden_size
        if not d.is_moe:
            return shape
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
    if d.is_hybrid:
        out["mamba_heads"] = d.mamba_num_heads
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
        ("groups", desc.num_query_groups, new.num_query_groups),
        ("mamba heads", desc.mamba_num_heads, new.mamba_num_heads)) if b != a]
    dropped = desc.num_layers - new.num_layers
    kind = "width + depth" if cuts and dropped else "width" if cuts else "depth"
    if desc.is_hybrid and dropped:  # how many of each kind
        before, after = hybrid.kind_counts(desc.hybrid_pattern), hybrid.kind_counts(new.hybrid_pattern)
        layers = [f"-{before[s] - after[s]} {hybrid.LAYER_KINDS[s]}" for s in before if before[s] != after[s]]
        what = cuts + [f"layers {', '.join(layers)}"]
    else:
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
    if desc.is_hybrid:
        return _hybrid_candidates(desc, budget, cfg, tp=tp, pp=pp)
    out: list[Candidate] = []
    max_width_cut, max_depth_cut, tolerance = cfg.max_width_cut, cfg.max_depth_cut, cfg.tolerance
    width_field = "moe_ffn_hidden_size" if desc.is_moe else "ffn_hidden_size"
    width = _mlp_width(desc)
    grid_f = math.lcm(_grid(width), tp)
    min_layers = max(pp, math.ceil(desc.num_layers * (1 - max_depth_cut) - 1e-9))
    hiddens = _hidden_options(desc, max_width_cut)
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


def mlp_only(desc: ModelDescription, budget: int, *, tp: int = 1) -> Candidate | None:
    """The uniform MLP-only shape of a dense model: every layer's MLP cut to the widest width
    on the planner's grid (a multiple of 64, 128 from 2048 up, and of ``tp``) whose parameter
    count is within ``budget``; hidden size, attention and layers kept (the uniform point of
    the per-layer search space, which keeps them too). The width limits do not apply: it is
    a reference point. None when even one grid step is over the budget."""
    assert not (desc.is_moe or desc.is_hybrid), desc.architecture
    grid = math.lcm(_grid(desc.ffn_hidden_size), tp)
    one = desc.replace(ffn_hidden_size=grid).num_parameters()
    per_step = desc.replace(ffn_hidden_size=2 * grid).num_parameters() - one  # the count is linear in the width
    if budget < one:
        return None
    steps = min((budget - one) // per_step, (desc.ffn_hidden_size - 1) // grid - 1)
    if steps < 0:  # the parent's MLP is a grid step wide or less
        return None
    cand = desc.replace(ffn_hidden_size=grid * (steps + 1))
    return Candidate(cand, _why(desc, cand))


#: MLP-width grid of hybrid models at any size (Nemotron Nano 9B v2's 15680 = 245 x 64)
HYBRID_FFN_GRID = 64
#: hybrid candidates listed at most, the first by the ranking (each layer kind multiplies
#: the shapes: an 8B model at the default limits has ~10^5)
HYBRID_LISTED = 5000


def _hidden_options(desc: ModelDescription, max_cut: float) -> list[int]:
    grid = _grid(desc.hidden_size)
    lowest = math.ceil(desc.hidden_size * (1 - max_cut) - 1e-9)
    return sorted({desc.hidden_size} | set(range(math.ceil(lowest / grid) * grid, desc.hidden_size, grid)))


def _mamba_head_options(desc: ModelDescription, tp: int, max_cut: float) -> list[int]:
    """Mamba heads to try: whole heads per B/C group (multiples of the groups), TP-divisible."""
    G, H = desc.mamba_num_groups, desc.mamba_num_heads
    return [h for h in range(H, 0, -G) if h % tp == 0 and _cut(H, h) <= max_cut + 1e-9]


def _depth_options(desc: ModelDescription, max_cut: float, pp: int) -> list[dict[str, int]]:
    """Layers kept of each kind: every way of dropping at most ``max_cut`` of the layers
    that leaves a multiple of ``pp`` (megatron-core's MambaStack: equal stages) and, in a
    model with experts, at least one MoE layer (the experts' shape needs one)."""
    counts = hybrid.kind_counts(desc.hybrid_pattern)
    most = math.floor(desc.num_layers * max_cut + 1e-9)
    out = []

    def cuts(kinds: list[str], left: int) -> Iterator[dict[str, int]]:
        if not kinds:
            yield {}
            return
        for cut in range(min(counts[kinds[0]], left) + 1):
            for rest in cuts(kinds[1:], left - cut):
                yield {kinds[0]: cut, **rest}

    for cut in cuts([hybrid.ATTENTION, hybrid.MAMBA, hybrid.MLP, hybrid.MOE], most):
        kept = {s: counts[s] - cut[s] for s in counts}
        layers = sum(kept.values())
        if layers >= pp and layers % pp == 0 and (kept[hybrid.MOE] or not desc.is_moe):
            out.append(kept)
    return out


def _hybrid_candidates(desc: ModelDescription, budget: int, cfg: PlanConfig, *, tp: int,
                       pp: int) -> list[Candidate]:
    """Hidden x Mamba heads (x experts) x layers of each kind, the MLP width solved from the
    budget: the dense MLP's, or with MoE layers (Nemotron 3) the experts' (the count is
    linear in it: each MLP layer holds hidden x ffn x 2 weights, each MoE layer that many per
    expert counted: all, or the top-k for an active budget); the dense MLP and shared expert
    of a MoE model keep their widths."""
    moe, active = desc.is_moe, cfg.param_count == "active"
    solved, width_field = (hybrid.MOE, "moe_ffn_hidden_size") if moe else (hybrid.MLP, "ffn_hidden_size")
    width, max_cut, tolerance = getattr(desc, width_field), cfg.max_width_cut, cfg.tolerance
    grid_f = math.lcm(HYBRID_FFN_GRID, tp)
    depths = _depth_options(desc, cfg.max_depth_cut, pp)
    found = []
    for hidden in _hidden_options(desc, max_cut):
        for mamba_heads in _mamba_head_options(desc, tp, max_cut):
            for experts in _expert_options(desc, max_cut):
                base = desc.replace(hidden_size=hidden, mamba_num_heads=mamba_heads, num_experts=experts)
                per_layer = {s: hybrid.layer_parameters(base, s, active) for s in hybrid.SUPPORTED_SYMBOLS
                             if s != solved and (s != hybrid.MOE or moe)}
                per_neuron = hidden * base.mlp_matrices * ((base.moe_top_k if active else experts) if moe else 1)
                per_layer[solved] = hybrid.layer_parameters(base, solved, active) - per_neuron * width
                fixed = base.embedding_parameters() + base.norm_parameters(hidden)
                for kinds in depths:
                    rest = fixed + sum(kinds[s] * n for s, n in per_layer.items())
                    slope = kinds[solved] * per_neuron
                    options = {width}
                    if slope:
                        options.add(min(width, max(grid_f, round((budget - rest) / slope / grid_f) * grid_f)))
                    for ffn in options:
                        if ffn % tp or _cut(width, ffn) > max_cut + 1e-9:
                            continue
                        count = rest + slope * ffn
                        if abs(count - budget) <= tolerance * budget:  # ranked as rank() ranks Candidates
                            largest = max(_cut(desc.hidden_size, hidden), _cut(width, ffn),
                                          _cut(desc.mamba_num_heads, mamba_heads),
                                          _cut(desc.num_experts, experts) if moe else 0.0)
                            key = _rank_key(cfg.prefer, desc.num_layers - sum(kinds.values()), False, largest,
                                            abs(count - budget) / budget)
                            found.append((key, hidden, mamba_heads, experts, kinds, ffn))
    found.sort(key=lambda f: f[0])
    out = []
    for _, hidden, mamba_heads, experts, kinds, ffn in found[:HYBRID_LISTED]:
        cand = desc.replace(hidden_size=hidden, mamba_num_heads=mamba_heads, num_experts=experts,
                            num_layers=sum(kinds.values()), **{width_field: ffn},
                            hybrid_pattern=hybrid.provisional_pattern(desc.hybrid_pattern, kinds))
        out.append(Candidate(cand, _why(desc, cand)))
    return out


def _rank_key(prefer: str, layers_dropped: int, attention_changed: bool, largest_cut: float,
              closeness: float) -> tuple:
    """The sort key of a candidate under ``prefer`` (see RANKING)."""
    if prefer == "width":
        return (layers_dropped != 0, layers_dropped, attention_changed, round(largest_cut, 3), closeness)
    return (round(largest_cut, 3), attention_changed, closeness)


def rank(desc: ModelDescription, candidates: list[Candidate], budget: int, prefer: str,
         param_count: str) -> list[Candidate]:
    def key(cand: Candidate):
        c = cand.description
        before = _widths(desc)
        attention_changed = (c.num_attention_heads, c.num_query_groups) != (desc.num_attention_heads,
                                                                             desc.num_query_groups)
        return _rank_key(prefer, desc.num_layers - c.num_layers, attention_changed,
                         max(_cut(before[axis], size) for axis, size in _widths(c).items()),
                         abs(counted(c, param_count) - budget) / budget)

    return sorted(candidates, key=key)


def plan(desc: ModelDescription, budget: int, config: PlanConfig | None = None, *, tp: int = 1, pp: int = 1,
         names=None, **options) -> list[Candidate]:
    """Ranked candidates meeting ``budget`` within the config's tolerance; raises when none
    does. ``options``: PlanConfig fields overriding ``config``."""
    names = names or cli_names(PlanConfig)
    cfg = build(PlanConfig, config, names, **options)
    if desc.is_hybrid:
        hybrid.check_layout(desc, tp, pp)
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
    moe, hybrid_model = desc.is_moe, desc.is_hybrid
    # the layer kinds of the teacher's pattern (a dense hybrid: M * -)
    kinds_shown = [s for s in hybrid.SUPPORTED_SYMBOLS if s in desc.hybrid_pattern or s != hybrid.MOE]
    rows = [("#", "params", *(("active",) if moe else ()), "vs budget", "hidden",
             *(("experts", "moe_ffn") if moe else ("ffn",)), "heads", "groups",
             *(("mamba heads", f"layers ({' '.join(kinds_shown)})") if hybrid_model else ("layers",)),
             "GFLOPs/token",
             "KV bytes/token", *(("SSM bytes/seq",) if hybrid_model else ()), "how")]

    def layers(d: ModelDescription) -> tuple:
        if not hybrid_model:
            return (str(d.num_layers),)
        kinds = hybrid.kind_counts(d.hybrid_pattern)
        return str(d.mamba_num_heads), f"{d.num_layers} ({' '.join(str(kinds[s]) for s in kinds_shown)})"

    def row(label: str, d: ModelDescription, versus: str, why: str) -> tuple:
        return (label, f"{d.num_parameters() / 1e6:,.1f}M",
                *((f"{d.num_active_parameters() / 1e6:,.1f}M",) if moe else ()), versus, str(d.hidden_size),
                *((str(d.num_experts), str(d.moe_ffn_hidden_size)) if moe else (str(d.ffn_hidden_size),)),
                str(d.num_attention_heads), str(d.num_query_groups), *layers(d),
                f"{d.flops_per_token(seq_len) / 1e9:.2f}", f"{d.kv_cache_bytes_per_token():,}",
                *((f"{d.ssm_state_bytes():,}",) if hybrid_model else ()), why)

    base = [row("0", desc, "original", "")]
    body = [row(str(i), c.description, f"{counted(c.description, param_count) / budget - 1:+.1%}", c.why)
            for i, c in enumerate(candidates[:top], 1)]
    table = rows + base + body
    widths = [max(len(r[i]) for r in table) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i < len(widths) - 1 else cell for i, (cell, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "-" * len(lines[0]))
    listed = f"{len(candidates)} candidates within tolerance" if len(candidates) < HYBRID_LISTED or not hybrid_model \
        else f"the first {len(candidates)} candidates by the ranking; lower --max-width-cut or --max-depth-cut for all"
    return "\n".join(lines) + f"\n({listed}; FLOPs at context {seq_len})"
