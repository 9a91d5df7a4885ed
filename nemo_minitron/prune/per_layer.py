"""The per-layer architecture under a budget: one attention and one MLP variant per layer
(prune/variants.py), chosen to minimise the summed block-variant scores
(importance/blocks.py) subject to a budget, solved exactly as a 0-1 integer program by
``scipy.optimize.milp`` (HiGHS).

Variables: x[l, a] = 1 when layer l takes attention option a, y[l, f] likewise for its
MLP. Constraints: one option of each per layer; the budget (the options' costs summed, plus
what lies outside the layers, at most the limit); at least one layer keeps attention (a
model without any attention is no language model). Costs are separable per block:
parameters of the block's matrices and its norm (a removed block takes its norm along),
for a memory budget the weights' bytes plus each attention's KV cache at the given
context and batch, for a FLOPs budget the block's forward FLOPs per token at the given
context (``layer_costs``; outside the layers, the output layer's product: together
exactly ``ModelDescription.flops_per_token``).

Scores: each variant's KL divergence from the parent (Puzzle's choice) or its LM-loss
change, measured with every other block the parent's; their sum is the objective (Puzzle's
additivity assumption).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from nemo_minitron.checkpoint.hf_export import hf_config
from nemo_minitron.config import DEFAULT_SEQ_LEN, Names, default_of
from nemo_minitron.errors import UsageError, require
from nemo_minitron.importance.config import ImportanceConfig
from nemo_minitron.importance.scores import BLOCK_AXES, ImportanceScores
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.prune.config import PerLayerConfig, PruneConfig
from nemo_minitron.prune.targets import format_count, parse_bytes, parse_flops, parse_param_count
from nemo_minitron.prune.variants import (
    BlockVariants,
    LayerShape,
    block_variants,
    fixed_parameters,
    layer_flops_per_token,
    layer_kv_bytes_per_token,
    layer_parameters,
)

log = logging.getLogger("nemo_minitron")

BudgetKind = Literal["params", "active_params", "memory", "flops"]


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the per-layer choice must fit: parameters (dense models: active = total),
    memory (weights + KV cache of ``batch`` sequences of ``context`` tokens), or forward
    FLOPs per token (attention over a causal context of ``context`` tokens)."""

    kind: BudgetKind
    limit: int
    flag: str = "--target-params"
    context: int = default_of(PerLayerConfig, "memory_context")  # of the KV cache (memory), of attention (flops)
    batch: int = default_of(PerLayerConfig, "memory_batch")
    bytes_per_value: int = default_of(PerLayerConfig, "bytes_per_value")

    @property
    def flops_context(self) -> int:
        """The context FLOPs per token are reported at beside this budget: a FLOPs budget's own, else the default."""
        return self.context if self.kind == "flops" else DEFAULT_SEQ_LEN

    def block_costs(self, desc: ModelDescription, variants: BlockVariants) -> tuple[np.ndarray, np.ndarray]:
        """(cost of each attention option, cost of each MLP option) of one layer."""
        attention = [self._cost(desc, LayerShape(g, 0)) for g in variants.query_groups]
        mlp = [self._cost(desc, LayerShape(0, f)) for f in variants.ffn]
        return np.array(attention, dtype=np.float64), np.array(mlp, dtype=np.float64)

    def _cost(self, desc: ModelDescription, shape: LayerShape) -> float:
        if self.kind == "flops":
            return float(layer_flops_per_token(desc, shape, self.context))
        params = layer_parameters(desc, shape)
        if self.kind != "memory":
            return float(params)
        kv = layer_kv_bytes_per_token(desc, shape, self.bytes_per_value) * self.context * self.batch
        return float(params * self.bytes_per_value + kv)

    def fixed(self, desc: ModelDescription) -> float:
        if self.kind == "flops":
            return float(desc.output_layer_flops_per_token())
        params = fixed_parameters(desc)
        return float(params * (self.bytes_per_value if self.kind == "memory" else 1))

    def total(self, desc: ModelDescription) -> float:
        """What a whole model (uniform or per-layer) costs in the budget's unit."""
        if self.kind == "flops":
            return float(desc.flops_per_token(self.context))
        params = desc.num_parameters()
        if self.kind != "memory":
            return float(params)
        kv = desc.kv_cache_bytes_per_token(self.bytes_per_value) * self.context * self.batch
        return float(params * self.bytes_per_value + kv)

    def describe(self, value: float) -> str:
        if self.kind == "memory":
            return f"{value / 2**20:.1f} MiB"
        if self.kind == "flops":  # giga, as FLOPs are written, where a count says billion
            return format_count(int(value)).replace("B", "G")
        return format_count(int(value))

    def what(self) -> str:
        if self.kind == "memory":
            return (f"memory (weights + KV cache of {self.batch} x {self.context} tokens, {self.bytes_per_value} "
                    "bytes a value)")
        if self.kind == "flops":
            return f"FLOPs per token (forward, at context {self.context})"
        return "active parameters" if self.kind == "active_params" else "parameters"


