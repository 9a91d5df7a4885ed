#!/usr/bin/env python3
"""How to weight intermediate (pair) losses: quality after distillation with 1, 2 and 4 pairs.

The student is SmolLM2-135M depth-pruned to 16 of its 30 layers (the best contiguous
block removed), where intermediate losses matter most (the paper: only when depth was
cut a lot). Each student layer i is paired with the teacher layer it was copied from,
spread evenly over the student's depth. Every run gets the same training (steps, batch,
schedule, data order); the figure is the held-out loss on builtin:heldout after it.

    auto      the pairs' weighted *mean* matches the logit loss each step (ModelOpt's
              averaging): the intermediate term weighs as much as the logit term
    auto_sum  every pair matches the logit loss: n pairs weigh n times the logit term

plus a run without pairs. The better setting is the project's default (docs/design.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from common import CACHE, parser, pruned_smollm2, smollm2_checkpoint, write_results


def pairs_for(kept_layers: list[int], n: int) -> list[str]:
    """n student layers spread over the depth (the last one included), each with its source."""
    depth = len(kept_layers)
    chosen = [round((k + 1) * depth / n) - 1 for k in range(n)]
    return [f"{s}:{kept_layers[s]}" for s in chosen]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=str(CACHE / "pair-weighting"))
    args = p.parse_args()

    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.distill.api import distill

    teacher = smollm2_checkpoint()
    student = pruned_smollm2("importance", target={"layers": 16})
    kept = read_info(student).provenance["kept"]["layers"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = dict(steps=args.steps, global_batch=args.global_batch, micro_batch=args.micro_batch,
                 seq_len=args.seq_len, lr=args.lr, min_lr=args.lr / 10, warmup_steps=max(1, args.steps // 10),
                 eval_samples=args.eval_samples, save_every=0, dtype=args.dtype)
    runs = [("no pairs", 0, "auto")] + [(f"{n} pair{'s' if n > 1 else ''}, {w}", n, w)
                                        for n in (1, 2, 4) for w in ("auto", "auto_sum")]
    rows = []
    for label, n, weighting in runs:
        if n == 1 and weighting == "auto_sum":
            continue  # one pair: both settings are the same
        run_dir = out / f"pairs{n}-{weighting}-{args.steps}steps"
        pairs = pairs_for(kept, n) if n else []
        if not (run_dir / "summary.json").is_file():
            distill(str(teacher), str(student), ["builtin:train"], str(run_dir), kd_pairs=pairs,
                    kd_pair_weight=weighting, **train)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({"setup": label, "pairs": pairs, "weighting": weighting,
                     "heldout_before": summary["student_before"]["heldout_loss"],
                     "heldout_after": summary["student_after"]["heldout_loss"],
                     "final_kd_loss": summary["final_kd_loss"], "final_pair_losses": summary["final_pair_losses"]})
        print(f"{label:22s} held-out loss {rows[-1]['heldout_after']:.4f}", flush=True)
    table = ["| pairs, weighting | held-out loss after distillation |", "|---|---|"]
    table += [f"| {r['setup']} | {r['heldout_after']:.4f} |" for r in rows]
    note = (f"SmolLM2-135M depth-pruned to 16 layers, {args.steps} steps x {args.global_batch} x {args.seq_len} "
            f"tokens of builtin:train, lr {args.lr} cosine, {args.dtype}; held-out: {args.eval_samples} x "
            f"{args.seq_len} tokens of builtin:heldout.")
    (out / "pair_weighting.md").write_text("\n".join(table) + "\n\n" + note + "\n")
    write_results(args, {"benchmark": "pair_weighting", "rows": rows, "note": note})


if __name__ == "__main__":
    main()
