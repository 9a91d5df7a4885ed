"""Progress bars only where someone watches: on rank 0, when stderr is a terminal (batch
logs such as Slurm's stay readable; the log lines say the same)."""

from __future__ import annotations

import sys

from tqdm import tqdm

from nemo_minitron.runtime.distributed import is_rank0


def show_progress(progress: bool = True) -> bool:
    return bool(progress) and is_rank0() and sys.stderr.isatty()


def progress_bar(total: int | None, desc: str, progress: bool = True, **kwargs):
    return tqdm(total=total, desc=desc, disable=not show_progress(progress), dynamic_ncols=True, **kwargs)
