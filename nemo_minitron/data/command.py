"""``nemo-minitron preprocess`` (argument handling; the work is in ``preprocess.py``)."""

from __future__ import annotations

from nemo_minitron.config import from_args
from nemo_minitron.data.config import PreprocessConfig
from nemo_minitron.files import check_model


def preprocess_main(args) -> int:
    cfg = from_args(PreprocessConfig, args)
    check_model(args.model, "--model")
    from nemo_minitron.data.preprocess import preprocess  # deferred: start-up time of the error path (tokenizers)

    stats = preprocess(args.input, args.model, args.out, cfg)
    rate = f"{stats['tokens_per_second']:,.0f} tokens/s" if stats["tokens_per_second"] else ""
    print(f"{stats['prefix']}.bin/.idx: {stats['documents']:,} documents, {stats['tokens']:,} tokens "
          f"({stats['dtype']}), {stats['seconds']:.1f} s, {rate} with {stats['workers']} worker(s)")
    return 0
