"""``nemo-minitron plan`` and ``nemo-minitron prune``: argument handling only."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _description(path: str):
    """A checkpoint, a convertible source, or a plain HF config.json."""
    from nemo_minitron.checkpoint.api import describe_model
    from nemo_minitron.errors import UsageError
    from nemo_minitron.model.description import description_from_hf_config

    from nemo_minitron.checkpoint.store import is_checkpoint

    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and not is_checkpoint(p):
        p = p / "config.json"  # planning needs the shapes only: no weights have to be there
    if p.is_file() and p.suffix == ".json":
        try:
            return description_from_hf_config(json.loads(p.read_text()), name=p.parent.name)
        except json.JSONDecodeError as e:
            raise UsageError(f"MODEL '{path}': not JSON ({e.msg})") from None
    return describe_model(path)


def plan_main(args) -> int:
    from nemo_minitron.config import from_args
    from nemo_minitron.prune.config import PlanConfig
    from nemo_minitron.prune.plan import RANKING, format_table, plan
    from nemo_minitron.prune.targets import format_count, parse_param_count

    from nemo_minitron.checkpoint.api import model_path

    cfg = from_args(PlanConfig, args)
    desc = _description(model_path(args.model, args.iteration))
    budget = parse_param_count(args.target_params)
    candidates = plan(desc, budget, cfg, tp=args.tp, pp=args.pp)
    if os.environ.get("RANK", "0") != "0":  # nothing to compute together: rank 0 answers
        return 0
    print(f"{args.model}: {desc.summary()}")
    kind = f"{cfg.param_count} " if desc.is_moe else ""
    print(f"budget {format_count(budget)} {kind}parameters (+-{cfg.tolerance:.0%}) at --tp {args.tp} --pp {args.pp}; "
          f"ranked {RANKING[cfg.prefer]}\n")
    print(format_table(desc, candidates, budget, top=args.top, param_count=cfg.param_count))
    if args.json:
        Path(args.json).write_text(json.dumps([{"params": c.params, "active_params": c.active_params,
                                                "target": c.target(), "why": c.why,
                                                "flops_per_token": c.description.flops_per_token(),
                                                "kv_cache_bytes_per_token": c.description.kv_cache_bytes_per_token()}
                                               for c in candidates], indent=2))
    return 0


def prune_main(args) -> int:
    from nemo_minitron.commands import runtime_options
    from nemo_minitron.config import from_args
    from nemo_minitron.prune.api import prune
    from nemo_minitron.prune.config import PruneConfig

    from nemo_minitron.checkpoint.api import model_path

    prune(model_path(args.checkpoint, args.iteration, "CKPT"), args.importance, args.out,
          from_args(PruneConfig, args), **runtime_options(args))
    return 0
