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


def time_side_by_side(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each function once to warm up, then ``repeats`` rounds of all of them in turn (so that
    a shared machine's load falls on all alike): (median seconds, all seconds) per name."""
    import statistics
    import time

    timings: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in timings.items()}, timings


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


def smollm2_block_importance(samples: int, seq_len: int, block_samples: int, dtype: str, **options) -> Path:
    """Importance of SmolLM2-135M on ``samples`` x ``seq_len`` tokens of builtin:calib with
    ``--block-variants`` scored on the first ``block_samples`` (computed once per settings);
    ``options``: further compute_importance keywords (drop_blocks, second_moments,
    block_distill_steps, ...), part of the cache name."""
    import hashlib

    from nemo_minitron.importance.api import compute_importance

    settings = {"micro_batch": 4, "layer_samples": 8, **options}
    digest = hashlib.sha256(json.dumps([dtype, settings], sort_keys=True).encode()).hexdigest()[:10]
    path = CACHE / f"smollm2-importance-{samples}x{seq_len}-variants{block_samples}-{digest}"
    if not (path / "scores.safetensors").is_file():
        compute_importance(str(smollm2_checkpoint()), ["builtin:calib"], str(path), samples=samples, seq_len=seq_len,
                           block_variants=True, block_samples=block_samples, dtype=dtype, **settings)
    return path


def save_kept(teacher, old, new, keep, path: Path, tokenizer, provenance: dict, grams=None) -> Path:
    """The student ``teacher`` (a loaded model of description ``old``) pruned to ``new`` by
    keeping ``keep`` (a KeepPlan; ``grams``: refit), saved as a checkpoint in the teacher's dtype."""
    from nemo_minitron.checkpoint.store import CheckpointInfo, dtype_name, save_checkpoint
    from nemo_minitron.prune.api import _build_pruned

    model = _build_pruned(teacher, old, new, keep, [len(keep.layers)], grams=grams)
    dtype = dtype_name(next(model.parameters()).dtype)
    return save_checkpoint(model, CheckpointInfo(new, dtype, {"kept": keep.summary(), **provenance}), path,
                           tokenizer=tokenizer)


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
              order=order, seed=seed, layer_metric="contiguous", refit=False)  # the plain cut, as measured
    return path


def width_pruned_pair(args):
    """The set-up the benchmarks on SmolLM2-135M and its width-pruned student share: the
    runtime (one rank), ``args.dtype`` resolved, both checkpoints, ``args.out`` made, and
    ``args.eval_samples`` held-out samples of ``args.seq_len`` tokens.
    Returns (dtype, teacher, student, out, heldout)."""
    from nemo_minitron.checkpoint.store import load_tokenizer
    from nemo_minitron.runtime.distributed import init_distributed
    from nemo_minitron.runtime.precision import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    init_distributed(1, 1, 1234)
    teacher, student = smollm2_checkpoint(), pruned_smollm2_width()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heldout = builtin_samples("heldout", load_tokenizer(teacher), args.seq_len).take(args.eval_samples)
    return dtype, teacher, student, out, heldout


def pruned_smollm2_width() -> Path:
    """The default width target pruned from an importance run without depth preparation
    (no blocks, no greedy elimination): what a width-only cut needs, in a minute."""
    return pruned_smollm2("importance", name="smollm2-pruned-importance-64x256-width",
                          importance=smollm2_importance(samples=64, seq_len=256, drop_blocks=()))


TASKS = ["minitron_lastword", "minitron_nextsentence"]


def task_scorer(heldout, limit: int, dtype=None):
    """``score(path)``: held-out loss on ``heldout`` and the built-in tasks' accuracy (first
    ``limit`` examples) with its standard error, of the checkpoint at ``path``."""
    from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer
    from nemo_minitron.evaluate import evaluate
    from nemo_minitron.tasks.api import resolve_tasks, run_tasks
    from nemo_minitron.tasks.lm import MegatronLM

    tasks = resolve_tasks(TASKS)

    def score(path) -> dict:
        model, info = load_checkpoint(path, dtype=dtype)
        loss = evaluate(model, info.description.vocab_size, heldout, micro_batch=8).loss
        results = run_tasks(MegatronLM(model, info.description, load_tokenizer(path), batch_size=8), tasks,
                            limit=limit)
        return {"heldout_loss": loss, **{f"{t}_acc": results[t].metrics["acc"] for t in TASKS},
                **{f"{t}_stderr": results[t].stderr.get("acc") for t in TASKS}}

    return score


def task_table(teacher: dict, pruned: dict, pruned_params: float, rows: list[tuple[str, dict]]) -> list[str]:
    """Markdown rows: the teacher, the pruned model before training, then each ``(label,
    scores)`` with its training seconds (scores as ``task_scorer`` gives them)."""
    def acc(r: dict, t: str) -> str:
        return f"{r[f'{t}_acc']:.3f} ± {r[f'{t}_stderr']:.3f}"

    line = lambda label, r, loss, secs: f"| {label} | {loss} | {acc(r, TASKS[0])} | {acc(r, TASKS[1])} | {secs} |"  # noqa: E731
    return (["| model | held-out loss | lastword acc | nextsentence acc | train s |", "|---|---|---|---|---|",
             line("teacher: SmolLM2-135M", teacher, f"{teacher['heldout_loss']:.3f}", "-"),
             line(f"pruned to {pruned_params / 1e6:.1f}M, before training", pruned, f"{pruned['heldout_loss']:.3f}", "-")]
            + [line(label, r, f"**{r['heldout_loss']:.3f}**", f"{r['train_seconds']:.0f}") for label, r in rows])


def hf_export(ckpt: Path) -> Path:
    """``ckpt`` as a Hugging Face model directory (exported once, beside it in the cache)."""
    from nemo_minitron.checkpoint.api import export

    path = CACHE / f"{Path(ckpt).name}-hf"
    if not (path / "config.json").is_file():
        export(str(ckpt), str(path))
    return path
