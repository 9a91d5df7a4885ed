"""The files a command reads and writes, checked before any work: outputs that can be
written, checkpoints that exist and are complete.

One place for every command and stage: the command handlers call these before they
import their stage (torch and megatron-core take seconds to import; a wrong path should
not wait for them), and the stage libraries call the same functions for Python API
users. Nothing here imports torch, and no file is parsed beyond its name, except the
torch_dist index, whose opcodes are read (never executed) for the shard files it names.

Writability is tested by creating a file: permission bits do not tell (root ignores
them unless its capabilities are dropped; read-only mounts; ACLs).
"""

from __future__ import annotations

import os
import pickletools
import tempfile
from pathlib import Path

from nemo_minitron.checkpoint.megatron_layout import detect, is_nemo2, resolve_iteration
from nemo_minitron.errors import UsageError, require

#: The file that marks a nemo-minitron checkpoint directory (``checkpoint.store``).
INFO_FILE = "nemo_minitron.json"
#: What megatron-core's ``dist_checkpointing.save`` writes besides the shards, all read on load.
DIST_CHECKPOINT_FILES = (".metadata", "metadata.json")
#: The common (non-tensor) state: a file of its own up to megatron-core 0.16; from 0.17 on
#: (either is read by both) an object inside the shards, under this key of the index.
COMMON_STATE_FILE = "common.pt"
COMMON_STATE_KEY = "common_state/shard_0_1"