def ffn_scores_key(scores: ImportanceScores, metric: str, refit: bool) -> str:
    """The MLP-width scores a choice uses: the refit ones for ``refit`` where the run has them."""
    refit_key = f"block_ffn_refit_{metric}"
    return refit_key if refit and refit_key in scores.tensors else f"block_ffn_{metric}"


def per_layer_choice(desc: ModelDescription, scores: ImportanceScores, cfg: PerLayerConfig, target_params: str | None,
                     names: Names, *, tp: int = 1, refit: bool = False,
                     directory: str = "--importance") -> tuple[BlockVariants, PerLayerChoice]:
    """The scored variants and the per-layer choice under ``cfg``'s budget (no weights read);
    ``refit`` (prune --refit): the MLP widths by their refit scores where the run has them."""
    recorded = scores.summary.get("block_variants")
    require(recorded is not None and all(axis in scores.tensors for axis in BLOCK_AXES),
            f"{names('per_layer')}: {directory} holds no block-variant scores; rerun importance with "
            "--block-variants")
    variants = BlockVariants.from_dict(recorded)
    metric = cfg.block_score
    ffn = ffn_scores_key(scores, metric, refit)
    # a run written before refit scores existed: the choice does not know what refit gains
    if refit and ffn == f"block_ffn_{metric}":
        log.warning("%s %s: %s has no refit scores of the MLP widths (importance --block-variants "
                    "--second-moments writes them), so the widths are chosen by their unrefit scores",
                    names("per_layer"), names("refit"), directory)
    choice = choose(desc, variants, scores[f"block_attention_{metric}"], scores[ffn],
                    budget_of(cfg, target_params, names), tp=tp)
    return variants, choice


def check_per_layer_budget(desc: ModelDescription, importance: ImportanceConfig, cfg: PruneConfig, tp: int,
                           names: Names) -> None:
    """Before any work: the variants ``importance`` will score can meet ``cfg``'s budget at
    ``tp`` (the same one-line errors as the choice: reachability depends on costs only)."""
    variants = block_variants(desc, importance.ffn_variants, importance.ffn_multiple)
    zeros = (torch.zeros(desc.num_layers, len(variants.query_groups)), torch.zeros(desc.num_layers, len(variants.ffn)))
    choose(desc, variants, *zeros, budget_of(cfg, cfg.target_params, names), tp=tp)


def check_shapes(desc: ModelDescription, choice: PerLayerChoice, tp: int, pp: int) -> ModelDescription:
    """The per-layer description of ``choice``, its layout checked (one-line errors)."""
    new = desc.replace(layer_shapes=choice.shapes)
    new.check_layout(tp, pp)
    return new


def export_refusal(new: ModelDescription, flag: str) -> str | None:
    """Why the Hugging Face export (Llama-Nemotron) cannot state ``new`` (None: it can)."""
    try:
        hf_config(new, torch.float32, flag)
    except UsageError as e:
        return (f"{flag}: the Hugging Face export cannot state the chosen shapes: {e} (importance --ffn-multiple "
                "256 scores only widths it states)")
    return None


def budget_of(cfg: PerLayerConfig, target_params: str | None, names: Names) -> Budget:
    """The budget a (checked) per-layer config asks for."""
    if cfg.target_memory is not None:
        return Budget("memory", parse_bytes(cfg.target_memory, names("target_memory")), names("target_memory"),
                      cfg.memory_context, cfg.memory_batch, cfg.bytes_per_value)
    if cfg.target_flops is not None:
        return Budget("flops", parse_flops(cfg.target_flops, names("target_flops")), names("target_flops"),
                      cfg.flops_context)
    if cfg.target_active_params is not None:
        return Budget("active_params", parse_param_count(cfg.target_active_params, names("target_active_params")),
                      names("target_active_params"))
    return Budget("params", parse_param_count(str(target_params), names("target_params")), names("target_params"))


