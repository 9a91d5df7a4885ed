"""The foundation commands: convert, export, eval (argument handling only; the work is
in ``checkpoint.api`` and ``evaluate``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from nemo_minitron.checkpoint.store import parse_dtype
from nemo_minitron.errors import require

log = logging.getLogger("nemo_minitron")


def runtime_options(args) -> dict:
    """--tp, --pp, --seed, --dtype as keyword options of the stage APIs."""
    return {k: getattr(args, k) for k in ("tp", "pp", "seed", "dtype") if hasattr(args, k)}


def data_options(args) -> dict:
    """--split, --data-cache as keyword options of the stage APIs."""
    return {k: getattr(args, k) for k in ("split", "cache_dir") if hasattr(args, k)}


def _dtype(args):
    return parse_dtype(args.dtype) if args.dtype else None


def convert(args) -> int:
    from nemo_minitron.checkpoint.api import convert as run
    from nemo_minitron.checkpoint.api import model_path
    from nemo_minitron.checkpoint.store import megatron_checkpoint

    if args.megatron:
        src = model_path(args.megatron, args.iteration, "--megatron")
        require(megatron_checkpoint(src) is not None, f"--megatron '{args.megatron}' is not a Megatron-LM, "
                                                      "Megatron-Bridge or NeMo 2 checkpoint")
    else:
        require(args.iteration is None, "--iteration goes with --megatron")
        src = args.hf
    run(src, args.out, tp=args.tp, pp=args.pp, dtype=_dtype(args), seed=args.seed)
    return 0


def export(args) -> int:
    from nemo_minitron.checkpoint.api import export as run
    from nemo_minitron.checkpoint.api import model_path

    require(args.hf_out or args.megatron_out, "give --hf-out DIR and/or --megatron-out DIR")
    require(not args.verify or args.hf_out, "--verify goes with --hf-out")
    run(model_path(args.checkpoint, args.iteration, "CKPT"), args.hf_out, megatron_out=args.megatron_out,
        vocab_padding=args.vocab_padding, tp=args.tp, pp=args.pp, dtype=_dtype(args), seed=args.seed,
        verify=args.verify)
    return 0


def evaluate(args) -> int:
    from nemo_minitron.checkpoint.api import describe_model, model_path, open_model
    from nemo_minitron.checkpoint.store import megatron_checkpoint, require_tokenizer
    from nemo_minitron.config import cli_names, from_args, to_dict, yaml_text
    from nemo_minitron.data.config import DataOptions
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.data.preprocess import load_any_tokenizer
    from nemo_minitron.eval_config import EvalConfig
    from nemo_minitron.evaluate import evaluate as run
    from nemo_minitron.runtime.distributed import check_world_size, init_distributed, is_rank0
    from nemo_minitron.tasks.config import TaskConfig

    args.model = model_path(args.model, args.iteration)
    cfg = from_args(EvalConfig, args)
    task_cfg = from_args(TaskConfig, args)
    data = from_args(DataOptions, args)
    names = cli_names(DataOptions)
    dtype = _dtype(args)
    require(args.data or task_cfg.tasks, "give --data (held-out loss) and/or --tasks (task accuracy)")
    require(task_cfg.tasks or (task_cfg.tasks_path is None and task_cfg.task_limit is None
                               and task_cfg.num_fewshot is None),
            "--tasks-path, --task-limit and --num-fewshot go with --tasks")
    if args.json:
        require(Path(args.json).parent.is_dir() or not str(Path(args.json).parent),
                f"--json '{args.json}': directory does not exist")
    desc = describe_model(args.model)
    if megatron_checkpoint(args.model) is not None:
        require_tokenizer(args.model, "eval tokenizes --data and --tasks")
    corpus = tokenizer = None
    if args.data:
        tokenizer = load_any_tokenizer(args.model, "MODEL")
        # with --split, the validation part of the data: what training on the rest did not see
        corpus = check_corpus(args.data, vocab_size=desc.vocab_size, split=data.split, split_flag=names("split"),
                              cache_dir=data.cache_dir, cache_flag=names("cache_dir"), tokenizer=tokenizer)
        require(cfg.seq_len <= desc.max_position_embeddings,
                f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                f"({desc.max_position_embeddings})")
    desc.check_layout(args.tp, args.pp)
    check_world_size(args.tp, args.pp)
    tasks = None
    if task_cfg.tasks:
        from nemo_minitron.tasks.api import resolve_tasks

        tasks = resolve_tasks(task_cfg.tasks, task_cfg.tasks_path)
    init_distributed(args.tp, args.pp, args.seed)
    resolved = {"model": args.model, "data": corpus.blend.label if corpus else None, "dtype": args.dtype,
                **to_dict(data), **to_dict(cfg), **to_dict(task_cfg)}
    if is_rank0():
        log.info("eval config:\n%s", yaml_text(resolved).rstrip())
    opened = open_model(args.model, dtype=dtype)
    record = dict(resolved)
    if corpus is not None:
        samples = corpus.dataset(tokenizer, seq_len=cfg.seq_len, seed=args.seed, part="valid")
        if cfg.max_tokens is not None:
            samples = samples.first(cfg.max_tokens // cfg.seq_len)
        result = run(opened.model, desc.vocab_size, samples, micro_batch=cfg.micro_batch)
        record.update(result.to_dict())
        if is_rank0():
            print(f"{args.model}: loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
                  f"tokens {result.tokens}  samples {result.samples}")
    if tasks is not None:
        from nemo_minitron.tasks.api import run_tasks
        from nemo_minitron.tasks.lm import MegatronLM

        lm = MegatronLM(opened.model, opened.description, opened.tokenizer, batch_size=cfg.micro_batch,
                        seed=args.seed)
        results = run_tasks(lm, tasks, limit=task_cfg.task_limit, num_fewshot=task_cfg.num_fewshot, seed=args.seed)
        record["tasks"] = {name: r.to_dict() for name, r in results.items()}
        if is_rank0():
            for name, r in results.items():
                shown = "  ".join(f"{k} {v:.4f}" + (f" ± {r.stderr[k]:.4f}" if k in r.stderr else "")
                                  for k, v in r.metrics.items())
                print(f"{args.model}: {name}: {shown}  ({r.samples} examples)")
    if is_rank0() and args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0
