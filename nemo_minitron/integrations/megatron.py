"""The project's teacher and distillation losses inside Megatron-LM and Megatron-Bridge training.

    hook = teacher_hook("/ckpts/llama-8b", loss=KDLoss(pairs="embedding:embedding,31:31"))
    provider.register_pre_wrap_hook(hook)                     # Megatron-Bridge (a model provider)
    model_config.pre_wrap_hooks.append(hook)                  # Megatron-LM (its model config)
    pretrain(config, forward_step, callbacks=[PairWeights()])   # Bridge: 4-argument forward step
    pretrain(..., megatron_lm_forward_step, ...)                 # Megatron-LM: 2-argument form

``teacher_hook`` returns a pre-wrap hook (``list[MegatronModule] -> list[MegatronModule]``,
the contract of Megatron-Bridge ``models/model_provider.py: register_pre_wrap_hook`` and
Megatron-LM ``megatron/training/models/base.py: pre_wrap_hooks``): it loads the teacher
from any checkpoint the project reads (its own, Megatron-LM, Megatron-Bridge, NeMo 2) at
the trainer's parallel layout, with the student's padded vocabulary and precision and
sequence-parallel settings, and wraps the student with it in a ``DistillationModel``.
That module's state dict is the student's, so the trainer's checkpoints stay student
checkpoints; its ``config`` tells the pipeline schedule the width of the p2p tensor.

``forward_step`` (Bridge's ``(state, data_iterator, model, return_schedule_plan=False)``)
and ``megatron_lm_forward_step`` (``(data_iterator, model, return_schedule_plan=False)``)
run the wrapped model on a batch and return a loss function with the
``(loss_sum, num_tokens, {name: tensor([sum, tokens])})`` contract of both trainers
(``megatron/bridge/training/losses.py: masked_next_token_loss``), the sum being the
project's chunked vocab-parallel logit loss (``distill.losses.logit_loss``) over the
tokens of ``loss_mask`` plus the intermediate pair losses, times the tokens. The
reported ``distill loss`` holds the pairs computed on the last pipeline stage; pairs on
earlier stages enter the gradient (and ``step_end``'s statistics) but no report, since
the report exists only on the last stage.

Batches: by default ``next(data_iterator)`` on the first and last pipeline stages, a dict
with ``tokens``, ``labels`` and optionally ``loss_mask`` and ``position_ids`` (what both
trainers' GPT datasets yield); pass ``get_batch=`` (with ``functools.partial``) to use the
trainer's own batch function instead.

"auto" pair weights (as in ``nemo-minitron distill``: from the last step's logit and pair
losses, ``distill.train.next_pair_weights``) need ``step_end(model)`` after every
optimizer step, on every rank (Bridge: ``PairWeights`` as a callback). Without it, or
with Megatron-LM, give a fixed ``pair_weight``.
"""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.utils import get_model_config

from nemo_minitron.checkpoint.megatron_layout import model_path
from nemo_minitron.checkpoint.store import load_checkpoint, read_info
from nemo_minitron.config import DEFAULT_SEED, default_of
from nemo_minitron.distill.api import parse_pairs
from nemo_minitron.distill.config import DistillConfig
from nemo_minitron.distill.losses import LogitLossConfig, logit_loss
from nemo_minitron.distill.model import DistillationModel
from nemo_minitron.distill.modelopt_yaml import read_kd_yaml
from nemo_minitron.distill.train import initial_pair_weights, next_pair_weights
from nemo_minitron.errors import UsageError, require
from nemo_minitron.model.forward import position_ids as positions
from nemo_minitron.model.params import unwrap

log = logging.getLogger("nemo_minitron")

#: student TransformerConfig settings the teacher copies, so the two run side by side
_SHARED_SETTINGS = ("sequence_parallel", "bf16", "fp16", "params_dtype", "pipeline_dtype")


