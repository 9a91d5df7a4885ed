#!/usr/bin/env python3
"""Synthetic-data fine-tuning vs logit distillation vs both, at equal training tokens.

SmolLM2-135M pruned by importance to about 84.5M parameters (the quality benchmark's
target), then trained with the same steps, batch, sequence length and schedule three
ways (``distill --method``):

    logits      KD from the teacher's logits on builtin:train
    synthetic   cross-entropy on the teacher's generations (prompt tokens masked)
    both        KD on builtin:train + cross-entropy on the generations, half of each step

The generations: the teacher completes prefixes of builtin:train (``generate``, sampled
at temperature 1.0, top-p 0.95). Every student is scored on the same held-out samples
(builtin:heldout) and on the built-in tasks (minitron_lastword, minitron_nextsentence).
Writes a markdown table next to the JSON results."""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import (
    CACHE,
    builtin_samples,
    parser,
    pruned_smollm2,
    smollm2_checkpoint,
    task_scorer,
    task_table,
    write_results,
)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--prompts", type=int, default=192, help="teacher generations")
    p.add_argument("--prefix-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=224)
    p.add_argument("--eval-samples", type=int, default=64, help="held-out samples to score")
    p.add_argument("--task-limit", type=int, default=100, help="examples per task")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=str(CACHE / "synthetic_quality"))
    args = p.parse_args()

    from nemo_minitron.checkpoint.store import load_tokenizer, read_info
    from nemo_minitron.distill.api import distill
    from nemo_minitron.generate.api import generate
    from nemo_minitron.runtime.distributed import init_distributed

    init_distributed(1, 1, 1234)
    teacher = smollm2_checkpoint()
    student = pruned_smollm2("importance")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    generations = out / f"generations-{args.prompts}x{args.new_tokens}.jsonl"
    gen_seconds = None
    if not generations.is_file():
        start = time.time()
        generate(str(teacher), str(generations), data=["builtin:train"], prefix_tokens=args.prefix_tokens,
                 limit=args.prompts, max_new_tokens=args.new_tokens, temperature=1.0, top_p=0.95, batch_size=16,
                 dtype=args.dtype)
        gen_seconds = time.time() - start
    records = [json.loads(line) for line in generations.read_text().splitlines()]
    new_tokens = sum(r["completion_tokens"] for r in records)

    heldout = builtin_samples("heldout", load_tokenizer(teacher), args.seq_len).take(args.eval_samples)
    scores = task_scorer(heldout, args.task_limit)

    train = dict(steps=args.steps, global_batch=args.global_batch, micro_batch=args.micro_batch, seq_len=args.seq_len,
                 lr=args.lr, min_lr=args.lr / 10, warmup_steps=max(1, args.steps // 10), eval_samples=16,
                 dtype=args.dtype)
    rows = []
    for method, label in (("logits", "logit distillation (KD on builtin:train)"),
                          ("synthetic", "synthetic-data fine-tuning (CE on the teacher's generations)"),
                          ("both", "both (KD on builtin:train + CE on generations, 1:1)")):
        run_dir = out / f"{method}-{args.steps}steps"
        if not (run_dir / "summary.json").is_file():
            data = [] if method == "synthetic" else ["builtin:train"]
            distill(str(teacher), str(student), data, str(run_dir), method=method,
                    synthetic_data=[str(generations)] if method != "logits" else None, **train)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({"method": method, "setup": label, "tokens": summary["tokens"],
                     "train_seconds": summary["train_seconds"], **scores(run_dir / "final")})
    teacher_scores, pruned_scores = scores(teacher), scores(student)
    table = task_table(teacher_scores, pruned_scores, read_info(student).description.num_parameters(),
                       [(r["setup"], r) for r in rows])
    note = (f"Same training for every row: {args.steps} steps x {args.global_batch} sequences x {args.seq_len} tokens "
            f"= {rows[0]['tokens']:,} tokens, lr {args.lr} cosine, {args.dtype}. Generations: {len(records)} "
            f"prefixes of {args.prefix_tokens} tokens of builtin:train, {new_tokens:,} new tokens (temperature 1.0, "
            f"top-p 0.95). Held-out: {heldout[:, 1:].numel():,} tokens of builtin:heldout; tasks: {args.task_limit} "
            "examples each.")
    (out / "synthetic_quality.md").write_text("\n".join(table) + "\n\n" + note + "\n")
    print("\n".join(table) + "\n\n" + note)
    write_results(args, {"benchmark": "synthetic_quality", "teacher": teacher_scores, "pruned": pruned_scores,
                         "rows": rows, "generation_seconds": gen_seconds, "generated_tokens": new_tokens,
                         "note": note, "table": str(out / "synthetic_quality.md")})


if __name__ == "__main__":
    main()
