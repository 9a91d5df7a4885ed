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
    from nemo_minitron.data.samples import load_samples, parse_data_specs
    from nemo_minitron.evaluate import evaluate as run
    from nemo_minitron.runtime.distributed import check_world_size, init_distributed, is_rank0

    dtype = _dtype(args)
    require(args.data or args.tasks, "give --data (held-out loss) and/or --tasks (task accuracy)")
    specs = parse_data_specs(args.data) if args.data else None
    require(args.seq_len >= 1, f"--seq-len must be >= 1 (got {args.seq_len})")
    require(args.micro_batch >= 1, f"--micro-batch must be >= 1 (got {args.micro_batch})")
    require(args.max_tokens is None or args.max_tokens >= args.seq_len,
            f"--max-tokens {args.max_tokens} is less than one sample of --seq-len {args.seq_len}")
    require(args.tasks or not (args.tasks_path or args.limit or args.num_fewshot is not None),
            "--tasks-path, --limit and --num-fewshot go with --tasks")
    require(args.limit is None or args.limit > 0, f"--limit must be > 0 (got {args.limit})")
    if args.json:
        require(Path(args.json).parent.is_dir() or not str(Path(args.json).parent),
                f"--json '{args.json}': directory does not exist")
    desc = describe_model(args.model)
    desc.check_layout(args.tp, args.pp)
    check_world_size(args.tp, args.pp)
    tasks = None
    if args.tasks:
        from nemo_minitron.tasks.api import resolve_tasks

        tasks = resolve_tasks(args.tasks, args.tasks_path)
    init_distributed(args.tp, args.pp, args.seed)
    opened = open_model(args.model, dtype=dtype)
    record: dict = {"model": args.model}
    if specs is not None:
        limit = None if args.max_tokens is None else args.max_tokens // args.seq_len
        samples = load_samples(specs, opened.tokenizer, args.seq_len, vocab_size=desc.vocab_size)
        if limit is not None:
            samples = samples[:limit]
        result = run(opened.model, desc.vocab_size, samples, micro_batch=args.micro_batch)
        record.update(data=args.data, seq_len=args.seq_len, **result.to_dict())
        if is_rank0():
            print(f"{args.model}: loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
                  f"tokens {result.tokens}  samples {result.samples}")
    if tasks is not None:
        from nemo_minitron.tasks.api import run_tasks
        from nemo_minitron.tasks.lm import MegatronLM

        lm = MegatronLM(opened.model, opened.description, opened.tokenizer, batch_size=args.micro_batch)
        limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
        results = run_tasks(lm, tasks, limit=limit, num_fewshot=args.num_fewshot, seed=args.seed)
        record["tasks"] = {name: r.to_dict() for name, r in results.items()}
        if is_rank0():
            for name, r in results.items():
                shown = "  ".join(f"{k} {v:.4f}" + (f" ± {r.stderr[k]:.4f}" if k in r.stderr else "")
                                  for k, v in r.metrics.items())
                print(f"{args.model}: {name}: {shown}  ({r.samples} examples)")
    if is_rank0() and args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0
