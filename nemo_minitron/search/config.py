"""Architecture search settings: the source of the ``search`` flags, the ``search()``
keywords and the recipes' ``rounds.N.search`` keys.

A search is the planner's budget and limits (PlanConfig), with ``per_layer`` the per-layer
choice's budget and scores (PerLayerConfig), which candidates to try, and the short
distillation every candidate gets (DistillConfig: the same data, seed and schedule for all
of them)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from nemo_minitron.config import option
from nemo_minitron.distill.config import DistillConfig, _optional_int
from nemo_minitron.errors import require
from nemo_minitron.prune.config import LAYER_METRICS, PerLayerConfig, PlanConfig, refit_option
from nemo_minitron.prune.targets import AXES, parse_param_count, parse_target

#: how far apart (largest relative difference of any axis) two chosen candidates must be
MIN_DISTANCE = 0.1


def _one_target(text: str) -> dict[str, int]:
    return parse_target(text, flag="--candidate")


@dataclasses.dataclass
class SearchConfig(DistillConfig, PlanConfig, PerLayerConfig):
    """Which candidates to try for a budget and how each is distilled and compared."""

    target_params: Optional[str] = option(None, "parameter budget, e.g. 90M or 4.5B [required unless --per-layer "
                                                "with --target-active-params, --target-memory or --target-flops]",
                                          metavar="N")
    candidates: int = option(5, "candidates taken from the planner, chosen to differ: width-only, depth-only and "
                                "mixed cuts in turn", ge=0)
    candidate: list[dict[str, int]] = option([], "an explicit candidate to add, e.g. hidden=480,ffn=1024,heads=6",
                                             parse=_one_target, repeat=True, metavar="AXIS=N,...")
    halving: bool = option(False, "successive halving: every candidate trains part of --steps, only the better "
                                  "half continues (halving again until two remain for the last stretch)")
    per_layer_candidates: int = option(3, "with --per-layer: per-layer architectures to try, the solver's optimum "
                                          "first, beside the planner's candidates and the uniform MLP-only shape "
                                          "(see docs/usage.md, Architecture search)", ge=1)
    keep_all: bool = option(False, "keep every candidate's checkpoints (default: only the best candidate's)",
                            resume_safe=True)
    layer_metric: str = option("auto", "layers each candidate drops, as prune --layer-metric: auto (greedy when "
                                       "the candidate cuts only layers, else contiguous; loss when the importance "
                                       "run did not record those), greedy, best, "
                                       "contiguous, loss, block, or the 0-indexed layers, e.g. 3,7,9",
                               metavar="METRIC")
    refit: Optional[bool] = refit_option()
    cache_top_k: Optional[int] = option(None, "write a teacher-logit cache of the teacher's top-K first and distil "
                                              "every candidate from it (one teacher pass for all)", ge=1,
                                         parse=_optional_int, default_text="live teacher", metavar="K")
    eval_every: int = option(10, "held-out evaluation every N steps: the points of the loss curves", ge=0,
                             resume_safe=True)

    def check(self, names) -> None:
        super().check(names)
        self.check_budget(names, self.target_params)
        require(self.target_params is not None or self.per_layer, f"{names('target_params')} is required (e.g. 90M)")
        if self.target_params is not None:
            self.target_params = str(self.target_params)
            parse_param_count(self.target_params, flag=names("target_params"))
        require(self.candidates > 0 or bool(self.candidate) or self.per_layer,
                f"{names('candidates')} 0 and no {names('candidate')}: nothing to search")
        for target in self.candidate:
            require(isinstance(target, dict) and bool(target), f"{names('candidate')}: give axis=size pairs, e.g. "
                                                               "hidden=480,ffn=1024")
            for axis, value in target.items():
                require(axis in AXES, f"{names('candidate')}: unknown axis '{axis}' (allowed: {', '.join(AXES)})")
                require(isinstance(value, int) and value >= 1,
                        f"{names('candidate')}: {axis} must be a whole number >= 1 (got {value})")
        if self.layer_metric not in LAYER_METRICS:
            items = [i.strip() for i in str(self.layer_metric).split(",") if i.strip()]
            require(items and all(i.isdigit() for i in items),
                    f"{names('layer_metric')} must be {', '.join(LAYER_METRICS)}, or the layers to drop such as "
                    f"3,7,9 (got '{self.layer_metric}')")
        if self.cache_top_k is not None:
            require(not self.kd_pairs, f"{names('cache_top_k')} with {names('kd_pairs')}: intermediate losses need "
                                       "the live teacher")
            require(self.kd_loss == "forward" and self.kd_top_k is None,
                    f"{names('cache_top_k')} needs {names('kd_loss')} forward and no {names('kd_top_k')}")

    def distill_config(self) -> DistillConfig:
        """The distillation every candidate gets."""
        return DistillConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DistillConfig)})

    def plan_config(self) -> PlanConfig:
        return PlanConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PlanConfig)})
