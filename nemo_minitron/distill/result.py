"""What ``distill`` and ``finetune`` return: how the run ended, and what it measured."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Status = Literal["finished", "stopped", "paused"]


@dataclasses.dataclass
class DistillResult:
    """How a training run ended (``status``), and what each ending has:

    - ``finished``: every step trained, ``OUT/final/`` and ``OUT/summary.json`` written;
      ``summary`` is the content of that file.
    - ``stopped``: a stop signal (``signal``: its name) ended the run at ``step``; its
      checkpoint is saved and the run continues when started again.
    - ``paused``: ``stop_at`` was reached at ``step``: a checkpoint is saved there and the
      student evaluated (``student_now``; ``student_before`` is the evaluation before the
      first step, None when this call resumed); a later call continues (successive
      halving in ``search``).
    """

    status: Status
    kind: str  # distillation | fine-tuning
    step: int  # the last step trained
    steps: int  # the steps of the full schedule
    summary: dict[str, Any] | None = None
    signal: str | None = None
    student_before: dict[str, float] | None = None
    student_now: dict[str, Any] | None = None
    final_train: dict[str, Any] | None = None

    @property
    def heldout_loss(self) -> float:
        """The student's held-out loss where the run ended (paused or finished)."""
        if self.status == "paused":
            return self.student_now["heldout_loss"]
        if self.status == "finished":
            return self.summary["student_after"]["heldout_loss"]
        raise ValueError(f"a {self.kind} run stopped by {self.signal} at step {self.step} has no evaluation")
