"""The training loop: distillation (a teacher) or plain fine-tuning (none), on megatron-core.

Each step runs ``get_forward_backward_func()`` over the step's micro-batches with a
Megatron-shaped ``forward_step(data_iterator, model) -> (output, loss_func)``, then the
megatron-core optimizer (the distributed optimizer when data parallel > 1; bf16 or fp16
params with float32 main weights, fp16 with megatron-core's dynamic loss scaler; on a CPU
its torch AdamW uses torch's fused kernel: ``fused_adam_on_cpu``),
gradient clipping and a warm-up + cosine learning-rate schedule.

The teacher is a live model (``DistillationModel`` runs both networks stage by stage) or
a teacher-logit cache (``teacher_logits.TeacherLogits``): then only the student runs, and
the last stage reads each micro-batch's cached top-K distributions by sample index (the
loader passes each sample's index in the training data set along).

Data: a DataLoader (``loader.py``) reads the training data set in Megatron's order from
the number of consumed samples, which every checkpoint holds: a resumed run reads the
samples an uninterrupted one would, at any layout. Each step's record carries a
fingerprint of the tokens it trained on, so that this can be checked.

A sparse student (``sparsify``) keeps its masks: masked weights get zero gradients after
the gradients are reduced and are re-zeroed after every optimizer step, which keeps the
optimizer's main weights and moments at zero there too (``sparsity/masks.py``); the masks
are saved in every training checkpoint.

Stopping: after every step the loop asks whether any rank got SIGTERM or SIGUSR1
(``runtime/signals.py``); then it saves a checkpoint and returns ``stopped``.

Per step, rank 0 appends a record to ``metrics.jsonl`` and TensorBoard (and W&B when
configured), and every ``log_every`` steps logs a Megatron-style line (``metrics.py``);
held-out evaluations are ``{"kind": "eval", ...}`` records.

A mixture-of-experts student keeps its router's load-balancing loss: megatron-core's
router attaches it to the routing probabilities (``MoEAuxLossAutoScaler``, scaled by the
schedule like the main loss) and records it in its tracker, from which each step's
``moe_aux_loss`` (the term added to the objective, summed over layers, averaged over
micro-batches) is reported beside the KD loss and included in ``loss``. The teacher
runs in eval mode, where routers add no such loss.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)
from megatron.core.utils import get_attr_wrapped_model

from nemo_minitron.distill.checkpointing import latest_checkpoint, load_training_state, save_training_state
from nemo_minitron.distill.config import DistillConfig, TrainingConfig, resolved_data_workers
from nemo_minitron.distill.loader import training_batches
from nemo_minitron.distill.losses import LogitLossConfig, logit_loss
from nemo_minitron.distill.metrics import MetricsLog, peak_memory_gb, training_flops_per_token
from nemo_minitron.distill.model import DistillationModel, LayerPair
from nemo_minitron.evaluate import evaluate
from nemo_minitron.model.forward import position_ids, to_device
from nemo_minitron.model.hybrid import tp_sections
from nemo_minitron.model.params import gather, named_weights, unwrap
from nemo_minitron.runtime.distributed import barrier, is_rank0, layout
from nemo_minitron.runtime.progress import progress_bar
from nemo_minitron.runtime.signals import received, stop_requested
from nemo_minitron.sparsity.masks import apply_masks, mask_gradients

FINGERPRINT_MODULUS = 2**31 - 1

log = logging.getLogger("nemo_minitron")

AUTO_PAIR_WEIGHTS = ("auto", "auto_sum")


# ---------------------------------------------------------------------- pair weights
def _pairs_share(setting: str | float | None, n_pairs: int) -> float:
    """The part of the logit loss's weight each pair gets under an automatic setting."""
    return 1.0 / n_pairs if setting == "auto" else 1.0


def initial_pair_weights(setting: str | float | None, n_pairs: int) -> torch.Tensor:
    """Weights of the intermediate pair losses for the first step, before any logit loss is
    known: a fixed number as given; automatic settings start at their share (1/n or 1)."""
    if setting is None or n_pairs == 0:
        return torch.ones(n_pairs, dtype=torch.float64)
    value = _pairs_share(setting, n_pairs) if setting in AUTO_PAIR_WEIGHTS else float(setting)
    return torch.full((n_pairs,), value, dtype=torch.float64)


