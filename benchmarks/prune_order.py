#!/usr/bin/env python3
"""Held-out LM loss of SmolLM2-135M right after pruning (no retraining) to hidden 480,
ffn 1024, 6 heads in 3 query groups, when what to keep is chosen by activation
importance (Minitron), by weight magnitude, or at random — measured in one run on the
built-in held-out split. The importance scores come from the built-in calibration split."""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import parser, smollm2_checkpoint, write_results

TARGET = {"hidden": 480, "ffn": 1024, "heads": 6, "query_groups": 3}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the random baseline")
    args = p.parse_args()

    from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer
    from nemo_minitron.data.samples import load_samples, parse_data_specs
    from nemo_minitron.evaluate import evaluate
    from nemo_minitron.importance.api import compute_importance
    from nemo_minitron.prune.api import prune

    ckpt = smollm2_checkpoint()
    work = Path(tempfile.mkdtemp(prefix="prune_order_"))
    imp = work / "importance"
    compute_importance(str(ckpt), ["builtin:calib"], str(imp), samples=args.calib_samples, seq_len=args.seq_len,
                       micro_batch=8, layer_samples=4, dtype="bfloat16")
    heldout = load_samples(parse_data_specs(["builtin:heldout"]), load_tokenizer(ckpt), args.seq_len)
    heldout = heldout[: args.eval_samples]

    def loss(path: Path) -> float:
        model, info = load_checkpoint(path)
        return evaluate(model, info.description.vocab_size, heldout, micro_batch=8).loss

    results = {"target": TARGET, "heldout_tokens": int(heldout[:, 1:].numel()), "original": loss(ckpt)}
    for order, seeds in (("importance", [1234]), ("magnitude", [1234]), ("random", args.seeds)):
        losses = []
        for seed in seeds:
            out = prune(str(ckpt), str(imp), str(work / f"{order}-{seed}"), target=TARGET, order=order, seed=seed)
            losses.append(loss(out))
        results[order] = sum(losses) / len(losses)
        if len(losses) > 1:
            results[f"{order}_per_seed"] = losses
    results["importance_beats_both"] = results["importance"] < min(results["magnitude"], results["random"])
    write_results(args, {"benchmark": "prune_order", "model": "SmolLM2-135M", **results})


if __name__ == "__main__":
    main()
