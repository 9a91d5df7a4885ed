"""The torch_dist index (``.metadata``), read without running code from the file.

torch's checkpoint reader unpickles ``.metadata`` unrestricted; here it is first checked
against an allow-list of the checkpoint types torch writes (``verify_dcp_metadata``), and
``read_index`` reads the stored keys, shapes and dtypes the same way. Project checkpoints
(``store``) and Megatron ones (``megatron_format``) both go through it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from nemo_minitron.errors import UsageError, require

_ALLOWED_PICKLE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                           "torch.distributed.checkpoint.filesystem")


class _CheckpointIndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _ALLOWED_PICKLE_MODULES and not name.startswith("__"):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if (module, name) in {("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def verify_dcp_metadata(weights_dir: Path) -> None:
    """torch's checkpoint reader unpickles ``.metadata`` unrestricted; check it first."""
    index = weights_dir / ".metadata"
    require(index.is_file(), f"'{weights_dir}' has no torch_dist index (.metadata)")
    try:
        with open(index, "rb") as f:
            _CheckpointIndexUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UsageError(f"refusing to load '{weights_dir}': its index references '{e}', "
                         "which is not a checkpoint type") from None


def read_index(weights: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """The torch_dist index: every stored key with its global shape and dtype (None for objects)."""
    verify_dcp_metadata(weights)
    with open(weights / ".metadata", "rb") as f:
        try:
            meta = _CheckpointIndexUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise UsageError(f"'{weights}/.metadata' is unreadable: {e}") from None
    out = {}
    for key, md in meta.state_dict_metadata.items():
        size = getattr(md, "size", None)
        dtype = getattr(getattr(md, "properties", None), "dtype", None)
        out[key] = (tuple(size) if size is not None else (), dtype if size is not None else None)
    return out


def read_object_bytes(weights: Path, key: str) -> bytes:
    """The stored bytes of one object entry (megatron-core 0.17+ keeps a checkpoint's common
    state so, under ``files.COMMON_STATE_KEY``), unread: torch's checkpoint reader would
    unpickle them unrestricted (``weights_only=False``)."""
    read: dict[str, bytes] = {}

    class RawBytesPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            read[read_item.dest_index.fqn] = value.read()

    verify_dcp_metadata(weights)
    planner = RawBytesPlanner(flatten_state_dict=False)
    load({key: io.BytesIO()}, storage_reader=FileSystemReader(str(weights)), planner=planner, no_dist=True)
    require(key in read, f"'{weights}' holds no object '{key}'")
    return read[key]
