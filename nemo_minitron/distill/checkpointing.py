"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    OUT/checkpoints/step_0000123/
        weights/       dist_checkpointing: student (+ projections), optimizer state and
                       a sparse student's masks
        state.json     step, scheduler, pair weights, RNG of every rank (JSON, no pickle)
    OUT/checkpoints/latest   name of the newest complete checkpoint, written last

Each checkpoint is written into a temporary directory and renamed into place; ``latest``
is replaced atomically afterwards, so a run killed at any moment leaves either the old
or the new checkpoint, never a half-written one. The teacher is never saved.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from nemo_minitron.checkpoint.dcp_index import load_sharded
from nemo_minitron.checkpoint.store import atomic_directory
from nemo_minitron.model.params import unwrap
from nemo_minitron.runtime.distributed import barrier, is_rank0
from nemo_minitron.sparsity.masks import has_masks, load_masks_from, mask_sharded_state_dict

log = logging.getLogger("nemo_minitron")

OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def checkpoints_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    marker = checkpoints_dir(out) / "latest"
    if not marker.is_file():
        return None
    path = checkpoints_dir(out) / marker.read_text().strip()
    return path if (path / "state.json").is_file() else None


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None,
        "tracker": {k: v.tolist() for k, v in get_cuda_rng_tracker().get_states().items()},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
    get_cuda_rng_tracker().set_states({k: torch.tensor(v, dtype=torch.uint8) for k, v in state["tracker"].items()})


def _gather_json(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save_training_state(out: Path, step: int, model, optimizer, scheduler, extra: dict[str, Any]) -> Path:
    """Collective. ``model``: the module whose sharded_state_dict holds the student (+ projections)."""
    root = checkpoints_dir(out)
    if is_rank0():
        root.mkdir(parents=True, exist_ok=True)
    barrier()
    final = root / f"step_{step:07d}"
    rng = _gather_json(_rng_state())
    with atomic_directory(final) as tmp:
        model_state = model.sharded_state_dict()
        state = {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state,
                                                                               metadata=OPTIMIZER_FORMAT),
                 "sparsity_masks": mask_sharded_state_dict(_student(model))}
        if is_rank0():
            (tmp / "weights").mkdir()
        barrier()
        dist_checkpointing.save(state, str(tmp / "weights"))
        if is_rank0():
            (tmp / "state.json").write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict(),
                                                        "rng": rng, **extra}))
    if is_rank0():
        marker = root / "latest"
        tmp_marker = root / ".latest.tmp"
        tmp_marker.write_text(final.name)
        os.replace(tmp_marker, marker)
        for old in sorted(root.glob("step_*"))[:-2]:  # keep the two newest
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    log.info("saved training checkpoint %s", final)
    return final


def load_training_state(path: Path, model, optimizer, scheduler, override_schedule: bool = False) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG; returns state.json's content.
    ``override_schedule``: keep the scheduler's (new) learning rates and only take the step
    count from the checkpoint (a forced resume with changed settings)."""
    state = json.loads((path / "state.json").read_text())
    model_state = model.sharded_state_dict()
    request = {"model": model_state, "optimizer": optimizer.sharded_state_dict(
        model_state, is_loading=True, metadata=OPTIMIZER_FORMAT)}
    loaded = load_sharded(request, path / "weights")
    target = model if hasattr(model, "projections") else unwrap(model)
    _load_model_state(target, loaded["model"])
    if has_masks(_student(model)):  # a sparse student's masks, as this run saved them
        load_masks_from(_student(model), path / "weights")
    if override_schedule:  # megatron-core 0.19 pairs saved and current groups by their peak and floor too
        for saved, current in zip(_saved_param_groups(loaded["optimizer"]), optimizer.param_groups):
            saved.update({key: current[key] for key in _SCHEDULE_KEYS if key in current})
    optimizer.load_state_dict(loaded["optimizer"])
    if override_schedule:  # megatron reads the peak and floor from each parameter group first
        for group in optimizer.param_groups:
            if "max_lr" in group:
                group["max_lr"] = scheduler.max_lr
            if "min_lr" in group:
                group["min_lr"] = scheduler.min_lr
    scheduler.load_state_dict(state["scheduler"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    _set_rng_state(state["rng"][rank])
    log.info("resumed from %s (step %d)", path, state["step"])
    return state


#: a parameter group's learning-rate schedule, which a forced resume may change
_SCHEDULE_KEYS = ("max_lr", "min_lr")


def _saved_param_groups(state: dict) -> list[dict]:
    """The parameter groups of a loaded megatron optimizer state: at its top (FP32Optimizer)
    or in its inner optimizer's state (the mixed-precision optimizers)."""
    return state["param_groups"] if "param_groups" in state else state["optimizer"]["param_groups"]


def _student(model):
    """The student inside a DistillationModel (or the model itself)."""
    return model.student if hasattr(model, "projections") else model


def _load_model_state(model, loaded: dict) -> None:
    if hasattr(model, "projections"):  # a DistillationModel: student keys plus projections
        projections = {k: v for k, v in loaded.items() if k.startswith("kd_projection.")}
        student = {k: v for k, v in loaded.items() if not k.startswith("kd_projection.")}
        model.student.load_state_dict(student, strict=False)
        with torch.no_grad():
            for key, value in projections.items():
                model.projections[key.split(".", 1)[1]].weight.copy_(value)
    else:
        model.load_state_dict(loaded, strict=False)
