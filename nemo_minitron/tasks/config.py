"""Downstream-task settings (``eval --tasks``; the report's are in ``pipeline.recipe``).
A light module: the command line reads it without torch or lm-eval."""

from __future__ import annotations

import dataclasses
from typing import Optional

from nemo_minitron.config import option


def task_list(text: str) -> list[str]:
    return [name.strip() for name in str(text).split(",") if name.strip()]


TASKS_HELP = ("lm-evaluation-harness tasks, comma-separated: the built-in minitron_lastword and "
              "minitron_nextsentence (no download), lm-eval's own (hellaswag, winogrande, mmlu, ...: their data "
              "come from the Hugging Face Hub) or those under the tasks path")


@dataclasses.dataclass
class TaskConfig:
    """Which lm-eval tasks, and how many examples of each."""

    tasks: list[str] = option([], TASKS_HELP, parse=task_list, metavar="TASK,...")
    tasks_path: Optional[str] = option(None, "folder of local lm-eval task definitions (YAML)", default_text="none",
                                       metavar="DIR")
    task_limit: Optional[int] = option(None, "examples per task at most", ge=1, default_text="all", metavar="N")
    num_fewshot: Optional[int] = option(None, "few-shot examples", ge=0, default_text="the task's, else 0",
                                        metavar="N")
