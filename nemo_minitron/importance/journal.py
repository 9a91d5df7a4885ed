"""What an unfinished importance run has measured, kept so that a killed run resumes.

An importance run on a large model spends most of its time in passes that each yield a
few numbers: the layer-loss passes (one evaluation per skipped layer, block or greedy
step) and the block-variant scores (one pass per variant and micro-batch). Until the
run completes, ``OUT``'s journal, the directory ``.OUT.partial`` beside it, holds:

    config.yaml                 the run's resolved settings (another run's journal is
                                discarded, with a warning naming what differs)
    calibration.safetensors     the calibration pass's scores (and Gram matrices)
    layer_losses.json           the LM loss for every set of skipped layers measured so far
    blocks-dpR.pt               data-parallel rank R's block-variant sums after its last
                                micro-batch (they only hold for the same micro-batch size
                                and data-parallel size: otherwise started again)
    distilled-layerI.safetensors
                                layer I's variants trained by local distillation

Every file is written whole (a temporary file renamed into place); the journal is removed
once the output directory is complete. The rank-0 files are read by every rank, as the
output itself is: the journal lives on the same shared file system.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from nemo_minitron.config import describe_differences, differing_keys, yaml_text
from nemo_minitron.runtime.distributed import barrier, broadcast_object, is_rank0

log = logging.getLogger("nemo_minitron")

CONFIG_FILE = "config.yaml"


def journal_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


class Journal:
    """Collective to open; ``load_*`` on every rank, ``save_*`` by the rank(s) named."""

    def __init__(self, directory: Path, resumed: bool):
        self.directory = directory
        self.resumed = resumed

    @classmethod
    def open(cls, out: Path, settings: dict[str, Any], ignore: list[str]) -> "Journal":
        """``out``'s journal for a run of ``settings``: the one there if it was started with
        the same settings (``ignore``: keys that may differ), else a new, empty one."""
        directory = journal_dir(out)
        resumed = False
        if is_rank0():
            saved = None
            if (directory / CONFIG_FILE).is_file():
                saved = yaml.safe_load((directory / CONFIG_FILE).read_text())
            keys = differing_keys(saved, settings, ignore) if saved is not None else []
            if saved is not None and not keys:
                resumed = True
            else:
                if directory.exists():
                    why = (f"it was started with other settings ({describe_differences(saved, settings, keys)})"
                           if saved is not None else "it holds no settings")
                    log.warning("discarding the unfinished importance run in '%s': %s", directory, why)
                    shutil.rmtree(directory)
                directory.mkdir()
                _replace(directory / CONFIG_FILE, lambda p: p.write_text(yaml_text(settings)))
        resumed = broadcast_object(resumed)
        barrier()
        return cls(directory, resumed)

    # ---- rank 0 writes, every rank reads
    def load_json(self, name: str) -> Any:
        path = self.directory / name
        return json.loads(path.read_text()) if path.is_file() else None

    def save_json(self, name: str, value: Any) -> None:
        if is_rank0():
            _replace(self.directory / name, lambda p: p.write_text(json.dumps(value)))

    def load_tensors(self, name: str, device) -> dict[str, torch.Tensor] | None:
        path = self.directory / name
        return load_file(str(path), device=str(device)) if path.is_file() else None

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor], *, every_rank_calls: bool = True) -> None:
        """Rank 0 writes (``every_rank_calls`` False: the caller's rank writes, for a file of its own)."""
        if is_rank0() or not every_rank_calls:
            cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
            _replace(self.directory / name, lambda p: save_file(cpu, str(p)))

    # ---- a rank's own file
    def load_object(self, name: str) -> Any:
        path = self.directory / name
        return torch.load(path, weights_only=True) if path.is_file() else None

    def save_object(self, name: str, value: Any) -> None:
        _replace(self.directory / name, lambda p: torch.save(value, p))

    def remove(self) -> None:
        """Collective: after the output is complete."""
        barrier()
        if is_rank0():
            shutil.rmtree(self.directory, ignore_errors=True)
