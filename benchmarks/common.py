"""Shared pieces of the benchmarks: the SmolLM2-135M checkpoint (converted once and
kept in benchmarks/.cache), argument parsing and result writing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
CACHE = HERE / ".cache"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", help="write the results here")
    return p


def smollm2_checkpoint() -> Path:
    """The converted SmolLM2-135M (float32), converting it on first use."""
    from nemo_minitron.checkpoint.api import convert
    from nemo_minitron.checkpoint.store import is_checkpoint

    path = CACHE / "smollm2-135m"
    if not is_checkpoint(path):
        CACHE.mkdir(exist_ok=True)
        convert("smollm2-135m", str(path))
    return path


def write_results(args, results: dict) -> None:
    from nemo_minitron.runtime.distributed import is_rank0

    if not is_rank0():
        return
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
