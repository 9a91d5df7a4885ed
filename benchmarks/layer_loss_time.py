#!/usr/bin/env python3
"""Time of importance's layer-loss passes started at the recorded input of the first
skipped layer (``SkipLosses``) against passes from the embedding (``loss_without``, what
every pass did before), side by side in one run on SmolLM2-135M: the full model's loss,
then each layer skipped alone (the loss drops) and each layer skipped with layer
``--second`` (a greedy elimination's second step; ``--every N``: every N-th layer only).
The two kinds of pass alternate set
by set; reported: the ratio of their summed times, and whether every loss is the same bits.

    nice python benchmarks/layer_loss_time.py --json benchmarks/results/layer_loss_time.json
"""

from __future__ import annotations

import time

from common import builtin_samples, parser, smollm2_checkpoint, write_results


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=8, help="importance's --layer-samples (its default run's)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--second", type=int, default=20, help="the layer skipped with each other one")
    p.add_argument("--every", type=int, default=1, help="only every N-th layer skipped (a sample of the sets)")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()

    from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer, parse_dtype
    from nemo_minitron.importance.layers import SkipLosses, loss_without
    from nemo_minitron.runtime.distributed import init_distributed

    ckpt = smollm2_checkpoint()
    init_distributed(1, 1)
    model, info = load_checkpoint(ckpt, dtype=parse_dtype(args.dtype))
    vocab, L = info.description.vocab_size, info.description.num_layers
    samples = builtin_samples("calib", load_tokenizer(ckpt), args.seq_len, num_samples=args.samples).take()
    chosen = range(0, L, args.every)
    sets = [[]] + [[i] for i in chosen] + [sorted({i, args.second}) for i in chosen if i != args.second]

    recorded = SkipLosses(model, vocab, samples, args.micro_batch)
    seconds = {"from the embedding": 0.0, "from recorded inputs": 0.0}
    same = True
    for n, layers in enumerate(sets):
        order = ("from the embedding", "from recorded inputs")[:: 1 if n % 2 == 0 else -1]
        got = {}
        for kind in order:
            start = time.perf_counter()
            if kind == "from the embedding":
                got[kind] = loss_without(model, vocab, samples, layers, args.micro_batch)
            else:
                got[kind] = recorded(layers)
            seconds[kind] += time.perf_counter() - start
        same &= got["from the embedding"] == got["from recorded inputs"]
        print(f"{n + 1}/{len(sets)} skipped {layers}: {got['from recorded inputs']:.6f} "
              f"({'same bits' if same else 'DIFFERENT'})", flush=True)
    ratio = seconds["from recorded inputs"] / seconds["from the embedding"]
    print(f"{len(sets)} passes of {args.samples} x {args.seq_len} tokens, {args.dtype}: from recorded inputs "
          f"{seconds['from recorded inputs']:.1f} s, from the embedding {seconds['from the embedding']:.1f} s: "
          f"ratio {ratio:.3f}; every loss the same bits: {same}")
    write_results(args, {"benchmark": "layer_loss_time", "settings": vars(args), "passes": len(sets),
                         "seconds": {k: round(v, 2) for k, v in seconds.items()}, "ratio": round(ratio, 4),
                         "same_bits": same})


if __name__ == "__main__":
    main()
