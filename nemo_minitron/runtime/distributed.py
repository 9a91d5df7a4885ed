"""The one place that starts torch.distributed and megatron-core's parallel state.

Every command calls ``init_distributed(tp, pp, seed)``. Under torchrun the process
group spans all ranks; run directly it is a world of one. NCCL is used when CUDA is
present, gloo otherwise, and only then is ``cpu_fallback`` switched on. Data parallel
size is whatever is left: world size / (tp * pp).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import random
import socket
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from nemo_minitron.config import DEFAULT_SEED, LOG_LEVEL_ENV
from nemo_minitron.errors import UsageError
from nemo_minitron.runtime import cpu_fallback

log = logging.getLogger("nemo_minitron")


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


_layout: Layout | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_world_size(tp: int, pp: int) -> int:
    """Validate --tp/--pp against the launcher's world size; return the data-parallel size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or pp < 1:
        raise UsageError(f"--tp and --pp must be >= 1, got --tp {tp} --pp {pp}")
    if world % (tp * pp):
        hint = "" if world > 1 else f"; launch with: torchrun --nproc-per-node {tp * pp} $(which nemo-minitron) ..."
        raise UsageError(f"--tp {tp} x --pp {pp} = {tp * pp} does not divide the world size {world}{hint}")
    return world // (tp * pp)


def setup_logging(rank: int) -> None:
    """Rank 0 logs at info (or at ``$NEMO_MINITRON_LOG_LEVEL``: debug adds the resolved
    settings of every command), the other ranks warnings only."""
    wanted = logging.getLevelName(os.environ.get(LOG_LEVEL_ENV, "info").upper())
    level = (wanted if isinstance(wanted, int) else logging.INFO) if rank == 0 else logging.WARNING
    fmt = "%(asctime)s %(levelname)s %(message)s" if rank == 0 else f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    # megatron-core logs a lot at INFO (its config dumps); keep the user's log readable.
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def init_distributed(tp: int = 1, pp: int = 1, seed: int = DEFAULT_SEED) -> Layout:
    """Initialise torch.distributed and megatron-core's parallel_state (idempotent for the same layout)."""
    global _layout
    dp = check_world_size(tp, pp)
    if _layout is not None:
        if (_layout.tp, _layout.pp) != (tp, pp):
            # A later stage of the same run wants another layout: same processes, new groups.

            parallel_state.destroy_model_parallel()
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            _layout = dataclasses.replace(_layout, tp=tp, pp=pp, dp=dp)
        seed_everything(seed)
        return _layout
    launched = "WORLD_SIZE" in os.environ  # by torchrun, srun + torchrun, NeMo-Run...
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)

    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        cpu_fallback.enable()
        device, backend = torch.device("cpu"), "gloo"
        # Several ranks on one CPU machine: share the cores instead of oversubscribing them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        if local_world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    if not dist.is_initialized():
        if launched:
            dist.init_process_group(backend=backend)
        else:  # a world of one; leave the environment alone so child processes start clean
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    _write_checkpoints_in_process()
    _layout = Layout(tp=tp, pp=pp, dp=dp, rank=rank, world_size=dist.get_world_size(), device=device)
    seed_everything(seed)
    return _layout


def _write_checkpoints_in_process() -> None:
    """Have megatron-core's checkpoint writer hand its write results back through a plain
    queue in this process. On its first save it would otherwise start a multiprocessing
    manager: a spawned helper process that imports torch to unpickle the results, holds
    every save and the process's exit for seconds, and that a stop signal sent to a whole
    Slurm job step would kill together with the save the signal asks for. Every save here
    is synchronous (dist_checkpointing.save without async_sharded_save): its results
    never leave this process."""
    if getattr(filesystem_async, "_results_queue", False) is None:  # 0.16 to 0.19: made on first save
        filesystem_async._results_queue = queue.Queue()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron-core's tensor-parallel RNG tracker."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def layout() -> Layout:
    if _layout is None:
        raise RuntimeError("init_distributed() has not been called")
    return _layout


def shutdown(wait_for_all: bool = True) -> None:
    """Tear down parallel state and the process group. ``wait_for_all=False`` on error
    paths, where another rank may never reach a barrier."""
    global _layout

    if dist.is_initialized() and wait_for_all:
        dist.barrier()
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _layout = None


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank (in-memory only, never read from disk)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_ranks_ok(ok: bool) -> bool:
    """True only if ``ok`` holds on every rank (so that all ranks take the same branch)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=current_device())
    dist.all_reduce(flag)
    return int(flag.item()) == 0
