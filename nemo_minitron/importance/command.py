"""``nemo-minitron importance``: argument handling; the work is in ``importance.api``."""

from __future__ import annotations


def _block_sizes(text: str) -> list[int]:
    from nemo_minitron.errors import UsageError

    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise UsageError(f"--drop-blocks must be comma-separated integers (got '{text}')") from None


def main(args) -> int:
    from nemo_minitron.importance.api import compute_importance

    compute_importance(args.checkpoint, args.data, args.out, samples=args.samples, seq_len=args.seq_len,
                       micro_batch=args.micro_batch, batch_agg=args.batch_agg, seq_agg=args.seq_agg,
                       neuron_activation=args.neuron_activation, layer_samples=args.layer_samples,
                       drop_blocks=_block_sizes(args.drop_blocks), seed=args.seed, tp=args.tp, pp=args.pp,
                       dtype=args.dtype, split=args.split, data_cache=args.data_cache)
    return 0
