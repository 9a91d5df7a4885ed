"""The foundation commands: convert, export, eval (argument handling only; the work is in
``checkpoint.api`` and ``eval_api``).

A handler checks what it can without torch, then imports its stage's library once:
megatron-core takes seconds to import, and a usage error should not wait for it."""

from __future__ import annotations

from nemo_minitron.checkpoint.config import ConvertConfig, ExportConfig
from nemo_minitron.checkpoint.megatron_layout import model_path
from nemo_minitron.config import cli_names, from_args
from nemo_minitron.data.config import DataOptions
from nemo_minitron.errors import require
from nemo_minitron.files import check_checkpoint, check_model, check_new_output, check_output_file
from nemo_minitron.eval_config import EvalConfig
from nemo_minitron.tasks.config import TaskConfig


def runtime_options(args) -> dict:
    """--tp, --pp, --seed, --dtype as keyword options of the stage APIs."""
    return {k: getattr(args, k) for k in ("tp", "pp", "seed", "dtype") if hasattr(args, k)}


def data_options(args) -> dict:
    """--split, --data-cache as keyword options of the stage APIs."""
    return {k: getattr(args, k) for k in ("split", "cache_dir") if hasattr(args, k)}


def _stored_dtype(store, name: str):
    """convert and export store weights without computing: ``auto`` keeps the source's dtype."""
    return None if name in (None, "auto") else store.parse_dtype(name)


def convert(args) -> int:
    cfg = from_args(ConvertConfig, args)
    require(cfg.megatron is not None or args.iteration is None, "--iteration goes with --megatron")
    src = model_path(cfg.megatron, args.iteration, "--megatron") if cfg.megatron is not None else cfg.hf
    if cfg.megatron is not None:
        check_checkpoint(src, "--megatron")
    check_new_output(args.out, "--out")
    from nemo_minitron.checkpoint import api, store  # deferred: start-up time (see the module's docstring)

    require(cfg.megatron is None or store.megatron_checkpoint(src) is not None,
            f"--megatron '{cfg.megatron}' is not a Megatron-LM, Megatron-Bridge or NeMo 2 checkpoint")
    api.convert(src, args.out, dtype=_stored_dtype(store, args.dtype), tp=args.tp, pp=args.pp)
    return 0


def export(args) -> int:
    cfg = from_args(ExportConfig, args)
    require(args.hf_out or args.megatron_out, "give --hf-out DIR and/or --megatron-out DIR")
    require(not cfg.verify or args.hf_out, "--verify goes with --hf-out")
    ckpt = model_path(args.checkpoint, args.iteration, "CKPT")
    check_checkpoint(ckpt, "CKPT")
    for out, flag in ((args.hf_out, "--hf-out"), (args.megatron_out, "--megatron-out")):
        if out:
            check_new_output(out, flag)
    from nemo_minitron.checkpoint import api, store  # deferred: start-up time (see the module's docstring)

    api.export(ckpt, args.hf_out, cfg, megatron_out=args.megatron_out,
               dtype=_stored_dtype(store, args.dtype), tp=args.tp, pp=args.pp)
    return 0


def evaluate(args) -> int:
    model = model_path(args.model, args.iteration)
    cfg = from_args(EvalConfig, args)
    task_cfg = from_args(TaskConfig, args)
    data = from_args(DataOptions, args)
    require(args.data or task_cfg.tasks, "give --data (held-out loss) and/or --tasks (task accuracy)")
    require(task_cfg.tasks or (task_cfg.tasks_path is None and task_cfg.task_limit is None
                               and task_cfg.num_fewshot is None),
            "--tasks-path, --task-limit and --num-fewshot go with --tasks")
    check_model(model, "MODEL")
    if args.json:
        check_output_file(args.json, "--json")
    from nemo_minitron import eval_api  # deferred: start-up time (see the module's docstring)

    eval_api.evaluate_model(model, args.data, cfg, task_cfg, data, cli_names(DataOptions), tp=args.tp, pp=args.pp,
                            seed=args.seed, dtype=args.dtype, json_out=args.json)
    return 0