def next_pair_weights(setting: str | float | None, logit_loss_value: float, pair_losses: list[float]) -> torch.Tensor:
    """Weights after a step with the given logit loss and pair losses.

    ``auto``: weight_i = logit / (n * loss_i): the *mean* of the weighted pair losses equals
    the logit loss, so the intermediate term weighs as much as the logit term whatever the
    number of pairs (what ModelOpt does, by averaging pairs first). ``auto_sum``: weight_i =
    logit / loss_i: every pair weighs as much as the logit loss, n times it together.
    A number stays fixed."""
    n = len(pair_losses)
    if setting not in AUTO_PAIR_WEIGHTS:
        return initial_pair_weights(setting, n)
    share = _pairs_share(setting, n)
    return torch.tensor([share * logit_loss_value / p if p > 1e-12 else share for p in pair_losses],
                        dtype=torch.float64)


# ---------------------------------------------------------------------- data fingerprint
def batch_fingerprint(batch: dict[str, torch.Tensor]) -> int:
    """A number that changes when any token or its position in a sample changes (the order
    of samples within a step does not matter): sum of (token + 1) x weight(position) mod p."""
    total = 0
    for key in ("tokens", "labels"):
        ids = batch[key].to(torch.int64).cpu()
        weights = (torch.arange(1, ids.shape[1] + 1, dtype=torch.int64) * 1_000_003) % FINGERPRINT_MODULUS
        total += int((((ids + 1) * weights) % FINGERPRINT_MODULUS).sum()) % FINGERPRINT_MODULUS
    return total % FINGERPRINT_MODULUS


class _Fingerprinting:
    """Passes micro-batches through to the schedule, adding up their fingerprints."""

    def __init__(self, batches):
        self.batches, self.value = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        self.value = (self.value + batch_fingerprint(batch)) % FINGERPRINT_MODULUS
        return batch


# ---------------------------------------------------------------------- forward steps
def token_weights(batch: dict[str, torch.Tensor], loss_cfg: LogitLossConfig):
    """Per-token (KD, CE) weights of a batch with a loss mask (completions: prompt tokens are
    not trained on) or synthetic samples (a mixed run: cross-entropy with the synthetic
    weight, no KD); (None, None) for plain data, where the config's weights apply."""
    mask, synthetic = batch.get("loss_mask"), batch.get("synthetic")
    if mask is None and synthetic is None:
        return None, None
    if mask is None:
        mask = torch.ones(batch["labels"].shape, device=batch["labels"].device)
    real = torch.ones_like(mask) if synthetic is None else (~synthetic.bool()).float().unsqueeze(-1).expand_as(mask)
    kd = loss_cfg.kd_weight * mask * real
    ce = (loss_cfg.ce_weight * real + loss_cfg.synthetic_weight * (1 - real)) * mask
    return kd, ce


def make_forward_step(loss_cfg: LogitLossConfig, device: torch.device, distilling: bool, teacher_logits=None):
    """``forward_step(data_iterator, model)``: student logits, and a loss function that adds
    the logit loss (KD and/or CE) to the intermediate pair losses of the last stage.
    ``teacher_logits``: a cache to read the teacher's distributions from (by each batch's
    sample ``index``) instead of a live teacher."""
    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator), device)
        tokens, labels = batch["tokens"], batch["labels"]
        output = model(tokens, position_ids(tokens), None)
        holder = get_attr_wrapped_model(model, "pair_weights", return_model_obj=True) if distilling else None

        def loss_func(student_logits: torch.Tensor):
            if teacher_logits is not None:  # only the last stage reads the cache
                teacher = teacher_logits.read(batch["index"].cpu()).to(student_logits.device)
            else:
                teacher = holder.last_teacher_logits if holder is not None else None
            kd_w, ce_w = token_weights(batch, loss_cfg)
            total, kd, ce, con = logit_loss(student_logits, teacher, labels, loss_cfg, kd_w, ce_w)
            logged = (loss_cfg.kd_weight * kd + loss_cfg.ce_weight * ce + loss_cfg.contrastive_weight * con) \
                if kd_w is None else total
            if holder is not None:
                total = total + holder.last_pair_loss
                holder.last_teacher_logits = None  # free the teacher's logits now
            # the schedule divides the returned loss in place: report copies; the logged total
            # adds every stage's pair losses in _reduce_logs
            return total, {"logit_loss": logged.detach().clone(), "kd": kd.detach(), "ce": ce.detach(),
                           "contrastive": con.detach()}

        return output, loss_func

    return forward_step


