"""The training loop: distillation (a teacher) or plain fine-tuning (none), on megatron-core.

Each step runs ``get_forward_backward_func()`` over the step's micro-batches with a
Megatron-shaped ``forward_step(data_iterator, model) -> (output, loss_func)``, then the
megatron-core optimizer (the distributed optimizer when data parallel > 1; bf16 params
with float32 main weights when training in bf16), gradient clipping and a warm-up +
cosine learning-rate schedule. Step ``s`` reads samples ``[s * global_batch, (s + 1) *
global_batch)`` of the training data set (megatron-core's GPTDataset, shuffled by seed),
data-parallel rank ``r`` the ``r``-th share of them: the samples a step sees depend on
the step alone, at every layout, and a resumed run sees what an uninterrupted one would.

Per step, rank 0 appends a JSON line to ``metrics.jsonl`` (losses, learning rate,
gradient norm, tokens/s) and TensorBoard scalars; held-out evaluations are appended as
``{"kind": "eval", ...}`` records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_minitron.distill.losses import LogitLossConfig, logit_loss
from nemo_minitron.distill.model import DistillationModel, LayerPair

log = logging.getLogger("nemo_minitron")


@dataclasses.dataclass
class TrainConfig:
    steps: int
    global_batch: int = 8
    micro_batch: int = 2
    seq_len: int = 512
    lr: float = 1e-4
    min_lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    eval_every: int = 0
    eval_samples: int = 64
    save_every: int = 0
    seed: int = 1234
    logit: LogitLossConfig = dataclasses.field(default_factory=LogitLossConfig)
    pairs: list[LayerPair] = dataclasses.field(default_factory=list)
    pair_loss: str = "cosine"
    pair_weight: str | float = "auto"

    @property
    def min_lr_value(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def warmup(self) -> int:
        wanted = max(0, round(0.05 * self.steps)) if self.warmup_steps is None else self.warmup_steps
        return min(wanted, self.steps - 1)  # the schedule needs at least one step of decay


# ---------------------------------------------------------------------- data order
def step_samples(samples, step: int, global_batch: int, dp_rank: int, dp_size: int) -> torch.Tensor:
    """``[global_batch / dp, s+1]``: data-parallel rank ``dp_rank``'s share of ``step``'s samples,
    ``samples`` being a TokenDataset or a ``[N, s+1]`` tensor (indices wrap around N)."""
    per_rank = global_batch // dp_size
    first = step * global_batch + dp_rank * per_rank
    return torch.stack([samples[(first + j) % len(samples)] for j in range(per_rank)])


# ---------------------------------------------------------------------- forward steps
def make_forward_step(cfg: TrainConfig, device: torch.device, distilling: bool):
    """``forward_step(data_iterator, model)``: student logits, and a loss function that adds
    the logit loss (KD and/or CE) to the intermediate pair losses of the last stage."""
    from megatron.core.utils import get_attr_wrapped_model

    from nemo_minitron.model.forward import position_ids, to_device

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator), device)
        tokens, labels = batch["tokens"], batch["labels"]
        output = model(tokens, position_ids(tokens), None)
        holder = get_attr_wrapped_model(model, "pair_weights", return_model_obj=True) if distilling else None

        def loss_func(student_logits: torch.Tensor):
            teacher_logits = holder.last_teacher_logits if holder is not None else None
            total, kd, ce = logit_loss(student_logits, teacher_logits, labels, cfg.logit)
            if holder is not None:
                total = total + holder.last_pair_loss
                holder.last_teacher_logits = None  # free the teacher's logits now
            # the schedule divides the returned loss in place: report a copy
            return total, {"loss": total.detach().clone(), "kd": kd.detach(), "ce": ce.detach()}

        return output, loss_func

    return forward_step


# ---------------------------------------------------------------------- the loop
class Trainer:
    def __init__(self, student, teacher, tokenizer_path: Path, train_samples, eval_samples, out: Path,
                 cfg: TrainConfig, *, student_desc, teacher_desc=None, projection_init: torch.Tensor | None = None,
                 progress: bool = True):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from nemo_minitron.runtime.distributed import layout

        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.student, self.teacher = student, teacher
        self.student_desc, self.teacher_desc = student_desc, teacher_desc
        self.tokenizer_path = tokenizer_path
        self.device = layout().device
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.train_samples, self.eval_samples = train_samples, eval_samples
        dtype = next(student.parameters()).dtype
        student.train()
        if teacher is not None:
            self.module = DistillationModel(student, teacher, cfg.pairs, cfg.pair_loss,
                                            student_layers=student_desc.num_layers,
                                            teacher_layers=teacher_desc.num_layers, projection_init=projection_init,
                                            seed=cfg.seed)
            if cfg.pair_weight != "auto":
                self.module.pair_weights.fill_(float(cfg.pair_weight))
        else:
            self.module = student
        self.ddp = DistributedDataParallel(
            student.config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                          use_distributed_optimizer=self.dp > 1),
            self.module)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr_value, weight_decay=cfg.weight_decay,
                            adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=cfg.clip_grad,
                            bf16=dtype == torch.bfloat16, params_dtype=dtype, use_distributed_optimizer=self.dp > 1),
            [self.ddp])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if cfg.warmup else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr_value,
            lr_warmup_steps=cfg.warmup, lr_decay_steps=cfg.steps, lr_decay_style="cosine",
            start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=cfg.steps, wd_incr_style="constant")
        config = self.ddp.config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.ddp.no_sync
        config.grad_scale_func = self.optimizer.scale_loss
        self.forward_step = make_forward_step(cfg, self.device, distilling=teacher is not None)
        self.step = 0
        self.metrics_file = self.out / "metrics.jsonl"
        self.writer = None

    # -------------------------------------------------------------- helpers
    @property
    def num_microbatches(self) -> int:
        return self.cfg.global_batch // (self.dp * self.cfg.micro_batch)

    def _microbatches(self, step: int) -> list[dict[str, torch.Tensor]]:
        from nemo_minitron.model.forward import split_microbatches

        mine = step_samples(self.train_samples, step, self.cfg.global_batch, self.dp_rank, self.dp)
        return split_microbatches(mine, self.cfg.micro_batch)

    def _reduce_logs(self, reported: list[dict], pair_losses: torch.Tensor) -> dict[str, Any]:
        """Mean over micro-batches and DP ranks, from the last stage to every rank."""
        from megatron.core import parallel_state as ps

        stats = torch.zeros(3 + len(pair_losses), dtype=torch.float64, device=self.device)
        if reported:
            for key, i in (("loss", 0), ("kd", 1), ("ce", 2)):
                stats[i] = sum(float(r[key]) for r in reported) / len(reported)
        stats[3:] = pair_losses.to(stats)
        if dist.is_initialized():
            pp_group = ps.get_pipeline_model_parallel_group()
            last = ps.get_pipeline_model_parallel_last_rank()
            head = stats[:3].clone()
            dist.broadcast(head, src=last, group=pp_group)
            stats[:3] = head
            if len(pair_losses):  # each pair is computed on exactly one stage
                tail = stats[3:].clone()
                dist.all_reduce(tail, group=pp_group)
                stats[3:] = tail
            dist.all_reduce(stats, group=ps.get_data_parallel_group())
            stats /= self.dp
        values = stats.tolist()
        return {"loss": values[0], "kd_loss": values[1], "ce_loss": values[2], "pair_losses": values[3:]}

    def log_record(self, record: dict[str, Any]) -> None:
        from nemo_minitron.runtime.distributed import is_rank0

        if not is_rank0():
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            self.writer.flush()

    def evaluate(self, model) -> dict[str, float]:
        from nemo_minitron.evaluate import evaluate

        result = evaluate(model, self.student_desc.vocab_size, self.eval_samples, micro_batch=self.cfg.micro_batch)
        return {"heldout_loss": result.loss, "heldout_perplexity": result.perplexity, "heldout_tokens": result.tokens}

    # -------------------------------------------------------------- run
    def prepare(self) -> bool:
        """Create the output directory and logs, and resume if it holds a checkpoint.
        Returns True when resumed."""
        from nemo_minitron.runtime.distributed import barrier, is_rank0

        if is_rank0():
            self.out.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        barrier()
        self.resume_if_possible()
        return self.step > 0

    def resume_if_possible(self) -> None:
        from nemo_minitron.distill.checkpointing import latest_checkpoint, load_training_state
        from nemo_minitron.runtime.distributed import is_rank0

        path = latest_checkpoint(self.out)
        if path is None:
            if is_rank0() and self.metrics_file.exists():
                self.metrics_file.unlink()  # a fresh run starts a fresh log
            return
        state = load_training_state(path, self.module, self.optimizer, self.scheduler)
        self.step = state["step"]
        if isinstance(self.module, DistillationModel):
            self.module.pair_weights.copy_(torch.tensor(state["pair_weights"], dtype=torch.float64))
        if is_rank0() and self.metrics_file.exists():
            kept = [line for line in self.metrics_file.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            self.metrics_file.write_text("".join(line + "\n" for line in kept))

    def save(self) -> None:
        from nemo_minitron.distill.checkpointing import save_training_state

        weights = self.module.pair_weights.tolist() if isinstance(self.module, DistillationModel) else []
        save_training_state(self.out, self.step, self.module, self.optimizer, self.scheduler,
                            {"pair_weights": weights})

    def _forward_backward(self, step: int) -> dict[str, Any]:
        """Forward and backward over ``step``'s micro-batches (megatron-core's schedule,
        gradients accumulated); the step's losses, reduced to every rank."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        distilling = isinstance(self.module, DistillationModel)
        extra = {}
        if distilling:
            self.module.num_microbatches = self.num_microbatches
            self.module.step_pair_losses.zero_()
            if self.module.pp > 1:
                extra["adjust_tensor_shapes_fn"] = self.module.adjust_tensor_shapes
        reported = get_forward_backward_func()(
            forward_step_func=self.forward_step, data_iterator=iter(self._microbatches(step)), model=[self.ddp],
            num_microbatches=self.num_microbatches, seq_length=self.cfg.seq_len,
            micro_batch_size=self.cfg.micro_batch, forward_only=False, **extra)
        pair_losses = self.module.step_pair_losses if distilling else torch.zeros(0)
        return self._reduce_logs(reported, pair_losses)

    def gradients(self, step: int = 0) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """One forward-backward pass over ``step``'s batches, no update: the logs and this
        stage's full (TP-gathered) gradients by canonical name. For layout-equality checks."""
        from megatron.core import parallel_state as ps

        from nemo_minitron.model.params import gather, named_weights

        self.ddp.zero_grad_buffer()
        logs = self._forward_backward(step)
        group = ps.get_tensor_model_parallel_group()
        grads = {name: gather(name, p.main_grad.detach().float(), group=group).cpu()
                 for name, p in named_weights(self.student)}
        if isinstance(self.module, DistillationModel):
            for key, proj in self.module.projections.items():
                grads[f"kd_projection.{key}"] = proj.weight.main_grad.detach().float().cpu()
        return logs, grads

    def train(self) -> dict[str, Any]:
        from tqdm import tqdm

        from nemo_minitron.runtime.distributed import is_rank0

        cfg = self.cfg
        distilling = isinstance(self.module, DistillationModel)
        tokens_per_step = cfg.global_batch * cfg.seq_len
        bar = tqdm(total=cfg.steps, initial=self.step, desc="distill" if distilling else "fine-tune", unit="step",
                   disable=not (self.progress and is_rank0()), dynamic_ncols=True)
        last = {}
        started, trained_steps = time.time(), 0
        while self.step < cfg.steps:
            t0 = time.time()
            self.ddp.train()
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            logs = self._forward_backward(self.step)
            ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            self.step += 1
            trained_steps += 1
            if distilling and cfg.pair_weight == "auto" and len(cfg.pairs):
                logit_part = cfg.logit.kd_weight * logs["kd_loss"] + cfg.logit.ce_weight * logs["ce_loss"]
                self.module.pair_weights.copy_(torch.tensor(
                    [logit_part / p if p > 1e-12 else 1.0 for p in logs["pair_losses"]], dtype=torch.float64))
            elapsed = time.time() - t0
            last = {"kind": "train", "step": self.step, **logs, "lr": self.optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None, "skipped": not ok,
                    "tokens": self.step * tokens_per_step, "step_seconds": elapsed,
                    "tokens_per_second": tokens_per_step / elapsed}
            self.log_record(last)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{tokens_per_step / elapsed:,.0f}")
            bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.log_record({"kind": "eval", "step": self.step, **self.evaluate(self.student)})
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save()
        bar.close()
        wall = time.time() - started
        return {"final_train": last, "trained_steps": trained_steps, "wall_seconds": wall,
                "tokens_per_second": trained_steps * tokens_per_step / wall if trained_steps else None}
