"""The project's checkpoint: a directory any stage reads and writes.

    CKPT/
      nemo_minitron.json   format marker, model description, dtype, provenance
      tokenizer/           Hugging Face tokenizer files
      weights/             megatron-core distributed checkpoint (torch_dist); a sparse
                           model's masks are tensors there too (sparsity/masks.py)

Weights are saved with ``dist_checkpointing`` from the model's sharded state dict, so
a checkpoint written at one TP/PP layout loads at any other. Everything is written to
a temporary sibling directory and renamed into place only when complete.

Loading executes no code from the files: JSON for our metadata, safetensors/JSON for
the tokenizer, and for the weights megatron-core's loader through ``dcp_index.load_sharded``:
the torch ``.metadata`` index is first checked against an allow-list of checkpoint types,
and the common state is read weights-only (megatron-core 0.17+ would unpickle it unrestricted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from transformers import AutoTokenizer

from nemo_minitron.checkpoint import megatron_format, megatron_layout
from nemo_minitron.checkpoint.dcp_index import load_sharded
from nemo_minitron.errors import UsageError, require
from nemo_minitron.files import INFO_FILE, check_complete, checkpoint_weights, is_checkpoint
from nemo_minitron.model.builder import build_model
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.params import unwrap
from nemo_minitron.runtime.distributed import all_ranks_ok, barrier, broadcast_object, is_rank0
from nemo_minitron.sparsity.masks import load_masks, mask_sharded_state_dict, masked_weight_names

log = logging.getLogger("nemo_minitron")

FORMAT = "nemo-minitron-checkpoint"
VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class CheckpointInfo:
    description: ModelDescription
    dtype: str = "float32"
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "model": self.description.to_dict(),
                           "dtype": self.dtype, "provenance": self.provenance}, indent=2, sort_keys=True)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def parse_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    require(name in DTYPES, f"{flag} must be one of {', '.join(DTYPES)} (got '{name}')")
    return DTYPES[name]


def megatron_checkpoint(path: str | os.PathLike):
    """The Megatron-LM / Megatron-Bridge / NeMo 2 checkpoint at ``path`` (validated, cached),
    or None when ``path`` is not one. Such checkpoints are read in place wherever a
    project checkpoint is (``read_info``, ``load_checkpoint``, ``load_tokenizer``)."""
    if is_checkpoint(path) or not megatron_layout.detect(path):
        return None
    return _open_megatron(str(Path(path).resolve()))


@functools.lru_cache(maxsize=8)
def _open_megatron(path: str):
    return megatron_format.open_checkpoint(path)


def read_info(path: str | os.PathLike, flag: str = "checkpoint") -> CheckpointInfo:
    """Read a checkpoint's metadata without touching its weights (cheap; validates the input)."""
    path = Path(path)
    checkpoint_weights(path, flag)  # exists, and is a checkpoint of a kind read here
    megatron = megatron_checkpoint(path)
    if megatron is not None:
        stored = {v: k for k, v in DTYPES.items()}.get(megatron.dtype)
        require(stored is not None, f"'{path}' stores {megatron.dtype} weights (supported: {', '.join(DTYPES)})")
        return CheckpointInfo(megatron.description, stored, megatron.provenance)
    try:
        data = json.loads((path / INFO_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"checkpoint '{path}' has an unreadable {INFO_FILE}: {e}") from None
    require(data.get("format") == FORMAT, f"'{path}/{INFO_FILE}' is not a {FORMAT} file")
    require(data.get("version") == VERSION, f"checkpoint '{path}' has format version {data.get('version')}, "
                                            f"this nemo-minitron reads version {VERSION}")
    return CheckpointInfo(ModelDescription.from_dict(data["model"]), data.get("dtype", "float32"),
                          data.get("provenance", {}))


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Collective: yields a fresh temporary directory next to ``final``; renames it into
    place when the block completes on every rank, deletes it if any rank fails."""
    final = Path(final)
    name = broadcast_object(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}" if is_rank0() else None)
    tmp = final.parent / name
    if is_rank0():
        tmp.mkdir(parents=True)
    barrier()
    ok = False
    try:
        yield tmp
        ok = True
    finally:
        everyone_ok = all_ranks_ok(ok) if dist.is_initialized() else ok
        if is_rank0():
            if everyone_ok:
                os.replace(tmp, final)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        barrier()


def write_tokenizer(tokenizer, directory: Path) -> None:
    if tokenizer is not None and is_rank0():
        tokenizer.save_pretrained(str(directory))


def tokenizer_dir(path: str | os.PathLike) -> Path | None:
    """Where a checkpoint's Hugging Face tokenizer files are (None if it has none)."""
    megatron = megatron_checkpoint(path)
    if megatron is not None:
        return megatron.tokenizer_dir
    directory = Path(path) / "tokenizer"
    return directory if directory.is_dir() else None


def require_tokenizer(path: str | os.PathLike, why: str = "") -> Path:
    directory = tokenizer_dir(path)
    require(directory is not None, f"'{path}' holds no tokenizer{f' ({why})' if why else ''}: a Megatron-Bridge "
                                   "checkpoint keeps it in iter_N/tokenizer/, NeMo 2 in context/nemo_tokenizer/, "
                                   "Megatron-LM names it in args.tokenizer_model; copy the Hugging Face tokenizer "
                                   "files there")
    return directory


def load_tokenizer(path: str | os.PathLike):
    return AutoTokenizer.from_pretrained(str(require_tokenizer(path)))


# ---------------------------------------------------------------------- weights
def save_weights(model, directory: Path) -> None:
    if is_rank0():
        directory.mkdir(parents=True, exist_ok=True)
    barrier()
    # a sparse model's masks are tensors of the same checkpoint (sparsity/masks.py)
    dist_checkpointing.save({**unwrap(model).sharded_state_dict(), **mask_sharded_state_dict(model)}, str(directory))


def load_weights(model, directory: Path) -> None:
    check_complete(directory, "checkpoint", directory.parent)
    inner = unwrap(model)
    inner.load_state_dict(load_sharded(inner.sharded_state_dict(), directory), strict=False)


def save_checkpoint(model, info: CheckpointInfo, out: str | os.PathLike, tokenizer=None) -> Path:
    """Write a complete checkpoint atomically (collective over all ranks)."""
    out = Path(out)
    info.provenance.setdefault("created", datetime.datetime.now().isoformat(timespec="seconds"))
    with atomic_directory(out) as tmp:
        if is_rank0():
            (tmp / INFO_FILE).write_text(info.to_json())
            write_tokenizer(tokenizer, tmp / "tokenizer")
        save_weights(model, tmp / "weights")
    log.info("saved checkpoint %s (%s)", out, info.description.summary())
    return out


def load_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype | None = None, spec: str = "auto",
                    layers_per_stage=None, sequence_parallel: bool = False, padded_vocab_size: int | None = None,
                    config_overrides=None):
    """Build the model at the current parallel layout and load the weights into it (eval mode).

    ``path``: a project checkpoint, or a Megatron-LM / Megatron-Bridge / NeMo 2 one (read
    in place). ``sequence_parallel`` (for training a mixture of experts at TP > 1),
    ``padded_vocab_size``/``config_overrides``: see ``model.builder.build_model``."""
    info = read_info(path)
    stored = DTYPES[info.dtype]
    model = build_model(info.description, dtype=stored, spec=spec, layers_per_stage=layers_per_stage,
                        sequence_parallel=sequence_parallel, padded_vocab_size=padded_vocab_size,
                        config_overrides=config_overrides)
    megatron = megatron_checkpoint(path)
    if megatron is not None:
        megatron.load_into(model)
    else:
        load_weights(model, Path(path) / "weights")
        if masked_weight_names(info.provenance):  # a sparse model: its masks travel with it
            load_masks(model, Path(path) / "weights", masked_weight_names(info.provenance))
        if padded_vocab_size not in (None, info.description.padded_vocab_size):
            megatron_format.zero_vocab_padding(model, info.description.vocab_size)
    if dtype is not None and dtype != stored:
        model = cast_model(model, dtype)
    model.eval()
    return model, info


def cast_model(model, dtype: torch.dtype):
    """Change a loaded model's parameter dtype (and its config, which megatron reads for comms)."""
    model.to(dtype)
    for cfg in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        cfg.params_dtype = dtype
        cfg.pipeline_dtype = dtype
        cfg.bf16 = dtype == torch.bfloat16
        cfg.fp16 = dtype == torch.float16
    return model
