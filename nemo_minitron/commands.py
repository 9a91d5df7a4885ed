"""The foundation commands: convert, export, eval (argument handling only; the work is
in ``checkpoint.api`` and ``evaluate``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from nemo_minitron.checkpoint.store import parse_dtype
from nemo_minitron.errors import require

log = logging.getLogger("nemo_minitron")


def _dtype(args):
    return parse_dtype(args.dtype) if args.dtype else None


def convert(args) -> int:
    from nemo_minitron.checkpoint.api import convert as run

    run(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=_dtype(args), seed=args.seed)
    return 0


def export(args) -> int:
    from nemo_minitron.checkpoint.api import export as run

    run(args.checkpoint, args.hf_out, tp=args.tp, pp=args.pp, dtype=_dtype(args), seed=args.seed,
        verify=args.verify)
    return 0


def evaluate(args) -> int:
    from nemo_minitron.checkpoint.api import describe_model, open_model
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.data.preprocess import load_any_tokenizer
    from nemo_minitron.evaluate import evaluate as run
    from nemo_minitron.runtime.distributed import check_world_size, init_distributed, is_rank0

    dtype = _dtype(args)
    require(args.seq_len >= 1, f"--seq-len must be >= 1 (got {args.seq_len})")
    require(args.micro_batch >= 1, f"--micro-batch must be >= 1 (got {args.micro_batch})")
    require(args.max_tokens is None or args.max_tokens >= args.seq_len,
            f"--max-tokens {args.max_tokens} is less than one sample of --seq-len {args.seq_len}")
    if args.json:
        require(Path(args.json).parent.is_dir() or not str(Path(args.json).parent),
                f"--json '{args.json}': directory does not exist")
    desc = describe_model(args.model)
    tokenizer = load_any_tokenizer(args.model, "MODEL")
    # with --split, the validation part of the data: what training on the rest did not see
    corpus = check_corpus(args.data, vocab_size=desc.vocab_size, split=args.split, cache_dir=args.data_cache,
                          tokenizer=tokenizer)
    desc.check_layout(args.tp, args.pp)
    check_world_size(args.tp, args.pp)
    init_distributed(args.tp, args.pp, args.seed)
    samples = corpus.dataset(tokenizer, seq_len=args.seq_len, seed=args.seed, part="valid")
    if args.max_tokens is not None:
        samples = samples.first(args.max_tokens // args.seq_len)
    opened = open_model(args.model, dtype=dtype)
    result = run(opened.model, desc.vocab_size, samples, micro_batch=args.micro_batch)
    record = {"model": args.model, "data": corpus.blend.label, "split": args.split, "seq_len": args.seq_len,
              **result.to_dict()}
    if is_rank0():
        print(f"{args.model}: loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
              f"tokens {result.tokens}  samples {result.samples}")
        if args.json:
            Path(args.json).write_text(json.dumps(record, indent=2))
    return 0
