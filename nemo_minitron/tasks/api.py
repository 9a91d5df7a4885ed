"""Downstream task accuracy through lm-evaluation-harness, at any TP/PP/DP layout.

``resolve_tasks`` checks task names and loads their data before any model is built
(an unknown name is a one-line error listing the close matches; lm-eval's own task
index, about 15,000 names, is read only when a name is neither built in nor under
``--tasks-path``). ``run_tasks`` scores them with ``MegatronLM``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from nemo_minitron.config import DEFAULT_SEED
from nemo_minitron.errors import UsageError, require
from nemo_minitron.runtime.distributed import broadcast_object
from nemo_minitron.tasks.builtin import BUILTIN_TASKS, task_config

log = logging.getLogger("nemo_minitron")


@dataclasses.dataclass(frozen=True)
class TaskResult:
    task: str
    metrics: dict[str, float]  # e.g. {"acc": 0.41, "acc_norm": 0.44}
    stderr: dict[str, float]  # standard error of each metric that has one
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_task_names(text: str | Sequence[str], flag: str = "--tasks") -> list[str]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    require(names, f"{flag} needs at least one task name (e.g. minitron_lastword,minitron_nextsentence)")
    return list(dict.fromkeys(names))


def _quiet_lm_eval() -> None:
    # lm-eval logs every task it indexes and warns about custom data sets: our log says what runs
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


@functools.lru_cache(maxsize=4)
def _task_manager(tasks_path: str | None, include_defaults: bool):
    """lm-eval's task index (reading its ~15,000 task files takes seconds: once per process)."""
    from lm_eval.tasks import TaskManager  # deferred: lm-eval takes seconds; only runs with --tasks

    return TaskManager(include_path=tasks_path, include_defaults=include_defaults)


@dataclasses.dataclass
class ResolvedTasks:
    """Checked task names, the lm-eval specs and task manager that load them."""

    names: list[str]
    specs: list[Any]  # built-in task configs (dicts) and lm-eval task names
    manager: Any  # lm_eval.tasks.TaskManager


def resolve_tasks(names: str | Sequence[str], tasks_path: str | None = None, *, flag: str = "--tasks",
                  path_flag: str = "--tasks-path") -> ResolvedTasks:
    """Check task names and load their data once (no collective; every rank may call it).
    Raises UsageError for an unknown name or data that cannot be loaded."""
    _quiet_lm_eval()
    names = parse_task_names(names, flag)
    if tasks_path is not None:
        require(Path(tasks_path).is_dir(), f"{path_flag} '{tasks_path}' is not a directory")
    others = [n for n in names if n not in BUILTIN_TASKS]
    manager = _task_manager(tasks_path, include_defaults=False)
    if any(n not in manager.all_tasks for n in others):
        manager = _task_manager(tasks_path, include_defaults=True)
    for n in others:
        if n not in manager.all_tasks:
            close = difflib.get_close_matches(n, list(manager.all_tasks) + list(BUILTIN_TASKS), n=5, cutoff=0.6)
            hint = (f"close matches: {', '.join(close)}" if close else
                    f"built in: {', '.join(BUILTIN_TASKS)}; `lm-eval ls tasks` lists lm-eval's")
            raise UsageError(f"{flag}: unknown task '{n}' ({hint})")
    specs = [task_config(n) if n in BUILTIN_TASKS else n for n in names]
    try:
        manager.load(specs)
    except Exception as e:  # data sets come from the Hub or local files; any failure means no data
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{flag} {','.join(others or names)}: the task data could not be loaded "
                         f"({type(e).__name__}: {first})") from None
    return ResolvedTasks(names, specs, manager)


def run_tasks(lm, tasks: ResolvedTasks, *, limit: int | float | None = None, num_fewshot: int | None = None,
              seed: int = DEFAULT_SEED, bootstrap_iters: int = 1000) -> dict[str, TaskResult]:
    """Score the tasks with ``lm`` (a ``MegatronLM``, or any lm-eval LM); results on every rank."""
    from lm_eval.evaluator import simple_evaluate  # deferred: see _task_manager

    _quiet_lm_eval()
    out = simple_evaluate(model=lm, tasks=tasks.specs, task_manager=tasks.manager, num_fewshot=num_fewshot,
                          limit=limit, bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
                          torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False)
    _quiet_lm_eval()
    results = None
    if out is not None:
        results = {}
        # the requested names only (a group such as mmlu reports its aggregate, not its 57 subtasks)
        shown = {t: out["results"][t] for t in tasks.names if t in out["results"]} or out["results"]
        counts = out.get("n-samples", {})
        for task, values in shown.items():
            metrics, stderr = {}, {}
            for key, value in values.items():
                name, _, filter_name = key.partition(",")
                if not filter_name or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if name.endswith("_stderr"):
                    if math.isfinite(value):
                        stderr[name[:-len("_stderr")]] = float(value)
                else:
                    metrics[name] = float(value)
            samples = _examples(task, counts, out.get("group_subtasks", {}))
            results[task] = TaskResult(task, metrics, stderr, samples)
    return broadcast_object(results)


def _examples(task: str, counts: dict, groups: dict) -> int:
    """Examples scored for a task, or summed over a group's (nested) subtasks."""
    if task in counts:
        return int(counts[task].get("effective", 0))
    return sum(_examples(m, counts, groups) for m in groups.get(task, []))