# ---------------------------------------------------------------------- outputs
def check_writable_dir(directory: str | os.PathLike, flag: str, given: str | os.PathLike | None = None) -> None:
    """``directory`` exists and a file can be created in it; else a one-line error naming
    ``flag`` and the path the user gave (``given``, default ``directory``)."""
    directory = Path(directory)
    shown = f"{flag} '{given if given is not None else directory}'"
    require(directory.is_dir(), f"{shown}: directory '{directory}' does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".nemo-minitron-write-test-", dir=directory)
    except OSError as e:
        raise UsageError(f"{shown}: cannot write in '{directory}' ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def check_new_output(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output that must not exist yet (nothing is ever overwritten), in a directory that
    exists and can be written."""
    path = Path(path)
    require(not path.exists(), f"{flag} '{path}' already exists; choose a new path or remove it")
    parent = path.parent if str(path.parent) else Path(".")
    require(parent.exists(), f"{flag} '{path}': parent directory '{parent}' does not exist")
    check_writable_dir(parent, flag, path)
    return path


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output directory that may exist already (a run that resumes there): it, or the
    nearest directory above it that exists (it is created with its parents), can be written."""
    path = Path(path)
    require(not path.exists() or path.is_dir(), f"{flag} '{path}' is a file, not a directory")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    check_writable_dir(existing, flag, path)
    return path


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """A file written whole at the end (``--json``): its directory exists and can be written."""
    path = Path(path)
    require(not path.is_dir(), f"{flag} '{path}' is a directory; give a file name")
    check_writable_dir(path.parent if str(path.parent) else Path("."), flag, path)
    return path


# ---------------------------------------------------------------------- checkpoints
def is_checkpoint(path: str | os.PathLike) -> bool:
    """A nemo-minitron checkpoint directory (its marker file; nothing is read)."""
    return (Path(path) / INFO_FILE).is_file()


def check_checkpoint(path: str | os.PathLike, flag: str = "CKPT") -> Path:
    """A checkpoint a command reads: it exists, it is a nemo-minitron, Megatron-LM,
    Megatron-Bridge or NeMo 2 checkpoint, and every file its weights need is there.
    Returns the directory holding the weights."""
    weights = checkpoint_weights(path, flag)
    check_complete(weights, flag, path)
    return weights


def checkpoint_weights(path: str | os.PathLike, flag: str = "CKPT") -> Path:
    """The directory holding a checkpoint's weights; a one-line error when ``path`` does not
    exist or is no checkpoint (the weights' files are not looked at)."""
    p = Path(path)
    require(p.exists(), f"{flag} '{path}' does not exist")
    if is_checkpoint(p):
        weights = p / "weights"
        require(weights.is_dir(), f"{flag} '{path}' has no weights/ directory")
    elif detect(p):
        chosen = resolve_iteration(p, None, flag)
        weights = chosen / "weights" if is_nemo2(chosen) else chosen
    else:
        name_the_checkpoint_inside(p, flag)
        raise UsageError(f"{flag} '{path}' is not a nemo-minitron checkpoint (no {INFO_FILE}) nor a Megatron-LM, "
                         "Megatron-Bridge or NeMo 2 checkpoint; convert a Hugging Face model first with: "
                         "nemo-minitron convert --hf SRC --out CKPT")
    return weights


def check_model(path: str | os.PathLike, flag: str = "MODEL") -> None:
    """A model argument that may also be a Hugging Face directory, .gguf file, alias or Hub
    id (those are checked by their reader): a checkpoint must be complete, and a stage's
    output directory is named for the model inside it."""
    p = Path(path)
    # an absolute or ./relative path names no alias or Hub id: it must exist
    require(p.exists() or not str(path).startswith(("/", ".")), f"{flag} '{path}' does not exist")
    if is_checkpoint(p) or detect(p):
        check_checkpoint(p, flag)
    elif p.is_dir() and not (p / "config.json").exists():
        name_the_checkpoint_inside(p, flag)


def name_the_checkpoint_inside(p: Path, flag: str) -> None:
    """A stage's output directory (distill, a pipeline run) is not itself a model: say which
    checkpoint inside it is."""
    if not p.is_dir():
        return
    if is_checkpoint(p / "final"):
        raise UsageError(f"{flag} '{p}' is a training output directory; its model is '{p / 'final'}'")
    if (p / "checkpoints").is_dir():
        raise UsageError(f"{flag} '{p}' is a training output directory without a final model yet (training "
                         "checkpoints only); finish or resume the run first")
    inside = sorted(d for d in p.glob("*") if is_checkpoint(d) or is_checkpoint(d / "final"))
    require(not inside, f"{flag} '{p}' is not a model; it holds: "
                        + ", ".join(str(d if is_checkpoint(d) else d / "final") for d in inside[:4]))


def check_complete(weights: Path, flag: str = "CKPT", given: str | os.PathLike | None = None) -> None:
    """A megatron-core distributed checkpoint (torch_dist) holds its index, its common state
    and every shard file the index names. Legacy and other formats are left to their reader,
    which names them."""
    shown = f"{flag} '{given if given is not None else weights}'"
    if any(weights.glob("mp_rank_*")) or not (weights / "metadata.json").is_file():
        return  # not torch_dist: megatron_format refuses it with its own message
    for name in DIST_CHECKPOINT_FILES:
        require((weights / name).is_file(), f"{shown} is incomplete: '{weights / name}' is missing")
    names = index_strings(weights / ".metadata", shown)
    if COMMON_STATE_KEY not in names:
        common = weights / COMMON_STATE_FILE
        require(common.is_file(), f"{shown} is incomplete: '{common}' is missing")
    shards = {name for name in names if name.endswith(".distcp")}
    missing = sorted(s for s in shards if not (weights / s).is_file())
    if missing:
        more = f"; {len(missing) - 1} more of its {len(shards)} shard files too" if len(missing) > 1 else ""
        raise UsageError(f"{shown} is incomplete: the shard file '{weights / missing[0]}' is missing{more}")


def index_strings(index: Path, shown: str) -> set[str]:
    """The strings of a torch_dist index (``.metadata``: shard file names, state keys), its
    pickle read as opcodes (nothing is unpickled, so neither torch nor any code from the file
    runs)."""
    try:
        with open(index, "rb") as f:
            return {arg for _, arg, _ in pickletools.genops(f) if isinstance(arg, str)}
    except (OSError, ValueError) as e:
        raise UsageError(f"{shown}: unreadable torch_dist index '{index}' ({e})") from None
