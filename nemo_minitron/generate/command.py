"""``nemo-minitron generate``: argument handling; the work is in ``generate.api``."""

from __future__ import annotations


def main(args) -> int:
    from nemo_minitron.checkpoint.store import parse_dtype
    from nemo_minitron.generate.api import generate
    from nemo_minitron.generate.engine import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, stop=tuple(args.stop or ()), ignore_eos=args.ignore_eos)
    generate(args.model, args.out, prompts=args.prompts, data=args.data, prefix_tokens=args.prefix_tokens,
             limit=args.limit, sampling=sampling, batch_size=args.batch_size, seed=args.seed, tp=args.tp, pp=args.pp,
             dtype=parse_dtype(args.dtype) if args.dtype else None)
    return 0
