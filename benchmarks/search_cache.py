#!/usr/bin/env python3
"""Architecture search and the teacher-logit cache on SmolLM2-135M, measured in one run.

    bytes      disk bytes per token of a top-K cache (K = 64): the format's count at vocab
               49,152 and 128,256, and the files of a cache actually written for SmolLM2
    step_time  distillation forward-backward with the cache vs with the live teacher: the
               same student (SmolLM2 pruned to 84.5M), the same micro-batches, median of
               ``--repeats`` alternating runs (the optimizer step, the same for both, excluded)
    top_k      held-out loss after ``--steps`` distillation steps from caches of K = 8, 64,
               512 and from the live full-vocabulary teacher (the same samples, seed, schedule)
    ranking    how early the candidates' ranking settles: ``--candidates`` planner candidates
               for ``--target-params`` distilled ``--ranking-steps`` steps from one cache;
               Spearman correlation between the held-out losses after pruning / after 20, 50,
               100 steps and the losses at the end

The defaults are the full measurement (hours on a 2-core CPU); smaller ``--steps``,
``--ranking-steps`` and ``--seq-len`` give a quick look."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from common import CACHE, parser, pruned_smollm2, smollm2_checkpoint, smollm2_importance, write_results

PARTS = ("bytes", "step_time", "top_k", "ranking")
# every run is scored on the same held-out text, not a part of the training file
HELDOUT = "builtin:heldout"


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties): Pearson's r of the ranks."""
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def training_text(path: Path, samples: int, seq_len: int) -> str:
    """A text file of the built-in training split holding about ``samples`` samples of
    ``seq_len + 1`` tokens (3.5 characters per token), so that a cache covers all of it and
    the live teacher trains on exactly the same samples."""
    from nemo_minitron.data.builtin import builtin_documents

    want, text, docs = int(samples * (seq_len + 1) * 3.5), "", iter(builtin_documents("train"))
    while len(text) < want:
        text += next(docs) + "\n\n"
    path.write_text(text)
    return str(path)


def measure_bytes(cache_dir: Path | None, seq_len: int) -> dict:
    from nemo_minitron.distill.teacher_logits import TeacherLogits, bytes_per_token

    out = {"format_bytes_per_token_k64_bf16": {str(v): bytes_per_token(64, "bfloat16") for v in (49152, 128256)},
           "full_logits_bf16_bytes_per_token": {str(v): 2 * v for v in (49152, 128256)}}
    if cache_dir is not None:
        cache = TeacherLogits.open(cache_dir)
        files = sum(f.stat().st_size for f in cache_dir.iterdir())
        out["written_smollm2"] = {"top_k": cache.top_k, "value_dtype": cache.index["value_dtype"],
                                  "tokens": cache.num_samples * seq_len, "file_bytes": files,
                                  "bytes_per_token": round(files / (cache.num_samples * seq_len), 2)}
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--parts", default=",".join(PARTS), help=f"which to run, of {', '.join(PARTS)}")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=100, help="top_k: distillation steps")
    p.add_argument("--top-k", default="8,64,512", help="top_k: the cache sizes compared with the live teacher")
    p.add_argument("--repeats", type=int, default=4, help="step_time: timed runs of each")
    p.add_argument("--candidates", type=int, default=6, help="ranking: planner candidates")
    p.add_argument("--target-params", default="90M", help="ranking: the budget")
    p.add_argument("--ranking-steps", type=int, default=300, help="ranking: steps every candidate trains")
    p.add_argument("--checkpoints", default="20,50,100", help="ranking: the early steps compared with the end")
    p.add_argument("--layer-metric", default="loss", help="ranking: how depth candidates choose their layers "
                                                         "(loss: no greedy importance pass needed)")
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--work", default=str(CACHE / "search-cache"), help="where caches and runs go (reused)")
    args = p.parse_args()
    parts = [x for x in args.parts.split(",") if x]
    assert set(parts) <= set(PARTS), parts

    import torch

    from nemo_minitron.distill.teacher_logits import INDEX, write_teacher_logits

    # the caches cover the text written for --steps x --global-batch samples: one folder per size
    work = Path(args.work) / f"seq{args.seq_len}-n{args.steps * args.global_batch}-{args.dtype}"
    work.mkdir(parents=True, exist_ok=True)
    teacher, results = str(smollm2_checkpoint()), {"benchmark": "search_cache", "teacher": "SmolLM2-135M",
                                                    "seq_len": args.seq_len, "global_batch": args.global_batch,
                                                    "dtype": args.dtype, "threads": torch.get_num_threads()}
    data = training_text(work / "train.txt", args.steps * args.global_batch, args.seq_len)

    def cache(k: int) -> Path:
        path = work / f"cache-k{k}"
        if not (path / INDEX).is_file():
            write_teacher_logits(teacher, [data], str(path), top_k=k, seq_len=args.seq_len,
                                 micro_batch=args.micro_batch, dtype=args.dtype, progress=False)
        return path

    # each part's results are written as soon as it ends: a later part's failure keeps them
    if "step_time" in parts:
        results["step_time"] = step_time(teacher, data, cache(64), args)
        write_results(args, results)
    if "bytes" in parts:
        results["bytes"] = measure_bytes(cache(64), args.seq_len)
        write_results(args, results)
    if "top_k" in parts:
        results["top_k"] = top_k_quality(teacher, data, cache, work, args)
        write_results(args, results)
    if "ranking" in parts:
        results["ranking"] = ranking(teacher, work, args)
        write_results(args, results)


