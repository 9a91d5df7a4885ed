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
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


def builtin_samples(split: str, tokenizer, seq_len: int, *, num_samples: int | None = None,
                    seed: int = 0):
    """Samples of the built-in corpus through the data API (runtime must be initialised):
    ``num_samples`` of the ``builtin:train``-style training order, or one pass when None."""
    from nemo_minitron.data.dataset import check_corpus

    corpus = check_corpus([f"builtin:{split}"])
    part = "train" if num_samples is not None else "valid"
    return corpus.dataset(tokenizer, seq_len=seq_len, seed=seed, part=part, num_samples=num_samples)


PRUNED_TARGET = {"hidden": 480, "ffn": 1024, "heads": 6, "query_groups": 3}


def smollm2_importance(samples: int = 128, seq_len: int = 256, drop_blocks: tuple[int, ...] = (8, 14)) -> Path:
    """Importance of SmolLM2-135M on the built-in calibration split (computed once)."""
    from nemo_minitron.importance.api import compute_importance

    blocks = "-".join(map(str, drop_blocks))
    path = CACHE / f"smollm2-importance-{samples}x{seq_len}-blocks{blocks}"
    if not (path / "scores.safetensors").is_file():
        compute_importance(str(smollm2_checkpoint()), ["builtin:calib"], str(path), samples=samples,
                           seq_len=seq_len, micro_batch=8, layer_samples=8, drop_blocks=list(drop_blocks),
                           dtype="bfloat16")
    return path


def pruned_smollm2(order: str = "importance", target: dict | None = None, seed: int = 1234, name: str = "",
                   importance: Path | None = None) -> Path:
    """SmolLM2-135M pruned (by default to hidden 480, ffn 1024, 6 heads in 3 groups: 84.5M) with
    ``importance`` (default: ``smollm2_importance()``; give ``name`` with another one)."""
    from nemo_minitron.checkpoint.store import is_checkpoint
    from nemo_minitron.prune.api import prune

    target = target or PRUNED_TARGET
    path = CACHE / (name or f"smollm2-pruned-{order}-{seed}-" + "-".join(f"{k}{v}" for k, v in sorted(target.items())))
    if not is_checkpoint(path):
        prune(str(smollm2_checkpoint()), str(importance or smollm2_importance()), str(path), target=target,
              order=order, seed=seed, layer_metric="contiguous")
    return path