@dataclasses.dataclass(frozen=True)
class KDLoss:
    """The distillation loss (the meaning of every field as in ``nemo-minitron distill``)."""

    temperature: float = default_of(DistillConfig, "kd_temperature")
    kind: str = default_of(DistillConfig, "kd_loss")            # forward | reverse KL
    top_k: int | None = default_of(DistillConfig, "kd_top_k")
    kd_weight: float = default_of(DistillConfig, "kd_weight")
    ce_weight: float = default_of(DistillConfig, "ce_weight")
    balance: bool = default_of(DistillConfig, "kd_balance")     # ModelOpt's skip_lm_loss: false (distill.modelopt_yaml)
    pairs: str = ""                   # "student:teacher,...", layers 0-indexed, embedding, final_norm
    pair_loss: str = default_of(DistillConfig, "kd_pair_loss")
    pair_weight: float | str = default_of(DistillConfig, "kd_pair_weight")  # auto, auto_sum, or a number
    chunk_tokens: int = default_of(DistillConfig, "logit_chunk")

    @classmethod
    def from_modelopt_yaml(cls, path: str) -> "KDLoss":
        """ModelOpt / NeMo / Megatron-Bridge distillation YAML (``kd_config``)."""
        s = read_kd_yaml(path, flag="kd config")
        return cls(temperature=s.kd_temperature, kd_weight=s.kd_weight, ce_weight=s.ce_weight, balance=s.kd_balance,
                   pairs=",".join(s.kd_pairs), pair_loss=s.kd_pair_loss, pair_weight=s.kd_pair_weight)

    def check(self) -> None:
        require(self.kind in ("forward", "reverse"), f"KDLoss.kind must be forward or reverse (got '{self.kind}')")
        require(self.temperature > 0, f"KDLoss.temperature must be > 0 (got {self.temperature})")
        require(self.pair_loss in ("cosine", "mse"), f"KDLoss.pair_loss must be cosine or mse (got '{self.pair_loss}')")
        require(self.pair_weight in ("auto", "auto_sum") or isinstance(self.pair_weight, (int, float)),
                f"KDLoss.pair_weight must be auto, auto_sum or a number (got {self.pair_weight!r})")
        require(self.top_k is None or self.kind == "forward", "KDLoss.top_k needs the forward KL")


def _distillation_module(model) -> DistillationModel:
    """The DistillationModel inside the trainer's wrappers (DDP, Float16Module)."""
    inner = model[0] if isinstance(model, list) else model
    while not isinstance(inner, DistillationModel):
        require(hasattr(inner, "module"), "the model holds no teacher: register "
                                          "nemo_minitron.integrations.teacher_hook(...) as a pre-wrap hook")
        inner = inner.module
    return inner


def teacher_hook(teacher: str, *, iteration: int | None = None, loss: KDLoss | None = None,
                 seed: int = DEFAULT_SEED) -> Callable[[list], list]:
    """A pre-wrap hook that attaches the teacher at ``teacher`` (any checkpoint the project
    reads; ``iteration`` for a Megatron-LM / Bridge directory) to the student. The
    teacher's checkpoint is validated now; its weights load when the hook runs."""
    loss = loss or KDLoss()
    loss.check()
    path = model_path(teacher, iteration, "teacher")
    t_desc = read_info(path).description

    def hook(model_chunks: list) -> list:
        require(len(model_chunks) == 1, "teacher_hook: virtual pipeline parallelism (several model chunks) is not "
                                        "supported")
        require(ps.get_context_parallel_world_size() == 1, "teacher_hook: context parallelism is not supported")
        student = unwrap(model_chunks[0])
        cfg = student.config
        require(student.vocab_size >= t_desc.vocab_size,
                f"teacher_hook: the student's vocabulary ({student.vocab_size} rows) is smaller than the "
                f"teacher's ({t_desc.vocab_size} tokens)")
        dtype = next(student.parameters()).dtype
        overrides = {k: getattr(cfg, k) for k in _SHARED_SETTINGS if hasattr(cfg, k)}
        overrides["params_dtype"] = dtype
        teacher_model, _ = load_checkpoint(path, dtype=dtype, padded_vocab_size=student.vocab_size,
                                           config_overrides=overrides)
        pairs = parse_pairs(loss.pairs, SimpleNamespace(num_layers=cfg.num_layers), t_desc)
        module = DistillationModel(student, teacher_model, pairs, loss.pair_loss, student_layers=cfg.num_layers,
                                   teacher_layers=t_desc.num_layers, seed=seed)
        module.pair_weight_setting = loss.pair_weight
        module.pair_weights.copy_(initial_pair_weights(loss.pair_weight, len(pairs)))
        module.kd_logit = LogitLossConfig(temperature=loss.temperature, kind=loss.kind, top_k=loss.top_k,
                                          kd_weight=loss.kd_weight, ce_weight=loss.ce_weight,
                                          chunk_tokens=loss.chunk_tokens, vocab_size=t_desc.vocab_size,
                                          balance=loss.balance)
        module.step_logit_loss = 0.0
        log.info("teacher %s (%s) attached to the student; %d intermediate pairs", path, t_desc.summary(),
                 len(pairs))
        return [module]

    return hook


