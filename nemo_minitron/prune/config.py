"""Planning and pruning settings: the source of the ``plan``/``prune`` flags, the Python
API's keywords and the recipes' ``rounds.N.prune`` keys."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from nemo_minitron.config import default_of, option
from nemo_minitron.errors import require
from nemo_minitron.prune.targets import (
    LAYER_KIND_AXES,
    canonical_target,
    parse_bytes,
    parse_flops,
    parse_param_count,
    parse_target,
)


#: How ``layer_metric`` names the layers to drop (or it lists them: "3,7,9").
LAYER_METRICS = ("auto", "greedy", "best", "contiguous", "loss", "block")


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in str(text).split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"'{text}' is not a comma-separated list of layer numbers") from None


def _target(text: str) -> dict[str, int]:
    return parse_target(text)


def refit_option():
    """``refit``, one default and help for prune and search (search prunes every candidate so)."""
    return option(
        None, "least-squares refit of each layer's output projection and second MLP linear for the removed heads "
              "and neurons, from the importance run's second moments; with --per-layer, the MLP widths are chosen "
              "by their refit scores and each narrowed MLP's second linear is refit for its own kept neurons (not "
              "with importance --block-distill-steps). auto: wherever that applies (a dense model, --order "
              "importance, second moments from at least as many calibration tokens as the widest matrix has "
              "columns); --refit: a one-line error where it does not", default_text="auto")


@dataclasses.dataclass
class PlanConfig:
    """How the planner enumerates and ranks candidate architectures for a budget."""

    tolerance: float = option(0.05, "accepted relative distance of a candidate's parameter count to the budget",
                              gt=0, lt=1)
    max_width_cut: float = option(0.5, "largest fraction of any width (hidden, ffn, heads) to remove", ge=0, lt=1)
    max_depth_cut: float = option(0.5, "largest fraction of the layers to remove", ge=0, lt=1)
    prefer: Literal["width", "depth"] = option(
        "width", "which candidates rank first: width (the paper's advice) or depth")
    param_count: Literal["total", "active"] = option(
        "total", "what a parameter budget counts in a mixture of experts: every parameter (total) or those one "
                 "token uses (active: the top-k experts)")


@dataclasses.dataclass
class PlanOutputConfig:
    """What ``nemo-minitron plan`` prints and writes."""

    top: int = option(10, "rows to print")
    json: Optional[str] = option(None, "also write the candidates as JSON", metavar="OUT")


@dataclasses.dataclass
class PerLayerConfig:
    """A per-layer (Puzzle-style) architecture: each layer's attention and MLP chosen among
    the variants ``importance --block-variants`` scored, under a budget (prune/per_layer.py)."""

    per_layer: bool = option(
        False, "choose each layer's attention (K/V groups, or removed) and MLP width (or removed) from the importance "
               "run's block-variant scores (importance --block-variants) under the budget: --target-params, "
               "--target-active-params, --target-memory or --target-flops")
    target_active_params: Optional[str] = option(
        None, "with --per-layer: a budget of the parameters one token uses (a dense model's are all of them), "
              "e.g. 90M", metavar="N")
    target_memory: Optional[str] = option(
        None, "with --per-layer: a memory budget, the weights plus the KV cache of --memory-batch sequences of "
              "--memory-context tokens, e.g. 400MB or 1.5GiB", metavar="BYTES")
    memory_context: int = option(4096, "tokens per sequence of the --target-memory KV cache", ge=1)
    memory_batch: int = option(1, "sequences of the --target-memory KV cache", ge=1)
    bytes_per_value: int = option(2, "bytes of each weight and KV-cache value under --target-memory (2: bf16)", ge=1)
    target_flops: Optional[str] = option(
        None, "with --per-layer: a budget of forward FLOPs per token (2 per weight of every matrix product, the "
              "output layer's included, plus attention scores and values over --flops-context tokens), e.g. 1.2G",
        metavar="N")
    flops_context: int = option(4096, "tokens of causal context at which --target-flops counts attention (a token "
                                      "attends to half of them on average)", ge=1)
    block_score: Literal["kl", "loss"] = option(
        "kl", "what --per-layer minimises, summed over the blocks changed: each variant's KL divergence from the "
              "parent (Puzzle's choice) or its LM-loss change")

    def check_budget(self, names, target_params: Optional[str]) -> None:
        """The per-layer budget rules (``target_params``: the parameter budget given, if any)."""
        budgets = ["target_params", *PER_LAYER_BUDGETS]
        given = [f for f in budgets if (target_params if f == "target_params" else getattr(self, f)) is not None]
        if self.per_layer:
            require(len(given) == 1, f"{names('per_layer')} needs exactly one budget: "
                                     f"{', '.join(names(f) for f in budgets[:-1])} or {names(budgets[-1])}"
                                     + (f" (got {', '.join(names(g) for g in given)})" if given else ""))
        for field, parse in PER_LAYER_BUDGETS.items():
            require(getattr(self, field) is None or self.per_layer,
                    f"{names(field)} is a {names('per_layer')} budget; add {names('per_layer')}")
            if getattr(self, field) is not None:
                setattr(self, field, str(getattr(self, field)))
                parse(getattr(self, field), flag=names(field))


#: the budgets only a per-layer choice takes (besides target_params), and how each is read
PER_LAYER_BUDGETS = {"target_active_params": parse_param_count, "target_memory": parse_bytes,
                     "target_flops": parse_flops}


@dataclasses.dataclass
class PruneConfig(PlanConfig, PerLayerConfig):
    target: dict[str, int] = option({}, "target shape, any subset of hidden, ffn, heads, query_groups, layers "
                                        "(mixtures of experts: experts, moe_ffn, shared_ffn, top_k instead of ffn; "
                                        "hybrid models also mamba_heads, mamba_head_dim and the layers kept of each "
                                        "kind: mamba_layers, attention_layers, mlp_layers, moe_layers; or ModelOpt's "
                                        "hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups, "
                                        "num_layers, mamba_num_heads), e.g. hidden=480,ffn=1024,heads=6",
                                    parse=_target, metavar="AXIS=N,...")
    drop_layers: list[int] = option([], "layers to drop, numbered from 1 as ModelOpt and NeMo do (e.g. 17,18,19); "
                                        "sets the target's depth; --layer-metric takes 0-indexed lists",
                                    parse=_int_list, metavar="N,...")
    target_params: Optional[str] = option(None, "or a parameter budget, e.g. 90M or 4.5B (the planner's first "
                                                "candidate)", metavar="N")
    order: Literal["importance", "magnitude", "random"] = option(
        "importance", "what to keep: the most important units, or the baselines magnitude (weight norms) and "
                      "random (by --seed)")
    layer_metric: str = option(
        "auto", "layers to drop: auto (greedy when the target cuts only layers, else contiguous; loss when the "
                      "importance run did not record those), greedy (the "
                      "first removed by importance's greedy elimination), contiguous "
                      "(the best block recorded by importance --drop-blocks), best (of the contiguous, greedy, loss "
                      "and block sets, the one whose removal cost least in the importance run), loss (least loss "
                      "increase), block (lowest Block Importance), or the 0-indexed layers, e.g. 3,7,9",
        metavar="METRIC")
    refit: Optional[bool] = refit_option()

    def check(self, names) -> None:
        self.check_budget(names, self.target_params)
        if self.per_layer:
            require(not (self.target or self.drop_layers), f"{names('per_layer')} chooses every layer's shape from the "
                                                           f"budget; {names('target')} and {names('drop_layers')} "
                                                           "are for uniform shapes")
            require(self.order == "importance", f"{names('per_layer')} keeps neurons by importance (got "
                                                f"{names('order')} {self.order})")
            if self.target_params is not None:
                self.target_params = str(self.target_params)
                parse_param_count(self.target_params, flag=names("target_params"))
            return
        require(bool(self.target or self.drop_layers) != (self.target_params is not None),
                f"{names('target')} (and/or {names('drop_layers')}) and {names('target_params')}: give exactly one "
                "of a target and a budget")
        self.target = canonical_target(dict(self.target), names("target"))
        for axis, value in self.target.items():
            lowest = 0 if axis in LAYER_KIND_AXES else 1
            require(isinstance(value, int) and value >= lowest, f"{names('target')}: {axis} must be a whole number "
                                                                f">= {lowest} (got {value})")
        if self.drop_layers:
            require(all(isinstance(n, int) and not isinstance(n, bool) for n in self.drop_layers),
                    f"{names('drop_layers')} must be whole layer numbers (1-indexed)")
            require(self.layer_metric == default_of(type(self), "layer_metric"),
                    f"{names('drop_layers')} and {names('layer_metric')} both choose the layers to drop; give one")
        if self.target_params is not None:
            self.target_params = str(self.target_params)
            parse_param_count(self.target_params, flag=names("target_params"))
        if self.layer_metric not in LAYER_METRICS:
            items = [i.strip() for i in str(self.layer_metric).split(",") if i.strip()]
            require(items and all(i.isdigit() for i in items),
                    f"{names('layer_metric')} must be {', '.join(LAYER_METRICS)}, or the layers to drop such as "
                    f"3,7,9 (got '{self.layer_metric}')")

