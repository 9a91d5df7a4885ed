"""Training and distillation settings: the source of the ``distill`` flags, the
``distill``/``finetune`` keywords and the recipes' ``rounds.N.distill`` and
``teacher_correction`` keys."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Union

from nemo_minitron.config import DEFAULT_SEQ_LEN, option
from nemo_minitron.errors import UsageError, require


#: DataLoader processes per rank when a GPU trains: they read ahead while the GPU computes. On
#: a CPU they would compete with the training's threads for the same cores (measured
#: 2026-12-07, 2 cores, SmolLM2 -> 84M float32: 21-26 s per step with 2 workers, 13-15 s
#: with none), so a CPU run reads in the training process unless told otherwise.
GPU_DATA_WORKERS = 2


def resolved_data_workers(configured: Optional[int], gpu: bool) -> int:
    """``data_workers`` as set, or its device default (GPU_DATA_WORKERS with a GPU, 0 without)."""
    if configured is not None:
        return configured
    return GPU_DATA_WORKERS if gpu else 0


#: Intermediate pair endpoints besides layer outputs (0-indexed layer numbers).
EMBEDDING, FINAL_NORM = "embedding", "final_norm"


def str_list(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def _optional_int(text: str) -> Optional[int]:
    return None if str(text).lower() in ("none", "") else int(text)


@dataclasses.dataclass
class TrainingConfig:
    """The training loop: shared by distillation and plain fine-tuning (teacher correction)."""

    steps: int = option(100, "optimizer steps", ge=1)
    global_batch: int = option(8, "sequences per step, over all data-parallel ranks", ge=1)
    micro_batch: int = option(2, "sequences per forward pass on one rank", ge=1, resume_safe=True)
    seq_len: int = option(DEFAULT_SEQ_LEN, "tokens per sequence", ge=1)
    lr: float = option(1e-4, "peak learning rate (Adam)", gt=0)
    min_lr: Optional[float] = option(None, "floor of the cosine decay", ge=0, default_text="lr / 10")
    warmup_steps: Optional[int] = option(None, "linear warm-up steps", ge=0, default_text="5% of --steps",
                                         parse=_optional_int, metavar="N")
    weight_decay: float = option(0.01, "AdamW weight decay", ge=0)
    clip_grad: float = option(1.0, "gradient norm clipping (0: off)", ge=0)
    eval_every: int = option(0, "held-out evaluation every N steps (0: only before and after)", ge=0,
                             resume_safe=True)
    eval_samples: int = option(64, "held-out sequences per evaluation", ge=1, resume_safe=True)
    save_every: int = option(500, "resumable checkpoint every N steps (0: only the final model)", ge=0,
                             resume_safe=True)
    log_every: int = option(10, "a Megatron-style log line every N steps (every step goes to metrics.jsonl and "
                                "TensorBoard)", ge=1, resume_safe=True)
    data_workers: Optional[int] = option(
        None, "DataLoader processes reading training batches ahead, per rank (0: read in the training process)",
        ge=0, resume_safe=True, default_text=f"{GPU_DATA_WORKERS} with a GPU, 0 on a CPU")
    logit_chunk: int = option(1024, "tokens per chunk of the logit loss (memory vs passes; a CPU takes at most 128 "
                                    "at a time unless the contrastive term is on)", ge=1,
                              resume_safe=True)
    moe_aux_loss_coeff: Optional[float] = option(
        None, "mixtures of experts: weight of the router's load-balancing loss per layer (0: off)", ge=0,
        default_text="the model's, from its HF router_aux_loss_coef")

    def check(self, names) -> None:
        require(self.global_batch % self.micro_batch == 0,
                f"{names('global_batch')} ({self.global_batch}) must be a multiple of {names('micro_batch')} "
                f"({self.micro_batch})")

    @property
    def min_lr_value(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def warmup(self) -> int:
        wanted = max(0, round(0.05 * self.steps)) if self.warmup_steps is None else self.warmup_steps
        return min(wanted, self.steps - 1)  # the schedule needs at least one step of decay


@dataclasses.dataclass
class DistillConfig(TrainingConfig):
    """Distillation: the training loop plus what the student learns from the teacher."""

    kd_temperature: float = option(1.0, "softmax temperature of the logit loss (scaled by T^2)", gt=0)
    kd_loss: Literal["forward", "reverse"] = option("forward", "KL(teacher || student) (forward) or reverse")
    kd_top_k: Optional[int] = option(None, "keep only the teacher's top-k logits", ge=1, default_text="all",
                                     parse=_optional_int, metavar="K")
    kd_weight: float = option(1.0, "weight of the logit KD loss", ge=0)
    ce_weight: float = option(0.0, "weight of the cross-entropy loss with the data's next tokens", ge=0)
    contrastive_weight: float = option(0.0, "weight of the contrastive logit loss: per token, InfoNCE over the "
                                            "positions of a --logit-chunk (the teacher's distribution at the same "
                                            "position against those at the others; docs/usage.md)", ge=0)
    contrastive_temperature: float = option(1.0, "temperature of the contrastive loss's softmax over positions",
                                            gt=0)
    kd_pairs: list[str] = option([], "intermediate pairs student:teacher, each a layer (0-indexed), embedding or "
                                     "final_norm, e.g. 3:7,9:29,embedding:embedding", parse=str_list, metavar="S:T,...")
    kd_pair_loss: Literal["cosine", "mse"] = option("cosine", "loss between a projected student state and the "
                                                              "teacher's")
    kd_pair_weight: Union[str, float] = option(
        "auto", "weight of the intermediate losses: auto (their mean matches the logit loss each step), auto_sum "
                "(each one matches it) or a number", parse=str, metavar="W")
    kd_balance: bool = option(False, "rescale the KD term to the cross-entropy term's magnitude every micro-batch "
                                     "(ModelOpt's skip_lm_loss: false)")
    method: Literal["logits", "synthetic", "both"] = option(
        "logits", "what the student learns from: the teacher's logits on --data (logits), cross-entropy on the "
                  "completions of --synthetic-data, the teacher's generations (synthetic: no teacher runs), or KD on "
                  "--data plus cross-entropy on --synthetic-data (both)")
    synthetic_fraction: float = option(0.5, "method both: share of each step's samples taken from "
                                            "--synthetic-data", gt=0, lt=1)
    synthetic_weight: float = option(1.0, "method synthetic/both: weight of the cross-entropy on synthetic samples "
                                          "(KD on real ones has --kd-weight)", gt=0)

    def check(self, names) -> None:
        super().check(names)
        require(not (self.kd_top_k and self.kd_loss == "reverse"),
                f"{names('kd_top_k')} needs {names('kd_loss')} forward (reverse KL is infinite outside the "
                "teacher's top-k)")
        require(self.kd_weight > 0 or self.ce_weight > 0 or self.contrastive_weight > 0,
                f"{names('kd_weight')}, {names('ce_weight')} and {names('contrastive_weight')} are all 0: nothing "
                "to learn from")
        require(not self.contrastive_weight or self.method == "logits",
                f"{names('contrastive_weight')} needs {names('method')} logits (its negatives are the other "
                "positions of the teacher's logits)")
        if self.kd_pair_weight not in ("auto", "auto_sum"):
            try:
                self.kd_pair_weight = float(self.kd_pair_weight)
            except (TypeError, ValueError):
                raise UsageError(f"{names('kd_pair_weight')} must be auto, auto_sum or a number "
                                 f"(got '{self.kd_pair_weight}')") from None
            require(self.kd_pair_weight >= 0, f"{names('kd_pair_weight')} must be >= 0 (got {self.kd_pair_weight})")
        for item in self.kd_pairs:
            parts = str(item).split(":")
            require(len(parts) == 2 and all(p.strip().isdigit() or p.strip() in (EMBEDDING, FINAL_NORM)
                                            for p in parts),
                    f"{names('kd_pairs')}: '{item}' is not student:teacher, each a layer number, {EMBEDDING} or "
                    f"{FINAL_NORM} (e.g. 3:7)")
        require(not self.kd_balance or (self.kd_weight > 0 and self.ce_weight > 0),
                f"{names('kd_balance')} rescales the KD term to the cross-entropy term: give both "
                f"{names('kd_weight')} and {names('ce_weight')} > 0")


@dataclasses.dataclass
class TeacherLogitsConfig:
    """``teacher-logits``: which samples, how many log-probabilities per token, in what precision."""

    top_k: int = option(64, "teacher log-probabilities kept per token (the rest of the vocabulary is one bucket)",
                        ge=1)
    samples: Optional[int] = option(None, "training samples to cover: the N a distillation of --steps x "
                                          "--global-batch = N reads (distillation from the cache trains on these)",
                                    ge=1, default_text="all the data holds", parse=_optional_int, metavar="N")
    seq_len: int = option(DEFAULT_SEQ_LEN, "tokens per sequence (distill must use the same)", ge=1)
    micro_batch: int = option(1, "sequences per teacher forward pass", ge=1)
    kd_temperature: float = option(1.0, "softmax temperature of the stored log-probabilities (distill must use "
                                        "the same)", gt=0)
    value_dtype: Literal["bfloat16", "float32"] = option("bfloat16", "dtype of the stored log-probabilities")