# ---------------------------------------------------------------------- forward steps
def _default_batch(data_iterator) -> dict[str, torch.Tensor] | None:
    """Both trainers' GPT datasets yield dicts; the middle pipeline stages read none."""
    if data_iterator is None or not (ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage()):
        return None
    return next(data_iterator)


def _as_dict(batch) -> dict[str, Any]:
    if batch is None:
        return {}
    if isinstance(batch, dict):
        return batch
    keys = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")  # Bridge's get_batch order
    return dict(zip(keys, batch))


def _forward(data_iterator, model, return_schedule_plan: bool, get_batch: Callable | None):
    if return_schedule_plan:
        raise UsageError("nemo_minitron.integrations: return_schedule_plan (combined 1F1B with MoE overlap) is "
                         "not supported")
    holder = _distillation_module(model)
    config = get_model_config(model)
    if getattr(config, "calculate_per_token_loss", False):
        require(all(max(st) == holder.pp - 1 for st in holder.pair_stages),
                "calculate_per_token_loss with intermediate pairs before the last pipeline stage is not supported")

    holder.num_microbatches = get_num_microbatches()
    batch = _as_dict((get_batch or _default_batch)(data_iterator))
    device = next(holder.student.parameters()).device
    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    tokens = batch.get("tokens")
    pos = batch.get("position_ids")
    if pos is None and tokens is not None:
        pos = positions(tokens)
    output = model(tokens, pos, None)
    labels, mask = batch.get("labels"), batch.get("loss_mask")
    return output, lambda out: _loss(holder, out, labels, mask)


def _loss(holder: DistillationModel, student_logits: torch.Tensor, labels, loss_mask):
    cfg: LogitLossConfig = holder.kd_logit
    teacher_logits, holder.last_teacher_logits = holder.last_teacher_logits, None  # free them now
    vocab = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    lab = labels.reshape(-1) if labels is not None else None
    if loss_mask is not None and not bool((loss_mask > 0).all()):
        keep = loss_mask.reshape(-1) > 0
        s, t = s[keep], t[keep]
        lab = lab[keep] if lab is not None else None
    tokens = s.shape[0]
    if tokens == 0:
        zero = student_logits.sum() * 0.0
        return zero, torch.zeros((), dtype=torch.int, device=zero.device), {}
    total, kd, ce, _ = logit_loss(s, t, lab, cfg)
    holder.step_logit_loss += float(total.detach()) / holder.num_microbatches
    loss_sum = (total + holder.last_pair_loss) * tokens
    n = torch.tensor(tokens, dtype=torch.int, device=loss_sum.device)
    report = {"distill loss": torch.stack([loss_sum.detach().clone().float(), n.float()]),
              "kd loss": torch.stack([(kd * tokens).detach().float(), n.float()])}
    if cfg.ce_weight:
        report["lm loss"] = torch.stack([(ce * tokens).detach().float(), n.float()])
    return loss_sum, n, report


def forward_step(state, data_iterator, model, return_schedule_plan: bool = False, *,
                 get_batch: Callable | None = None):
    """Megatron-Bridge's forward step (Bridge injects ``state``; it is not used)."""
    return _forward(data_iterator, model, return_schedule_plan, get_batch)


def megatron_lm_forward_step(data_iterator, model, return_schedule_plan: bool = False, *,
                             get_batch: Callable | None = None):
    """Megatron-LM's forward step (``pretrain(..., forward_step_func=...)``)."""
    return _forward(data_iterator, model, return_schedule_plan, get_batch)


# ---------------------------------------------------------------------- after a step
def step_end(model) -> None:
    """Collective, after every optimizer step: "auto" pair weights from the step's losses
    (reduced over pipeline and data-parallel ranks, as the project's trainer does)."""
    holder = _distillation_module(model)
    stats = torch.tensor([holder.step_logit_loss, *holder.step_pair_losses.tolist()], dtype=torch.float64,
                         device=next(holder.student.parameters()).device)
    if dist.is_initialized():
        dist.all_reduce(stats, group=ps.get_pipeline_model_parallel_group())  # each value lives on one stage
        dist.all_reduce(stats, group=ps.get_data_parallel_group())
        stats /= ps.get_data_parallel_world_size()
    values = stats.tolist()
    if holder.pairs:
        holder.pair_weights.copy_(next_pair_weights(holder.pair_weight_setting, values[0], values[1:]))
    holder.step_logit_loss = 0.0
    holder.step_pair_losses.zero_()


class PairWeights:
    """A Megatron-Bridge callback (``pretrain(..., callbacks=[PairWeights()])``) calling
    ``step_end`` after every training step."""

    def on_train_step_end(self, context) -> None:
        step_end(context.model)