# ---------------------------------------------------------------------- optimizer
def fused_adam_on_cpu(optimizer) -> None:
    """Let torch's fused AdamW kernel run the update of megatron-core's optimizer where its
    parameters are on a CPU.

    Without Transformer Engine or apex, megatron-core builds ``torch.optim.AdamW`` and passes
    no ``fused``/``foreach`` (its OptimizerConfig has no such option; its CPU-offload
    optimizer is a GPU + CPU hybrid), and torch then takes its for-loop implementation for
    CPU tensors: about seven passes over every parameter and moment per step. The fused CPU
    kernel (torch >= 2.4) does the same update in one vectorised pass. torch reads the
    group's ``fused`` at every step; a resumed checkpoint's parameter groups replace it, so
    the trainer sets it again after loading one."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = getattr(inner, "optimizer", None)
        if not isinstance(adam, (torch.optim.Adam, torch.optim.AdamW)):
            continue  # Transformer Engine's or apex's fused Adam, or no parameters on this rank
        for group in adam.param_groups:
            if not group.get("foreach") and all(p.device.type == "cpu" for p in group["params"]):
                group["fused"] = True


# ---------------------------------------------------------------------- the loop
class Trainer:
    def __init__(self, student, teacher, train_samples, eval_samples, out: Path,
                 cfg: TrainingConfig, *, seed: int, student_desc, teacher_desc=None, pairs: list[LayerPair] = (),
                 projection_init: torch.Tensor | None = None, progress: bool = True,
                 override_schedule: bool = False, teacher_logits=None):
        """``train_samples``: a TokenDataset (or a ``[N, s+1]`` tensor); ``eval_samples``: the
        same, or None; ``cfg``: a DistillConfig when ``teacher`` or ``teacher_logits`` (a cache,
        read by sample index: ``train_samples`` are the samples it was written for) is given,
        else the TrainingConfig of plain fine-tuning; ``pairs``: the intermediate pairs,
        resolved against both models (live teacher only);
        ``override_schedule``: on resume, take the learning-rate schedule from ``cfg``
        rather than from the checkpoint (a forced resume with changed settings)."""
        self.cfg, self.out, self.progress, self.seed = cfg, Path(out), progress, seed
        self.override_schedule = override_schedule
        self.student, self.teacher = student, teacher
        self.student_desc, self.teacher_desc = student_desc, teacher_desc
        self.pairs = list(pairs)
        self.loss_cfg = LogitLossConfig.of(cfg, student_desc.vocab_size)
        self.pair_weight = cfg.kd_pair_weight if isinstance(cfg, DistillConfig) else None
        self.device = layout().device
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.train_samples, self.eval_samples = train_samples, eval_samples
        dtype = next(student.parameters()).dtype
        student.train()
        if teacher is not None:
            self.module = DistillationModel(student, teacher, self.pairs, cfg.kd_pair_loss,
                                            student_layers=student_desc.num_layers,
                                            teacher_layers=teacher_desc.num_layers, projection_init=projection_init,
                                            seed=seed)
            self.module.pair_weights.copy_(initial_pair_weights(self.pair_weight, len(self.pairs)))
        else:
            self.module = student
        self.ddp = DistributedDataParallel(
            student.config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                          use_distributed_optimizer=self.dp > 1),
            self.module)
        self.fp16 = dtype == torch.float16
        # fp16: float32 main weights and megatron-core's dynamic loss scaler (Megatron-LM's
        # window and hysteresis; a first scale of 2^16 rather than 2^32, fewer skipped steps)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr_value, weight_decay=cfg.weight_decay,
                            adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=cfg.clip_grad,
                            bf16=dtype == torch.bfloat16, fp16=self.fp16, params_dtype=dtype,
                            initial_loss_scale=2.0**16 if self.fp16 else None, loss_scale_window=1000,
                            hysteresis=2, use_distributed_optimizer=self.dp > 1),
            [self.ddp])
        fused_adam_on_cpu(self.optimizer)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if cfg.warmup else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr_value,
            lr_warmup_steps=cfg.warmup, lr_decay_steps=cfg.steps, lr_decay_style="cosine",
            start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=cfg.steps, wd_incr_style="constant",
            override_opt_param_scheduler=override_schedule, use_checkpoint_opt_param_scheduler=not override_schedule)
        config = self.ddp.config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.ddp.no_sync
        config.grad_scale_func = self.optimizer.scale_loss
        self.teacher_logits = teacher_logits
        self.forward_step = make_forward_step(self.loss_cfg, self.device, distilling=teacher is not None,
                                              teacher_logits=teacher_logits)
        model_config = unwrap(student).config
        if model_config.num_moe_experts and cfg.moe_aux_loss_coeff is not None:
            model_config.moe_aux_loss_coeff = cfg.moe_aux_loss_coeff  # the routers read it at every step
        self.moe_aux_coeff = float(model_config.moe_aux_loss_coeff) if model_config.num_moe_experts else 0.0
        self.step = 0
        self.last_eval: dict[str, Any] | None = None  # the latest held-out evaluation of train()
        self.consumed_samples = 0
        self.metrics = None
        self._batches = None
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    # -------------------------------------------------------------- helpers
    @property
    def num_microbatches(self) -> int:
        return self.cfg.global_batch // (self.dp * self.cfg.micro_batch)

    def _loader(self, consumed: int, workers: int):
        return training_batches(self.train_samples, consumed=consumed, global_batch=self.cfg.global_batch,
                                micro_batch=self.cfg.micro_batch, dp_rank=self.dp_rank, dp_size=self.dp,
                                workers=workers, with_index=self.teacher_logits is not None)

    def step_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of ``step``, as the loader reads them for that step."""
        batches = self._loader(step * self.cfg.global_batch, workers=0)
        return [next(batches) for _ in range(self.num_microbatches)]

    def flops_per_token(self) -> float:
        return training_flops_per_token(self.student_desc, self.teacher_desc, self.cfg.seq_len)

    def _reduce_logs(self, reported: list[dict], pair_losses: torch.Tensor,
                     pair_weights: torch.Tensor | None = None) -> dict[str, Any]:
        """Mean over micro-batches and DP ranks, from the last stage to every rank; ``loss`` is
        the whole objective: the logit loss plus every stage's weighted pair losses."""
        head_size = 4  # logit loss, KD, CE, contrastive
        stats = torch.zeros(head_size + len(pair_losses), dtype=torch.float64, device=self.device)
        if reported:
            for key, i in (("logit_loss", 0), ("kd", 1), ("ce", 2), ("contrastive", 3)):
                stats[i] = sum(float(r[key]) for r in reported) / len(reported)
        stats[head_size:] = pair_losses.to(stats)
        if dist.is_initialized():
            pp_group = ps.get_pipeline_model_parallel_group()
            last = ps.get_pipeline_model_parallel_last_rank()
            head = stats[:head_size].clone()
            dist.broadcast(head, src=last, group=pp_group)
            stats[:head_size] = head
            if len(pair_losses):  # each pair is computed on exactly one stage (in parts, under SP)
                tail = stats[head_size:].clone()
                dist.all_reduce(tail, group=pp_group)
                if getattr(self.module, "sequence_shards", 1) > 1:
                    dist.all_reduce(tail, group=ps.get_tensor_model_parallel_group())
                stats[head_size:] = tail
            dist.all_reduce(stats, group=ps.get_data_parallel_group())
            stats /= self.dp
        values = stats.tolist()
        pairs = values[head_size:]
        weights = pair_weights.tolist() if pair_weights is not None else [0.0] * len(pairs)
        total = values[0] + sum(w * p for w, p in zip(weights, pairs))
        contrastive = {"contrastive_loss": values[3]} if self.loss_cfg.contrastive_weight else {}
        return {"loss": total, "kd_loss": values[1], "ce_loss": values[2], **contrastive, "pair_losses": pairs,
                **({"pair_weights": weights} if pairs else {})}

    def log_record(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.record(record)

    def evaluate(self, model) -> dict[str, float]:
        result = evaluate(model, self.student_desc.vocab_size, self.eval_samples, micro_batch=self.cfg.micro_batch)
        return {"heldout_loss": result.loss, "heldout_perplexity": result.perplexity, "heldout_tokens": result.tokens}

    # -------------------------------------------------------------- run
    def prepare(self, config: dict[str, Any] | None = None) -> bool:
        """Create the output directory and logs, and resume if it holds a checkpoint.
        Returns True when resumed. ``config``: the run's settings, for W&B."""
        if is_rank0():
            self.out.mkdir(parents=True, exist_ok=True)
        barrier()
        # a DistillConfig: distillation, also from a cache or from the teacher's generations alone
        kind = "distillation" if isinstance(self.cfg, DistillConfig) else "fine-tuning"
        self.metrics = MetricsLog(self.out, kind=kind, total_steps=self.cfg.steps, log_every=self.cfg.log_every,
                                  config=config or {})
        self.resume_if_possible()
        return self.step > 0

    def resume_if_possible(self) -> None:
        path = latest_checkpoint(self.out)
        if path is None:
            self.metrics.restart()  # a fresh run starts a fresh log
            return
        state = load_training_state(path, self.module, self.optimizer, self.scheduler,
                                    override_schedule=self.override_schedule)
        fused_adam_on_cpu(self.optimizer)
        self.step = state["step"]
        # the data position; checkpoints from before it was saved consumed global_batch per step
        self.consumed_samples = state.get("consumed_samples", self.step * self.cfg.global_batch)
        if isinstance(self.module, DistillationModel):
            self.module.pair_weights.copy_(torch.tensor(state["pair_weights"], dtype=torch.float64))
        self.metrics.truncate(self.step)

    def save(self) -> None:
        weights = self.module.pair_weights.tolist() if isinstance(self.module, DistillationModel) else []
        save_training_state(self.out, self.step, self.module, self.optimizer, self.scheduler,
                            {"pair_weights": weights, "consumed_samples": self.consumed_samples})

    def _forward_backward(self, batches) -> dict[str, Any]:
        """Forward and backward over the next step's micro-batches from ``batches``
        (megatron-core's schedule, gradients accumulated); the step's losses and the
        fingerprint of its samples, reduced to every rank."""
        distilling = isinstance(self.module, DistillationModel)
        extra = {}
        if distilling:
            self.module.num_microbatches = self.num_microbatches
            self.module.loss_scale = float(self.optimizer.get_loss_scale())
            self.module.step_pair_losses.zero_()
            if self.module.pp > 1:
                extra["adjust_tensor_shapes_fn"] = self.module.adjust_tensor_shapes
        data = _Fingerprinting(batches)
        if self.moe_aux_coeff:
            clear_aux_losses_tracker()
        reported = get_forward_backward_func()(
            forward_step_func=self.forward_step, data_iterator=data, model=[self.ddp],
            num_microbatches=self.num_microbatches, seq_length=self.cfg.seq_len,
            micro_batch_size=self.cfg.micro_batch, forward_only=False, **extra)
        mask_gradients(self.student)  # a sparse student: masked weights get no update (sparsity/masks.py)
        pair_losses = self.module.step_pair_losses if distilling else torch.zeros(0)
        logs = self._reduce_logs(reported, pair_losses, self.module.pair_weights if distilling else None)
        if self.moe_aux_coeff:
            logs["moe_aux_loss"] = self._moe_aux_loss()
            logs["loss"] += logs["moe_aux_loss"]
        fingerprint = torch.tensor([data.value], dtype=torch.int64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(fingerprint, group=ps.get_data_parallel_group())
        return {**logs, "samples_fingerprint": int(fingerprint.item()) % FINGERPRINT_MODULUS}

    def _moe_aux_loss(self) -> float:
        """The step's load-balancing loss as it entered the objective (collective): megatron's
        tracker holds, per layer, the loss without its coefficient, summed over micro-batches;
        reduced over pipeline stages (each holds its layers), sequence-parallel ranks (each
        holds its tokens' part) and data-parallel ranks (mean)."""
        # megatron logs the loss under its kind: per micro-batch ("aux_loss", our GPT MoE
        # families) or per sequence ("seq_aux_loss", Nemotron 3's, model.builder.moe_config)
        kind = unwrap(self.student).config.moe_router_load_balancing_type
        name = "seq_load_balancing_loss" if kind == "seq_aux_loss" else "load_balancing_loss"
        reduce_aux_losses_tracker_across_ranks([name])
        value = self.moe_aux_coeff * get_moe_layer_wise_logging_tracker()[name]["values"].double().sum().item()
        clear_aux_losses_tracker()
        return value / self.num_microbatches

    def gradients(self, step: int = 0) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """One forward-backward pass over ``step``'s batches, no update: the logs and this
        stage's full (TP-gathered) gradients by canonical name. For layout-equality checks."""
        self.ddp.zero_grad_buffer()
        logs = self._forward_backward(iter(self.step_batches(step)))
        group = ps.get_tensor_model_parallel_group()
        gated = unwrap(self.student).config.gated_linear_unit
        grads = {name: gather(name, p.main_grad.detach().float(), group=group, gated=gated,
                              sections=tp_sections(self.student_desc, name)).cpu()
                 for name, p in named_weights(self.student) if isinstance(p, torch.nn.Parameter)}
        if isinstance(self.module, DistillationModel):
            for key, proj in self.module.projections.items():
                grads[f"kd_projection.{key}"] = proj.weight.main_grad.detach().float().cpu()
        return logs, grads

    def train(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train from the current step to ``cfg.steps`` (or only up to ``stop_at``: then a
        checkpoint is saved there, and a later run resumes from it on the same schedule), or
        until a stop signal (then save and return with ``stopped``: the signal's name)."""
        cfg = self.cfg
        until = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        distilling = isinstance(self.module, DistillationModel)
        tokens_per_step = cfg.global_batch * cfg.seq_len
        flops_per_step = self.flops_per_token() * tokens_per_step
        kind = "distill" if isinstance(cfg, DistillConfig) else "fine-tune"
        bar = progress_bar(cfg.steps, kind, self.progress, initial=self.step, unit="step")
        self._batches = self._loader(self.consumed_samples,
                                     resolved_data_workers(cfg.data_workers, torch.cuda.is_available()))
        last, stopped = {}, None
        started, trained_steps = time.time(), 0
        saved_at = self.step
        while self.step < until:
            t0 = time.time()
            self.ddp.train()
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            logs = self._forward_backward(self._batches)
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
            ok, grad_norm, _ = self.optimizer.step()
            apply_masks(self.student)
            self.scheduler.step(increment=1)
            self.step += 1
            self.consumed_samples += cfg.global_batch
            trained_steps += 1
            if distilling and self.pairs:
                logit_part = self.loss_cfg.kd_weight * logs["kd_loss"] + self.loss_cfg.ce_weight * logs["ce_loss"] \
                    + self.loss_cfg.contrastive_weight * logs.get("contrastive_loss", 0.0)
                self.module.pair_weights.copy_(next_pair_weights(self.pair_weight, logit_part, logs["pair_losses"]))
            elapsed = time.time() - t0
            last = {"kind": "train", "step": self.step, **logs, "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else None, "skipped": not ok,
                    "loss_scale": float(self.optimizer.get_loss_scale()) if self.fp16 else None,
                    "consumed_samples": self.consumed_samples, "tokens": self.consumed_samples * cfg.seq_len,
                    "step_seconds": elapsed, "tokens_per_second": tokens_per_step / elapsed,
                    "tflops_per_device": flops_per_step / elapsed / self.world_size / 1e12,
                    "peak_memory_gb": peak_memory_gb()}
            self.log_record(last)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{tokens_per_step / elapsed:,.0f}")
            bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.last_eval = {"kind": "eval", "step": self.step, **self.evaluate(self.student)}
                self.log_record(self.last_eval)
            saved = cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps
            if saved:
                self.save()
                saved_at = self.step
            if self.step < cfg.steps and stop_requested():
                stopped = received() or "a signal on another rank"
                log.warning("stop requested (%s): saving at step %d and exiting", stopped, self.step)
                if not saved:
                    self.save()
                    saved_at = self.step
                break
        bar.close()
        if self.step < cfg.steps and saved_at != self.step:
            self.save()  # stopped before the end (stop_at): resumable from here
        self._batches = None  # ends the loader's worker processes
        wall = time.time() - started
        return {"final_train": last, "trained_steps": trained_steps, "wall_seconds": wall, "stopped": stopped,
                "tokens_per_second": trained_steps * tokens_per_step / wall if trained_steps else None}

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
