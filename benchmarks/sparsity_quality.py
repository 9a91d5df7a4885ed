#!/usr/bin/env python3
"""2:4 sparsity by magnitude, Wanda and SparseGPT: held-out loss right after, and after a
short distillation; SparseGPT's calibration time against one importance pass.

Two dense models: SmolLM2-135M, and its 84.4M width-pruned student (structured + 2:4).
Each is made 2:4 sparse on every decoder linear layer by each method from the same
calibration samples of builtin:calib, then scored on the same held-out samples of
builtin:heldout; the best method's sparse model is distilled from SmolLM2-135M (the masks
kept) and scored again. ModelOpt 0.47's sparsity is not run here (its Megatron plugin
path is not wired into benchmarks/modelopt_adapter.py yet)."""

from __future__ import annotations

import time
from pathlib import Path

from common import CACHE, builtin_samples, parser, pruned_smollm2_width, smollm2_checkpoint, write_results

METHODS = ["magnitude", "wanda", "sparsegpt"]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--distill-steps", type=int, default=20)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=str(CACHE / "sparsity_quality"))
    args = p.parse_args()

    from nemo_minitron.checkpoint.store import is_checkpoint, load_checkpoint, load_tokenizer
    from nemo_minitron.distill.api import distill
    from nemo_minitron.evaluate import evaluate
    from nemo_minitron.importance.api import compute_importance
    from nemo_minitron.runtime.distributed import init_distributed
    from nemo_minitron.runtime.precision import resolve_dtype
    from nemo_minitron.sparsity.api import sparsify

    dtype = resolve_dtype(args.dtype)
    init_distributed(1, 1, 1234)
    teacher = smollm2_checkpoint()
    student = pruned_smollm2_width()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heldout = builtin_samples("heldout", load_tokenizer(teacher), args.seq_len).take(args.eval_samples)

    def loss(path: Path) -> float:
        model, info = load_checkpoint(path, dtype=dtype.torch)
        return evaluate(model, info.description.vocab_size, heldout, micro_batch=8).loss

    calib = dict(samples=args.calib_samples, seq_len=args.seq_len, micro_batch=8, dtype=dtype.name)
    rows, seconds = [], {}
    for name, dense in (("SmolLM2-135M", teacher), ("84.4M width-pruned", student)):
        row = {"model": name, "dense": loss(dense)}
        for method in METHODS:
            path = out / f"{dense.name}-2of4-{method}-{args.calib_samples}x{args.seq_len}"
            if not is_checkpoint(path):
                start = time.time()
                sparsify(str(dense), str(path), None if method == "magnitude" else ["builtin:calib"], pattern="2:4",
                         method=method, progress=False, **calib)
                seconds[f"{name} {method}"] = time.time() - start
            row[method] = loss(path)
        best = min(METHODS, key=lambda m: row[m])
        trained = out / f"{dense.name}-2of4-{best}-distilled-{args.distill_steps}"
        if not (trained / "summary.json").is_file():
            distill(str(teacher), str(out / f"{dense.name}-2of4-{best}-{args.calib_samples}x{args.seq_len}"),
                    ["builtin:train"], str(trained), eval_data=["builtin:heldout"], steps=args.distill_steps,
                    global_batch=8, micro_batch=8, seq_len=128, lr=3e-4, min_lr=3e-5,
                    warmup_steps=max(1, args.distill_steps // 10), eval_samples=16, dtype=dtype.name)
        row.update(best=best, distilled=loss(trained / "final"))
        rows.append(row)
    start = time.time()
    compute_importance(str(teacher), ["builtin:calib"], str(out / f"importance-{time.time_ns()}"),
                       samples=args.calib_samples, seq_len=args.seq_len, micro_batch=8, layer_samples=1,
                       drop_blocks=[], greedy_layers=False, dtype=dtype.name, progress=False)
    importance_seconds = time.time() - start

    table = ["| model | dense | magnitude | Wanda | SparseGPT | best, after distillation |", "|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['dense']:.3f} | {r['magnitude']:.3f} | {r['wanda']:.3f} | {r['sparsegpt']:.3f} | "
              f"{r['best']}: **{r['distilled']:.3f}** |" for r in rows]
    note = (f"2:4 on every decoder linear layer; calibration {args.calib_samples} x {args.seq_len} tokens of "
            f"builtin:calib; held-out loss on {heldout[:, 1:].numel():,} tokens of builtin:heldout; distillation "
            f"{args.distill_steps} steps x 8 x 128 tokens from SmolLM2-135M, masks kept; {dtype.name}. Seconds: "
            + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
            + f"; one importance pass on the same samples (no layer drops) {importance_seconds:.0f}.")
    (out / "sparsity_quality.md").write_text("\n".join(table) + "\n\n" + note + "\n")
    print("\n".join(table) + "\n\n" + note)
    write_results(args, {"benchmark": "sparsity_quality", "rows": rows, "seconds": seconds,
                         "importance_seconds": importance_seconds, "note": note})


if __name__ == "__main__":
    main()
