#!/usr/bin/env python3
"""Contrastive distillation vs forward KL vs both, at equal steps.

SmolLM2-135M pruned by importance to about 84.5M parameters (the quality benchmark's
target), then distilled from the teacher with the same steps, batch, sequence length,
schedule and data (builtin:train) three ways:

    kl              forward KL (the default: --kd-weight 1)
    contrastive     InfoNCE over the positions of each --logit-chunk (--kd-weight 0
                    --contrastive-weight 1; nemo_minitron/distill/losses.py)
    kl+contrastive  both (--kd-weight 1 --contrastive-weight W)

Every student is scored on the same held-out samples (builtin:heldout) and on the
built-in tasks (minitron_lastword, minitron_nextsentence). Writes a markdown table next
to the JSON results."""

from __future__ import annotations

import json

from common import (
    CACHE,
    parser,
    task_scorer,
    task_table,
    width_pruned_pair,
    write_results,
)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--contrastive-weight", type=float, default=0.5, help="its weight in the kl+contrastive row")
    p.add_argument("--contrastive-temperature", type=float, default=1.0)
    p.add_argument("--logit-chunk", type=int, default=1024, help="tokens per chunk: the negatives of a position")
    p.add_argument("--eval-samples", type=int, default=64, help="held-out samples to score")
    p.add_argument("--task-limit", type=int, default=100, help="examples per task")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=str(CACHE / "contrastive_quality"))
    args = p.parse_args()

    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.distill.api import distill

    dtype, teacher, student, out, heldout = width_pruned_pair(args)
    scores = task_scorer(heldout, args.task_limit, dtype.torch)

    train = dict(steps=args.steps, global_batch=args.global_batch, micro_batch=args.micro_batch, seq_len=args.seq_len,
                 lr=args.lr, min_lr=args.lr / 10, warmup_steps=max(1, args.steps // 10), eval_samples=16,
                 logit_chunk=args.logit_chunk, contrastive_temperature=args.contrastive_temperature,
                 dtype=dtype.name)
    setups = {
        "kl": ("forward KL (the default)", dict(kd_weight=1.0, contrastive_weight=0.0)),
        "contrastive": ("contrastive (InfoNCE over positions)", dict(kd_weight=0.0, contrastive_weight=1.0)),
        "kl+contrastive": (f"forward KL + {args.contrastive_weight:g} x contrastive",
                           dict(kd_weight=1.0, contrastive_weight=args.contrastive_weight)),
    }
    rows = []
    for name, (label, weights) in setups.items():
        run_dir = out / f"{name}-{args.steps}steps-{dtype.name}"
        if not (run_dir / "summary.json").is_file():
            distill(str(teacher), str(student), ["builtin:train"], str(run_dir), eval_data=["builtin:heldout"],
                    **train, **weights)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({"setup": name, "label": label, "tokens": summary["tokens"],
                     "train_seconds": summary["train_seconds"], **scores(run_dir / "final")})
    teacher_scores, pruned_scores = scores(teacher), scores(student)
    table = task_table(teacher_scores, pruned_scores, read_info(student).description.num_parameters(),
                       [(r["label"], r) for r in rows])
    note = (f"Same training for every row: {args.steps} steps x {args.global_batch} sequences x {args.seq_len} tokens "
            f"= {rows[0]['tokens']:,} tokens of builtin:train, lr {args.lr} cosine, {dtype.name}; contrastive "
            f"temperature {args.contrastive_temperature:g}, negatives: the other positions of a {args.logit_chunk}-token "
            f"chunk. Held-out: {heldout[:, 1:].numel():,} tokens of builtin:heldout; tasks: {args.task_limit} examples "
            "each.")
    (out / "contrastive_quality.md").write_text("\n".join(table) + "\n\n" + note + "\n")
    print("\n".join(table) + "\n\n" + note)
    write_results(args, {"benchmark": "contrastive_quality", "teacher": teacher_scores, "pruned": pruned_scores,
                         "rows": rows, "note": note, "table": str(out / "contrastive_quality.md")})


if __name__ == "__main__":
    main()
