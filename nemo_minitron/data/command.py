"""``nemo-minitron preprocess`` (argument handling; the work is in ``preprocess.py``)."""

from __future__ import annotations


def preprocess_main(args) -> int:
    from nemo_minitron.data.preprocess import preprocess

    stats = preprocess(args.input, args.model, args.out, workers=args.workers)
    rate = f"{stats['tokens_per_second']:,.0f} tokens/s" if stats["tokens_per_second"] else ""
    print(f"{stats['prefix']}.bin/.idx: {stats['documents']:,} documents, {stats['tokens']:,} tokens "
          f"({stats['dtype']}), {stats['seconds']:.1f} s, {rate} with {stats['workers']} worker(s)")
    return 0