def step_time(teacher: str, data: str, cache_dir: Path, args) -> dict:
    """Forward-backward of one step, live teacher vs cache, alternating."""
    from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer, parse_dtype, read_info
    from nemo_minitron.distill.config import DistillConfig
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.distill.teacher_logits import TeacherLogits
    from nemo_minitron.distill.train import Trainer
    from nemo_minitron.runtime.distributed import init_distributed

    init_distributed(1, 1)
    student_ckpt, dtype = pruned_smollm2(), parse_dtype(args.dtype)
    s_desc, t_desc = read_info(student_ckpt).description, read_info(teacher).description
    logits = TeacherLogits.open(cache_dir)
    samples = check_corpus([data], vocab_size=s_desc.vocab_size).dataset(
        load_tokenizer(student_ckpt), seq_len=args.seq_len, seed=1234, part="train",
        num_samples=logits.dataset_samples).first(logits.num_samples)  # the samples the cache was written for
    cfg = DistillConfig(steps=10, global_batch=args.global_batch, micro_batch=args.micro_batch, seq_len=args.seq_len)
    trainers = {}
    for kind in ("live", "cache"):
        student, _ = load_checkpoint(student_ckpt, dtype=dtype)
        live = load_checkpoint(teacher, dtype=dtype)[0] if kind == "live" else None
        trainers[kind] = Trainer(student, live, samples, None, Path("/nonexistent"), cfg, seed=1234,
                                 student_desc=s_desc, teacher_desc=t_desc, progress=False,
                                 teacher_logits=logits if kind == "cache" else None)
    times = {k: [] for k in trainers}
    for t in trainers.values():
        t.gradients(step=0)  # warm-up
    for r in range(args.repeats):
        for kind, t in trainers.items():
            t.ddp.zero_grad_buffer()
            batches = t.step_batches(r + 1)  # read before the clock starts: the same for both
            start = time.perf_counter()
            t._forward_backward(iter(batches))
            times[kind].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"student": s_desc.summary(), "top_k": logits.top_k, "tokens_per_step": args.global_batch * args.seq_len,
            "median_seconds": med, "all_seconds": times, "ratio_cache_over_live": round(med["cache"] / med["live"], 4)}


def top_k_quality(teacher: str, data: str, cache, work: Path, args) -> dict:
    """Held-out loss after ``--steps`` steps from each cache and from the live teacher."""
    from nemo_minitron.distill.api import distill

    student_ckpt = str(pruned_smollm2())
    settings = dict(steps=args.steps, global_batch=args.global_batch, micro_batch=args.micro_batch,
                    seq_len=args.seq_len, eval_samples=args.eval_samples, eval_every=0, save_every=0,
                    dtype=args.dtype, eval_data=[HELDOUT], progress=False)
    out = {}
    for k in [int(x) for x in args.top_k.split(",")] + [None]:
        name = f"cache K={k}" if k else "live teacher"
        run_dir = work / f"distill-{args.steps}-{'k' + str(k) if k else 'live'}"
        started = time.time()
        if (run_dir / "summary.json").is_file():
            import json

            summary = json.loads((run_dir / "summary.json").read_text())
        elif k:
            summary = distill(None, student_ckpt, [data], str(run_dir), teacher_logits=str(cache(k)), **settings).summary
        else:
            summary = distill(teacher, student_ckpt, [data], str(run_dir), **settings).summary
        out[name] = {"heldout_loss": summary["student_after"]["heldout_loss"],
                     "wall_seconds": round(time.time() - started, 1)}
    return {"steps": args.steps, "student": "SmolLM2-135M pruned to 84.5M", "results": out}


def ranking(teacher: str, work: Path, args) -> dict:
    """Spearman correlation of the candidates' held-out losses at each early point with the end."""
    from nemo_minitron.search.api import search

    steps = args.ranking_steps
    points = [0] + [int(x) for x in args.checkpoints.split(",") if int(x) < steps]
    every = 10 if all(s % 10 == 0 for s in points + [steps]) else 1
    data = training_text(work / f"ranking-train-{steps}.txt", steps * args.global_batch, args.seq_len)
    out = work / f"search-{args.target_params}-{args.candidates}x{steps}"
    result = search(teacher, str(smollm2_importance()), [data], str(out), target_params=args.target_params,
                    candidates=args.candidates, steps=steps, global_batch=args.global_batch,
                    micro_batch=args.micro_batch, seq_len=args.seq_len, eval_every=every, eval_data=[HELDOUT],
                    eval_samples=args.eval_samples, cache_top_k=64, dtype=args.dtype, keep_all=True, progress=False,
                    layer_metric=args.layer_metric, refit=False)
    curves = {c["name"]: dict((int(s), v) for s, v in c["heldout_curve"]) for c in result["candidates"]}
    names = sorted(curves)
    final = [curves[n][steps] for n in names]
    return {"target_params": args.target_params, "steps": steps, "layer_metric": args.layer_metric, "candidates": [
        {k: c[k] for k in ("name", "kind", "params", "target", "loss_after_pruning", "final_loss")}
        for c in result["candidates"]],
        "losses": {n: {str(s): curves[n][s] for s in points + [steps]} for n in names},
        "spearman_with_final": {("after pruning" if s == 0 else f"after {s} steps"):
                                round(spearman([curves[n][s] for n in names], final), 4) for s in points},
        "best": result["best"]}


if __name__ == "__main__":
    main()
