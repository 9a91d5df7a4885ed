"""What a training run reports, on rank 0: ``metrics.jsonl``, TensorBoard, optional Weights
& Biases, and a Megatron-style log line every ``log_every`` steps.

    step 120/9960 | consumed samples 138240 | consumed tokens 1.13B | loss 2.4123 | kd 2.3011 | ce 0.0000 |
    pairs 0.1021 | lr 9.998E-05 | grad norm 0.812 | 1843.2 ms/step | 5,120,333 tokens/s |
    412.7 TFLOP/s per device | peak memory 61.3 GB

TFLOP/s per device counts the model's FLOPs (``ModelDescription.flops_per_token``:
matrix products and attention): 3x the student's forward (forward and backward) plus
the teacher's forward, over every device of the run. Peak memory is the accelerator's
peak allocation, or the process's peak RSS on a CPU. W&B logs when ``wandb`` imports and
``WANDB_PROJECT`` is set (``WANDB_MODE=offline`` works without a network).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import uuid
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from nemo_minitron.runtime.distributed import is_rank0

log = logging.getLogger("nemo_minitron")


def training_flops_per_token(student, teacher, seq_len: int) -> float:
    """Forward + backward of the student (3 forwards' worth) and the teacher's forward."""
    return 3.0 * student.flops_per_token(seq_len) + (teacher.flops_per_token(seq_len) if teacher is not None else 0.0)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def log_line(r: dict[str, Any], total_steps: int) -> str:
    """The Megatron-style summary of one training record."""
    parts = [f"step {r['step']}/{total_steps}", f"consumed samples {r['consumed_samples']}",
             f"consumed tokens {_count(r['tokens'])}", f"loss {r['loss']:.4f}"]
    if r.get("kd_loss") or r.get("ce_loss"):
        parts += [f"kd {r['kd_loss']:.4f}", f"ce {r['ce_loss']:.4f}"]
    if r.get("pair_losses"):
        parts.append("pairs " + ",".join(f"{p:.4f}" for p in r["pair_losses"]))
    parts.append(f"lr {r['lr']:.3E}")
    if r.get("grad_norm") is not None:
        parts.append(f"grad norm {r['grad_norm']:.3f}")
    if r.get("loss_scale") is not None:
        parts.append(f"loss scale {r['loss_scale']:g}")
    if r.get("skipped"):
        parts.append("skipped (inf/nan gradients)")
    parts += [f"{1000 * r['step_seconds']:.1f} ms/step", f"{r['tokens_per_second']:,.0f} tokens/s"]
    if r.get("tflops_per_device") is not None:
        value = r["tflops_per_device"]
        parts.append(f"{value:.1f} TFLOP/s per device" if value >= 1 else f"{value:.3g} TFLOP/s per device")
    parts.append(f"peak memory {r['peak_memory_gb']:.1f} GB")
    return " | ".join(parts)


class MetricsLog:
    """Rank 0 writes; other ranks' calls do nothing."""

    def __init__(self, out: Path, *, kind: str, total_steps: int, log_every: int, config: dict[str, Any]):
        self.out, self.kind, self.total_steps, self.log_every = Path(out), kind, total_steps, log_every
        self.file = self.out / "metrics.jsonl"
        self.writer = self.wandb = None
        if not is_rank0():
            return

        self.writer = SummaryWriter(str(self.out / "tensorboard"))
        if os.environ.get("WANDB_PROJECT"):
            try:
                import wandb  # deferred: an optional dependency
            except ImportError:
                log.warning("WANDB_PROJECT is set but wandb is not installed; logging to TensorBoard only")
            else:
                self.wandb = wandb.init(project=os.environ["WANDB_PROJECT"], name=f"{self.out.name}-{kind}",
                                        dir=str(self.out), config=config, resume="allow",
                                        id=_wandb_run_id(self.out))

    @property
    def active(self) -> bool:
        return self.writer is not None

    def truncate(self, step: int) -> None:
        """Keep the records up to ``step`` (resuming from a checkpoint at that step)."""
        if self.active and self.file.exists():
            kept = [line for line in self.file.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= step]
            self.file.write_text("".join(line + "\n" for line in kept))

    def restart(self) -> None:
        if self.active and self.file.exists():
            self.file.unlink()

    def record(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with open(self.file, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {f"{record['kind']}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind")}
        for i, value in enumerate(record.get("pair_losses") or []):
            scalars[f"{record['kind']}/pair_loss_{i}"] = value
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])
        if record["kind"] == "train" and (record["step"] % self.log_every == 0 or record["step"] == self.total_steps):
            log.info("%s", log_line(record, self.total_steps))
        elif record["kind"] == "eval":
            log.info("step %d/%d | held-out loss %.4f | perplexity %.2f", record["step"], self.total_steps,
                     record["heldout_loss"], record["heldout_perplexity"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run_id(out: Path) -> str:
    """One W&B run per output directory, continued when the training resumes."""
    file = out / ".wandb_run_id"
    if file.is_file():
        return file.read_text().strip()

    run_id = uuid.uuid4().hex[:12]
    file.write_text(run_id)
    return run_id
