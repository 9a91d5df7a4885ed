#!/usr/bin/env python3
"""Held-out LM loss of SmolLM2-135M right after pruning (no retraining) to hidden 480,
ffn 1024, 6 heads in 3 query groups (84.5M parameters), when what to keep is chosen by
activation importance (Minitron), by weight magnitude, or at random (mean over seeds) —
measured in one run on the built-in held-out split. The importance scores come from the
built-in calibration split (computed once and cached in benchmarks/.cache)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from common import PRUNED_TARGET, builtin_samples, parser, smollm2_checkpoint, smollm2_importance, write_results


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the random baseline")
    args = p.parse_args()

    from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer
    from nemo_minitron.evaluate import evaluate
    from nemo_minitron.prune.api import prune
    from nemo_minitron.runtime.distributed import init_distributed, is_rank0

    init_distributed(1, 1)
    ckpt, importance = smollm2_checkpoint(), smollm2_importance()
    heldout = builtin_samples("heldout", load_tokenizer(ckpt), args.seq_len).take(args.eval_samples)
    work = Path(tempfile.mkdtemp(prefix="prune_order_"))  # five 84M-parameter checkpoints: removed at the end

    def loss(path: Path) -> float:
        model, info = load_checkpoint(path)
        return evaluate(model, info.description.vocab_size, heldout, micro_batch=8).loss

    results = {"target": PRUNED_TARGET, "importance_dir": importance.name,
               "heldout_samples": len(heldout), "heldout_tokens": int(heldout[:, 1:].numel()), "original": loss(ckpt)}
    for order, seeds in (("importance", [1234]), ("magnitude", [1234]), ("random", args.seeds)):
        losses = [loss(prune(str(ckpt), str(importance), str(work / f"{order}-{seed}"), target=PRUNED_TARGET,
                             order=order, seed=seed, refit=False)) for seed in seeds]
        results[order] = sum(losses) / len(losses)
        if len(losses) > 1:
            results[f"{order}_per_seed"] = losses
    shutil.rmtree(work, ignore_errors=True)
    results["importance_beats_both"] = results["importance"] < min(results["magnitude"], results["random"])
    if is_rank0():
        print(f"\nSmolLM2-135M -> {PRUNED_TARGET}, held-out LM loss right after pruning "
              f"({results['heldout_tokens']:,} tokens of builtin:heldout)")
        for name in ("original", "importance", "magnitude", "random"):
            print(f"  {name:<11} {results[name]:.4f}")
    write_results(args, {"benchmark": "prune_order", "model": "SmolLM2-135M", **results})


if __name__ == "__main__":
    main()
