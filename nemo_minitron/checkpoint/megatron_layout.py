"""Where a Megatron-LM / Megatron-Bridge / NeMo 2 checkpoint keeps which step, found from
file names alone (no file is parsed, nothing heavy is imported: the commands resolve
``--iteration`` before they import their stage):

    Megatron-LM / Megatron-Bridge            NeMo 2
    DIR/latest_checkpointed_iteration.txt    CKPT/context/model.yaml
    DIR/latest_train_state.pt   (Bridge)     CKPT/weights/
    DIR/iter_0000010/  (or DIR/release/)

Reading such a checkpoint is ``megatron_format``'s job.
"""

from __future__ import annotations

import re
from pathlib import Path

from nemo_minitron.errors import require

TRACKER = "latest_checkpointed_iteration.txt"    # Megatron-LM and Bridge
BRIDGE_TRACKER = "latest_train_state.pt"         # Bridge only
RUN_CONFIG = "run_config.yaml"
ITERATION_DIR = re.compile(r"^iter_(\d{7,})$")

def _is_weights_dir(p: Path) -> bool:
    return (p / "metadata.json").is_file() or (p / ".metadata").is_file() or any(p.glob("mp_rank_*"))


def is_nemo2(path: Path) -> bool:
    return (path / "context" / "model.yaml").is_file() and (path / "weights").is_dir()


def is_megatron_root(path: Path) -> bool:
    return (path / TRACKER).is_file() or (path / BRIDGE_TRACKER).is_file() or any(
        ITERATION_DIR.match(p.name) for p in path.glob("iter_*") if p.is_dir())


def is_iteration_dir(path: Path) -> bool:
    return _is_weights_dir(path) and (bool(ITERATION_DIR.match(path.name)) or path.name == "release"
                                      or (path / RUN_CONFIG).is_file() or (path / "common.pt").is_file())


def detect(path: str | Path) -> bool:
    """Cheap (no file is parsed): is ``path`` a Megatron-LM / Bridge / NeMo 2 checkpoint?"""
    p = Path(path)
    return p.is_dir() and (is_nemo2(p) or is_megatron_root(p) or is_iteration_dir(p))


def _iterations(root: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in root.glob("iter_*") if (m := ITERATION_DIR.match(p.name)) and p.is_dir())


def _available(root: Path) -> str:
    found = _iterations(root)
    return f"iterations here: {', '.join(map(str, found))}" if found else "no iter_* directories here"


def resolve_iteration(path: str | Path, iteration: int | None = None, flag: str = "MODEL",
                      iteration_flag: str = "--iteration") -> Path:
    """The iteration directory of a Megatron checkpoint directory (the latest one unless
    ``iteration`` is given), or the NeMo 2 checkpoint directory itself."""
    root = Path(path)
    it = iteration_flag
    if is_nemo2(root):
        require(iteration is None, f"{it} {iteration}: '{root}' is a NeMo 2 checkpoint, which holds "
                                   "one step; give the directory of the step you want")
        return root
    if is_iteration_dir(root) and not is_megatron_root(root):
        if iteration is not None:
            m = ITERATION_DIR.match(root.name)
            require(m is not None and int(m.group(1)) == iteration,
                    f"{it} {iteration} does not match the iteration directory '{root}' given as {flag}")
        return root
    if iteration is not None:
        require(iteration >= 0, f"{it} must be >= 0 (got {iteration})")
        chosen = root / f"iter_{iteration:07d}"
        require(chosen.is_dir(), f"{it} {iteration}: '{chosen}' does not exist ({_available(root)})")
        return chosen
    tracker = root / TRACKER
    require(tracker.is_file(), f"{flag} '{root}' has no {TRACKER} to say which iteration is the latest; "
                               f"pass {it} N or the iteration directory ({_available(root)})")
    text = tracker.read_text().strip()
    if text == "release":
        chosen = root / "release"
    else:
        require(text.isdigit(), f"{flag} '{root}': {TRACKER} holds '{text[:40]}', not an iteration number")
        chosen = root / f"iter_{int(text):07d}"
    require(chosen.is_dir(), f"{flag} '{root}': {TRACKER} names '{chosen.name}', which does not exist "
                             f"({_available(root)})")
    return chosen


def model_path(path: str, iteration: int | None = None, flag: str = "MODEL", iteration_flag: str = "--iteration") -> str:
    """``path`` with ``--iteration`` applied: the iteration directory of a Megatron-LM /
    Megatron-Bridge checkpoint directory (``path`` itself when no iteration is given)."""
    if iteration is None:
        return path
    require(detect(path), f"{iteration_flag} applies to Megatron-LM / Megatron-Bridge checkpoint "
                          f"directories; {flag} '{path}' is not one")
    return str(resolve_iteration(path, iteration, flag, iteration_flag))