@dataclasses.dataclass(frozen=True)
class PerLayerChoice:
    shapes: tuple[LayerShape, ...]
    score: float                # the summed variant scores
    cost: float                 # in the budget's unit, everything included
    attention_option: tuple[int, ...]
    ffn_option: tuple[int, ...]
    layer_scores: tuple[float, ...]  # each layer's two variant scores summed


def _layer_options(variants: BlockVariants, tp: int) -> tuple[list[int], list[int]]:
    """Indices of the options a TP layout can hold (removed blocks always can)."""
    attention = [a for a, g in enumerate(variants.query_groups) if g % tp == 0]
    mlp = [f for f, w in enumerate(variants.ffn) if w % tp == 0]
    return attention, mlp


def choose(desc: ModelDescription, variants: BlockVariants, attention_scores: torch.Tensor,
           ffn_scores: torch.Tensor, budget: Budget, tp: int = 1) -> PerLayerChoice:
    """The per-layer shapes of least summed score within ``budget`` (exact), or a one-line
    error when no choice meets it."""
    choice = solve(desc, variants, attention_scores, ffn_scores, budget, tp)
    if choice is None:  # unreachable after _check_reachable, unless the solver gave up
        raise UsageError(f"{budget.flag}: the integer program found no per-layer architecture")
    return choice


def solve(desc: ModelDescription, variants: BlockVariants, attention_scores: torch.Tensor, ffn_scores: torch.Tensor,
          budget: Budget, tp: int = 1, *, keep_attention: bool = False, apart_from: tuple[PerLayerChoice, ...] = (),
          blocks_apart: int = 1) -> PerLayerChoice | None:
    """``choose``'s program with extra constraints (None when nothing meets them), for a
    search's alternatives: ``keep_attention``: no layer loses its attention; ``apart_from``:
    at least ``blocks_apart`` of the 2 x layers blocks differ from each of these choices
    (a distance cut: of a choice's 2 x layers chosen options, at most 2 x layers - blocks_apart
    are chosen again)."""
    L = desc.num_layers
    A, F = len(variants.query_groups), len(variants.ffn)
    assert attention_scores.shape == (L, A) and ffn_scores.shape == (L, F), (attention_scores.shape, ffn_scores.shape)
    attention_ok, mlp_ok = _layer_options(variants, tp)
    cost_a, cost_f = budget.block_costs(desc, variants)
    available = budget.limit - budget.fixed(desc)
    _check_reachable(desc, variants, budget, cost_a, cost_f, attention_ok, mlp_ok, available, tp)

    n = L * (A + F)
    def xa(l: int, a: int) -> int: return l * (A + F) + a
    def yf(l: int, f: int) -> int: return l * (A + F) + A + f

    c = np.zeros(n)
    upper = np.zeros(n)
    for l in range(L):
        for a in range(A):
            c[xa(l, a)] = float(attention_scores[l, a])
            upper[xa(l, a)] = 1.0 if a in attention_ok and not (keep_attention and variants.query_groups[a] == 0) \
                else 0.0
        for f in range(F):
            c[yf(l, f)] = float(ffn_scores[l, f])
            upper[yf(l, f)] = 1.0 if f in mlp_ok else 0.0
    rows, lower, high = [], [], []
    for l in range(L):
        for block, size in ((xa, A), (yf, F)):
            row = np.zeros(n)
            row[[block(l, k) for k in range(size)]] = 1
            rows.append(row), lower.append(1), high.append(1)
    row = np.zeros(n)
    for l in range(L):
        row[[xa(l, a) for a in range(A)]] = cost_a
        row[[yf(l, f) for f in range(F)]] = cost_f
    rows.append(row), lower.append(-np.inf), high.append(available)
    if variants.query_groups[-1] == 0:  # some layer keeps attention
        row = np.zeros(n)
        row[[xa(l, A - 1) for l in range(L)]] = 1
        rows.append(row), lower.append(-np.inf), high.append(L - 1)
    for other in apart_from:
        row = np.zeros(n)
        row[[xa(l, a) for l, a in enumerate(other.attention_option)]] = 1
        row[[yf(l, f) for l, f in enumerate(other.ffn_option)]] = 1
        rows.append(row), lower.append(-np.inf), high.append(2 * L - blocks_apart)
    result = milp(c, integrality=np.ones(n), bounds=Bounds(np.zeros(n), upper),
                  constraints=LinearConstraint(np.array(rows), lower, high))
    if result.x is None:
        return None
    x = np.round(result.x).astype(int)
    picks_a = tuple(int(np.argmax([x[xa(l, a)] for a in range(A)])) for l in range(L))
    picks_f = tuple(int(np.argmax([x[yf(l, f)] for f in range(F)])) for l in range(L))
    return _choice(desc, variants, attention_scores, ffn_scores, budget, picks_a, picks_f)


