"""Start the ranks of a 2-process worker run as children of one pre-imported process.

A `torch.distributed.run` launch costs three interpreter start-ups (the launcher and two
ranks importing torch, megatron-core, transformers and the project): about 7 s of the
2-core machine per worker run before any work, over 20 runs in `make test`. Here a
multiprocessing forkserver imports all that once per test session; each rank is a fresh
process forked from it (no threads, no process group, no megatron state yet), given the
environment torchrun gives a rank (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_*), and runs
the worker script as ``__main__``. The ranks still meet over gloo as separate processes.
Users' launches (torchrun) stay covered by the command-line tests that run under it.
"""

from __future__ import annotations

import atexit
import faulthandler
import multiprocessing
import os
import runpy
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

#: What the workers import, loaded once into the forkserver (a module that is missing is
#: skipped by multiprocessing, not an error: the worker then imports it itself)
PRELOAD = ["torch", "torch.distributed", "transformers", "megatron.core", "megatron.core.pipeline_parallel",
           "megatron.core.distributed", "nemo_minitron.checkpoint.api", "nemo_minitron.checkpoint.store",
           "nemo_minitron.checkpoint.hf_import", "nemo_minitron.checkpoint.hf_export", "nemo_minitron.model.forward",
           "nemo_minitron.importance.api", "nemo_minitron.prune.api", "nemo_minitron.distill.api",
           "nemo_minitron.sparsity.api", "nemo_minitron.generate.api", "nemo_minitron.tasks.api",
           "nemo_minitron.runtime.distributed", "rank_launcher"]

#: What torchrun and conftest.run_workers set for every rank
RANK_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
            "PYTHONFAULTHANDLER": "1"}

_context = None


def _forkserver():
    """The session's forkserver context, started with the ranks' environment (its imports
    then see what the ranks' interpreters saw: warnings off, one OpenMP thread)."""
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        saved = {k: os.environ.get(k) for k in RANK_ENV}
        os.environ.update(RANK_ENV)
        try:
            from multiprocessing import forkserver

            forkserver.ensure_running()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        _context = context
    return _context


def _rank_main(script: str, args: list[str], env: dict[str, str], log: str) -> None:
    """One rank: its output into ``log``, torchrun's environment, the script as __main__,
    and an exit like an interpreter's (atexit handlers run, the exit status kept)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(env)
    faulthandler.enable()
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)  # OMP_NUM_THREADS=1, as torchrun sets for several ranks per machine
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).parent))
    status = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def launch(script: Path, args: list[str], *, nproc: int, port: int, logs: Path, timeout: float) -> tuple[int, str]:
    """Run ``script`` on ``nproc`` ranks; (exit status, their output with torchrun's
    ``[defaultN]:`` line prefixes and a line per failed rank). When one rank fails, the
    others are stopped (as torchrun does) rather than left waiting in a collective."""
    context = _forkserver()
    logs.mkdir(parents=True, exist_ok=True)
    ranks = []
    for rank in range(nproc):
        env = dict(RANK_ENV, RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = logs / f"rank{rank}.log"
        # created here: on a loaded machine a rank may be stopped (another rank failed first)
        # before it opens its log, and it then has nothing to say rather than no file
        log.touch()
        p = context.Process(target=_rank_main, args=(str(script), args, env, str(log)))
        p.start()
        ranks.append(p)
    deadline = time.monotonic() + timeout
    failed_at = None
    while any(p.is_alive() for p in ranks):
        if failed_at is None and any(p.exitcode not in (None, 0) for p in ranks):
            failed_at = time.monotonic()
            for p in ranks:
                if p.is_alive():
                    p.terminate()
        if time.monotonic() > deadline or (failed_at is not None and time.monotonic() - failed_at > 10):
            for p in ranks:
                if p.is_alive():
                    p.kill()
        time.sleep(0.05)
    lines, status = [], 0
    for rank, p in enumerate(ranks):
        p.join()
        text = (logs / f"rank{rank}.log").read_text(errors="replace")
        lines += [f"[default{rank}]:{line}" for line in text.splitlines()]
    for rank, p in enumerate(ranks):
        if p.exitcode:
            how = (f"signal {signal.Signals(-p.exitcode).name}" if p.exitcode < 0 else f"exit code {p.exitcode}")
            lines.append(f"rank {rank} (pid {p.pid}) ended with {how}")
            status = status or (128 - p.exitcode if p.exitcode < 0 else p.exitcode)
    if time.monotonic() > deadline:
        lines.append(f"timed out after {timeout} s")
        status = status or 124
    return status, "\n".join(lines) + "\n"
