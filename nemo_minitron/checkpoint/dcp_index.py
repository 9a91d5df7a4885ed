"""A torch_dist checkpoint read without running code from its files.

torch's checkpoint reader unpickles ``.metadata`` unrestricted; here it is first checked
against an allow-list of the checkpoint types torch writes (``verify_dcp_metadata``), and
``read_index`` reads the stored keys, shapes and dtypes the same way. megatron-core reads the
common state (``common.pt``; from 0.17 on an object inside the shards) with torch's loaders,
the in-shard one unrestricted: ``load_sharded`` is ``dist_checkpointing.load`` with the index
checked first and the common state read weights-only, every class it names inert. Every
load of the project goes through it: checkpoints (``store``), Megatron ones
(``megatron_format``), training checkpoints and sparsity masks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pickle
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing  # importing megatron.core registers its enums as safe globals
from megatron.core.dist_checkpointing import serialization as mc_serialization
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint import FileSystemReader, load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from nemo_minitron.errors import UsageError, require
from nemo_minitron.files import COMMON_STATE_FILE, COMMON_STATE_KEY, index_strings

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


# ---------------------------------------------------------------------- the common state
class _Inert:
    """Stands in for any class or function a ``common.pt`` names (Megatron's enums and
    configs, a trainer's callbacks): it only records what it was called with, so loading
    runs none of the original code."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {type(self).__name__} {self.args or getattr(self, 'state', '')}>"


@contextlib.contextmanager
def inert_globals(pickled: Path | bytes, shown: str | None = None):
    """torch's weights-only loader, with every global that ``pickled`` (a ``common.pt`` or the
    bytes of an in-shard common state) names and torch does not allow replaced by an inert
    stand-in, for as long as the block runs (megatron-core loads ``common.pt`` itself inside
    ``dist_checkpointing.load``, whatever its version)."""
    shown = shown or str(pickled)
    unknown: list[str] = []
    if isinstance(pickled, bytes) or pickled.is_file():
        try:
            unknown = torch.serialization.get_unsafe_globals_in_checkpoint(_opened(pickled))
        except Exception as e:  # not a torch zip file
            raise UsageError(f"'{shown}' is unreadable: {str(e).splitlines()[0]}") from None
    stand_ins: list = [(type(name.rsplit(".", 1)[-1], (_Inert,), {}), name) for name in unknown]
    # the context removes what it added on exit: add only what is not registered already
    if argparse.Namespace not in torch.serialization.get_safe_globals():
        stand_ins.append(argparse.Namespace)
    with torch.serialization.safe_globals(stand_ins):
        yield


def _opened(pickled: Path | bytes) -> str | io.BytesIO:
    """What torch's checkpoint readers take for a file's path or its bytes."""
    return io.BytesIO(pickled) if isinstance(pickled, bytes) else str(pickled)


def load_common(path: Path | bytes, shown: str | None = None) -> Any:
    """``common.pt`` (or the same pickle as bytes), weights-only, every class it names but
    torch's own made inert."""
    shown = shown or str(path)
    try:
        with inert_globals(path, shown):
            return torch.load(_opened(path), map_location="cpu", weights_only=True)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"'{shown}' is unreadable: {str(e).splitlines()[0]}") from None


def common_state(weights: Path) -> dict:
    """A torch_dist checkpoint's common state (Megatron-LM's ``args``): its ``common.pt`` up to
    megatron-core 0.16, from 0.17 on an object inside the shards (a one-element list of it);
    read weights-only either way."""
    if (weights / COMMON_STATE_FILE).is_file() or COMMON_STATE_KEY not in index_strings(
            weights / ".metadata", f"'{weights}'"):
        return load_common(weights / COMMON_STATE_FILE)
    stored = load_common(read_object_bytes(weights, COMMON_STATE_KEY), f"{weights} ({COMMON_STATE_KEY})")
    return stored[0] if isinstance(stored, list) and len(stored) == 1 else stored


@contextlib.contextmanager
def weights_only_common_state():
    """megatron-core 0.17+ reads a checkpoint's common state inside ``dist_checkpointing.load``
    with torch's checkpoint reader, which unpickles it unrestricted; for the block it is read
    by ``common_state`` instead (earlier versions: ``inert_globals`` covers their common.pt)."""
    reader = getattr(mc_serialization, "load_common_state_dict", None)
    if reader is None:
        yield
        return
    mc_serialization.load_common_state_dict = lambda checkpoint_dir: common_state(Path(checkpoint_dir))
    try:
        yield
    finally:
        mc_serialization.load_common_state_dict = reader


def load_sharded(request: dict, directory: Path) -> dict:
    """``dist_checkpointing.load(request, directory)`` (unexpected stored keys allowed) with
    ``.metadata`` checked first and the common state read weights-only, whatever the
    megatron-core version: ``common.pt`` with its named classes inert (up to 0.16), the
    in-shard object by ``common_state`` (0.17+)."""
    verify_dcp_metadata(directory)
    with inert_globals(directory / COMMON_STATE_FILE), weights_only_common_state():
        return dist_checkpointing.load(request, str(directory), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