def _choice(desc, variants, attention_scores, ffn_scores, budget, picks_a, picks_f) -> PerLayerChoice:
    cost_a, cost_f = budget.block_costs(desc, variants)
    shapes = tuple(LayerShape(variants.query_groups[a], variants.ffn[f]) for a, f in zip(picks_a, picks_f))
    per_layer = tuple(float(attention_scores[l, a]) + float(ffn_scores[l, f])
                      for l, (a, f) in enumerate(zip(picks_a, picks_f)))
    cost = budget.fixed(desc) + sum(cost_a[a] + cost_f[f] for a, f in zip(picks_a, picks_f))
    return PerLayerChoice(shapes, sum(per_layer), float(cost), picks_a, picks_f, per_layer)


def _check_reachable(desc, variants, budget, cost_a, cost_f, attention_ok, mlp_ok, available, tp) -> None:
    """One-line errors before solving: the cheapest architecture is over the budget, or only
    one without any attention would meet it."""
    L = desc.num_layers
    cheapest_a, cheapest_f = min(cost_a[a] for a in attention_ok), min(cost_f[f] for f in mlp_ok)
    kept_a = [a for a in attention_ok if variants.query_groups[a] > 0]
    require(kept_a, f"{budget.flag}: no attention option divides by --tp {tp} "
                    f"(query groups {', '.join(map(str, variants.query_groups[:-1]))})")
    floor = L * (cheapest_a + cheapest_f)
    with_attention = floor - cheapest_a + min(cost_a[a] for a in kept_a)
    smallest = budget.fixed(desc) + with_attention
    tp_note = f" at --tp {tp}" if tp > 1 else ""
    if floor <= available < with_attention:
        raise UsageError(f"{budget.flag} {budget.describe(budget.limit)}: only removing the attention of every layer "
                         f"would meet it (no attention left); the smallest per-layer architecture with attention "
                         f"is {budget.describe(smallest)}{tp_note}")
    require(with_attention <= available,
            f"{budget.flag} {budget.describe(budget.limit)}: no per-layer architecture meets it; the smallest the "
            f"scored variants allow{tp_note} is {budget.describe(smallest)} {budget.what()}")


def format_choice(desc: ModelDescription, variants: BlockVariants, choice: PerLayerChoice, budget: Budget,
                  metric: str) -> str:
    """The per-layer table ``plan --per-layer`` prints."""
    cost_a, cost_f = budget.block_costs(desc, variants)
    lines = [f"{'layer':>5}  {'query groups':>12}  {'ffn':>6}  {'cost':>10}  {metric + ' score':>10}"]
    for l, (shape, a, f) in enumerate(zip(choice.shapes, choice.attention_option, choice.ffn_option)):
        groups = str(shape.num_query_groups) if shape.num_query_groups else "removed"
        ffn = str(shape.ffn_hidden_size) if shape.ffn_hidden_size else "removed"
        lines.append(f"{l:>5}  {groups:>12}  {ffn:>6}  {budget.describe(cost_a[a] + cost_f[f]):>10}  "
                     f"{choice.layer_scores[l]:>10.4f}")
    lines.append(f"total {budget.describe(choice.cost)} {budget.what()} (budget {budget.describe(budget.limit)}); "
                 f"summed {metric} score {choice.score:.4f}")
    return "\n".join(lines)
