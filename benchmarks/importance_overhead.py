#!/usr/bin/env python3
"""Cost of a calibration pass with importance scoring against a plain forward pass over
the same batches (SmolLM2-135M, built-in calibration split), measured side by side in
one run: the two kinds of pass alternate, and the ratio of their median times is
reported. Target: at most 1.05."""

from __future__ import annotations

import statistics
import time

from common import builtin_samples, parser, smollm2_checkpoint, write_results


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()

    import torch

    from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer, parse_dtype
    from nemo_minitron.importance.api import hooks_only_step
    from nemo_minitron.importance.collect import ActivationCollector
    from nemo_minitron.importance.config import ImportanceConfig
    from nemo_minitron.model.forward import run_forward_only, split_microbatches
    from nemo_minitron.runtime.distributed import init_distributed, layout

    ckpt = smollm2_checkpoint()
    init_distributed(1, 1)
    model, info = load_checkpoint(ckpt, dtype=parse_dtype(args.dtype))
    samples = builtin_samples("calib", load_tokenizer(ckpt), args.seq_len, num_samples=args.samples).take()
    batches = split_microbatches(samples, args.micro_batch)
    step = hooks_only_step(layout().device)

    def plain() -> None:
        run_forward_only(model, batches, step)

    defaults = ImportanceConfig()  # the scores `importance` computes by default

    def scoring() -> None:
        collector = ActivationCollector(model, seq_agg=defaults.seq_agg, neuron_activation=defaults.neuron_activation,
                                        head_score=defaults.head_score)
        with collector.active():
            run_forward_only(model, batches, step)
        collector.finalize(info.description.num_layers, defaults.batch_agg)

    plain(), scoring()  # warm-up
    times = {"plain": [], "scoring": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("scoring", scoring)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(times["scoring"]) / statistics.median(times["plain"])
    write_results(args, {"benchmark": "importance_overhead", "model": "SmolLM2-135M", "dtype": args.dtype,
                         "tokens_per_pass": args.samples * args.seq_len, "threads": torch.get_num_threads(),
                         "plain_seconds": times["plain"], "scoring_seconds": times["scoring"],
                         "ratio_scoring_over_plain": round(ratio, 4), "target": 1.05})


if __name__ == "__main__":
    main()
