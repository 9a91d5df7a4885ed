"""``nemo-minitron plan`` and ``nemo-minitron prune``: argument handling only.

A handler checks what it can without torch, then imports the library it needs once
(megatron-core takes seconds to import; a usage error should not wait for it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nemo_minitron.checkpoint.megatron_layout import model_path
from nemo_minitron.commands import runtime_options
from nemo_minitron.config import cli_names, from_args
from nemo_minitron.errors import require
from nemo_minitron.files import check_checkpoint, check_model, check_new_output, check_output_file
from nemo_minitron.prune.config import PerLayerConfig, PlanConfig, PlanOutputConfig, PruneConfig
from nemo_minitron.prune.plan import RANKING, format_table, plan
from nemo_minitron.prune.targets import format_count, parse_param_count


def plan_main(args) -> int:
    cfg = from_args(PlanConfig, args)
    output = from_args(PlanOutputConfig, args)
    per_layer = from_args(PerLayerConfig, args)
    per_layer.check_budget(cli_names(PerLayerConfig), args.target_params)
    require(per_layer.per_layer or args.target_params is not None, "--target-params is required (or --per-layer with "
                                                                   "a budget)")
    require(not per_layer.per_layer or args.importance is not None,
            "--per-layer needs --importance DIR (an importance run with --block-variants)")
    require(args.importance is None or per_layer.per_layer, "--importance is for --per-layer")
    require(args.refit is None or per_layer.per_layer, "--refit is for --per-layer (a uniform plan reads no scores)")
    path = model_path(args.model, args.iteration)
    check_model(path, "MODEL")
    if output.json:
        check_output_file(output.json, "--json")
    from nemo_minitron.checkpoint.api import describe_shapes  # deferred: start-up time (see the docstring)

    desc = describe_shapes(path)
    if per_layer.per_layer:
        return _plan_per_layer(args, desc, per_layer, output)
    budget = parse_param_count(args.target_params)
    candidates = plan(desc, budget, cfg, tp=args.tp, pp=args.pp)
    if os.environ.get("RANK", "0") != "0":  # nothing to compute together: rank 0 answers
        return 0
    print(f"{args.model}: {desc.summary()}")
    kind = f"{cfg.param_count} " if desc.is_moe else ""
    print(f"budget {format_count(budget)} {kind}parameters (+-{cfg.tolerance:.0%}) at --tp {args.tp} --pp {args.pp}; "
          f"ranked {RANKING[cfg.prefer]}\n")
    print(format_table(desc, candidates, budget, top=output.top, param_count=cfg.param_count))
    if output.json:
        Path(output.json).write_text(json.dumps([{"params": c.params, "active_params": c.active_params,
                                                  "target": c.target(), "why": c.why,
                                                  "flops_per_token": c.description.flops_per_token(),
                                                  "kv_cache_bytes_per_token": c.description.kv_cache_bytes_per_token(),
                                                  **({"ssm_state_bytes": c.description.ssm_state_bytes()}
                                                     if desc.is_hybrid else {})}
                                                 for c in candidates], indent=2))
    return 0


def _plan_per_layer(args, desc, cfg: PerLayerConfig, output: PlanOutputConfig) -> int:
    """``plan --per-layer``: the per-layer shapes the scores choose under the budget, and their costs."""
    require(Path(args.importance).is_dir(), f"--importance '{args.importance}' does not exist")
    from nemo_minitron.prune import per_layer  # deferred: torch and scipy (see the docstring)

    scores = per_layer.ImportanceScores.load(args.importance)
    scores.check_matches(desc)
    names = cli_names(PerLayerConfig)
    from nemo_minitron.prune.api import resolve_refit

    refit = resolve_refit(args.refit, desc, args.importance, scores, names, per_layer=True)  # as prune decides
    variants, choice = per_layer.per_layer_choice(desc, scores, cfg, args.target_params, names, tp=args.tp,
                                                  refit=refit)
    ffn_scores = per_layer.ffn_scores_key(scores, cfg.block_score, refit)
    per_layer.check_shapes(desc, choice, args.tp, args.pp)
    if os.environ.get("RANK", "0") != "0":
        return 0
    budget = per_layer.budget_of(cfg, args.target_params, names)
    print(f"{args.model}: {desc.summary()}")
    refit = ", MLP widths by their refit scores" if ffn_scores.startswith("block_ffn_refit") else ""
    print(f"per-layer choice from {args.importance} ({cfg.block_score} scores{refit}; attention options: query groups "
          f"{', '.join(map(str, variants.query_groups))}; MLP options: "
          f"{', '.join(map(str, variants.ffn))}; 0 = removed) at --tp {args.tp} --pp {args.pp}\n")
    print(per_layer.format_choice(desc, variants, choice, budget, cfg.block_score))
    refusal = per_layer.export_refusal(desc.replace(layer_shapes=choice.shapes), "--per-layer")
    if refusal:
        print(f"note: {refusal}; prune refuses it")
    if output.json:
        new = desc.replace(layer_shapes=choice.shapes)
        Path(output.json).write_text(json.dumps({
            "layer_shapes": [[s.num_query_groups, s.ffn_hidden_size] for s in choice.shapes],
            "score": choice.score, "layer_scores": list(choice.layer_scores), "cost": choice.cost,
            "ffn_scores": ffn_scores,
            "budget": {"kind": budget.kind, "limit": budget.limit}, "params": new.num_parameters(),
            "flops_per_token": new.flops_per_token(budget.flops_context), "flops_context": budget.flops_context,
            "kv_cache_bytes_per_token": new.kv_cache_bytes_per_token()},
            indent=2))
    return 0


def prune_main(args) -> int:
    path = model_path(args.checkpoint, args.iteration, "CKPT")
    cfg = from_args(PruneConfig, args)
    check_checkpoint(path, "CKPT")
    require(Path(args.importance).is_dir(), f"--importance '{args.importance}' does not exist")
    check_new_output(args.out, "--out")
    from nemo_minitron.prune.api import prune  # deferred: start-up time (see the docstring)

    prune(path, args.importance, args.out, cfg, **runtime_options(args))
    return 0
