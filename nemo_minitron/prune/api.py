"""``prune``: a checkpoint plus its importance directory -> a smaller checkpoint.

Works on the model as loaded at any TP/PP layout: each weight is gathered over its
tensor-parallel group, cut to the kept units (``transforms.prune_tensor``) and sliced
again for this rank, so no rank ever holds more than one full tensor at a time. Layers
never move between pipeline stages: the new model is built with, on each stage, the
kept layers that stage already holds; its distributed checkpoint then loads at any
layout. Everything the user gave is checked before the first weight is read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from nemo_minitron.errors import require
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.prune.plan import plan
from nemo_minitron.prune.select import ORDERS, UnitScores, keep_plan, layers_to_keep, random_scores
from nemo_minitron.prune.targets import apply_target, describe_change, parse_param_count

log = logging.getLogger("nemo_minitron")


def planned_description(desc: ModelDescription, *, target: dict[str, int] | None = None,
                        target_params: str | int | None = None, tp: int = 1, pp: int = 1,
                        max_width_cut: float = 0.5, max_depth_cut: float = 0.5, prefer: str = "width",
                        flag: str = "--target") -> ModelDescription:
    """The pruned shape for an explicit target or a budget (the planner's first candidate)."""
    require((target is None) != (target_params is None), f"{flag}: give exactly one of a target and a budget")
    if target is not None:
        return apply_target(desc, dict(target), tp=tp, pp=pp, flag=flag)
    budget = target_params if isinstance(target_params, int) else parse_param_count(str(target_params))
    return plan(desc, budget, max_width_cut=max_width_cut, max_depth_cut=max_depth_cut, prefer=prefer,
                tp=tp, pp=pp)[0].description


def _stage_bounds(num_layers: int) -> list[tuple[int, int]]:
    from megatron.core import parallel_state as ps

    from nemo_minitron.model.builder import balanced_stages

    sizes = balanced_stages(num_layers, ps.get_pipeline_model_parallel_world_size())
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def _magnitude_scores(model, desc: ModelDescription) -> UnitScores:
    """Weight-mass scores of every unit, from full (TP-gathered) tensors; collective."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.model.params import gather, layer_of, named_weights
    from nemo_minitron.prune.transforms import magnitudes

    L = desc.num_layers
    out = {"hidden": torch.zeros(desc.hidden_size, dtype=torch.float64),
           "ffn": torch.zeros(L, desc.ffn_hidden_size, dtype=torch.float64),
           "heads": torch.zeros(L, desc.num_attention_heads, dtype=torch.float64),
           "query_groups": torch.zeros(L, desc.num_query_groups, dtype=torch.float64),
           "layers": torch.zeros(L, dtype=torch.float64)}
    tied_copy = desc.tie_embeddings and not ps.is_pipeline_first_stage()
    for name, param in named_weights(model):
        full = gather(name, param.detach(), group=ps.get_tensor_model_parallel_group()).cpu()
        if name == "output_layer.weight" and tied_copy:
            continue
        layer = layer_of(name)
        for axis, values in magnitudes(name, full[: desc.vocab_size] if "embedding" in name or "output" in name
                                       else full, desc).items():
            if axis == "hidden":
                out["hidden"] += values
            else:
                out[axis][layer] += values
        if layer is not None:
            out["layers"][layer] += full.double().square().sum()
    from nemo_minitron.runtime.distributed import current_device

    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        for key, value in out.items():  # every stage adds what it holds
            moved = value.to(current_device())
            dist.all_reduce(moved, group=ps.get_pipeline_model_parallel_group())
            out[key] = moved.cpu()
    return UnitScores(**out)


def prune(checkpoint: str, importance: str, out: str, *, target: dict[str, int] | None = None,
          target_params: str | int | None = None, order: str = "importance", layer_metric: str = "contiguous",
          seed: int = 1234, tp: int = 1, pp: int = 1, max_width_cut: float = 0.5, max_depth_cut: float = 0.5,
          progress: bool = True) -> Path:
    """Write the pruned checkpoint ``out``; returns its path."""
    from nemo_minitron.checkpoint.store import (
        DTYPES,
        CheckpointInfo,
        check_new_output,
        load_checkpoint,
        load_tokenizer,
        read_info,
        save_checkpoint,
    )
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.runtime.distributed import check_world_size, init_distributed

    # ---- validate everything before any weight is read
    info = read_info(checkpoint)
    old = info.description
    require(order in ORDERS, f"--order must be one of {', '.join(ORDERS)} (got '{order}')")
    scores = ImportanceScores.load(importance)
    scores.check_matches(old)
    out_path = check_new_output(out)
    old.check_layout(tp, pp)
    new = planned_description(old, target=target, target_params=target_params, tp=tp, pp=pp,
                              max_width_cut=max_width_cut, max_depth_cut=max_depth_cut,
                              flag="--target" if target is not None else "--target-params")
    # Layers: by --layer-metric with importance (or an explicit list, whatever the order); the
    # baselines choose layers their own way (random: seeded; magnitude: weight mass, after loading).
    units = random_scores(old, seed) if order == "random" else None
    by_metric = order == "importance" or layer_metric not in ("contiguous", "loss", "block")
    if by_metric or old.num_layers == new.num_layers:
        kept_layers = layers_to_keep(old, new, layer_metric, scores.summary)
    elif order == "random":
        kept_layers = layers_to_keep(old, new, "scores", {}, units.layers)
    check_world_size(tp, pp)

    # ---- work
    init_distributed(tp, pp, seed)
    model, info = load_checkpoint(checkpoint)
    if order == "importance":
        units = UnitScores(hidden=scores["hidden"], ffn=scores["ffn"], heads=scores["heads"],
                           query_groups=scores["query_groups"], layers=scores["layer_loss_drop"])
    elif order == "magnitude":
        units = _magnitude_scores(model, old)
        if not (by_metric or old.num_layers == new.num_layers):
            kept_layers = layers_to_keep(old, new, "scores", {}, units.layers)
    plan_ = keep_plan(old, new, units, kept_layers)
    log.info("pruning %s (%s): %s -> %s, order %s", checkpoint, describe_change(old, new),
             f"{old.num_parameters() / 1e6:.1f}M", f"{new.num_parameters() / 1e6:.1f}M", order)

    new_model = _build_pruned(model, old, new, plan_)
    provenance = {"pruned_from": str(checkpoint), "importance": str(importance), "order": order,
                  "layer_metric": layer_metric, "seed": seed, "change": describe_change(old, new),
                  "target": target, "target_params": target_params, "kept": plan_.summary(),
                  "parent_model": old.to_dict()}
    return save_checkpoint(new_model, CheckpointInfo(new, info.dtype, provenance), out_path,
                           tokenizer=load_tokenizer(checkpoint))


def _build_pruned(model, old: ModelDescription, new: ModelDescription, keep) -> torch.nn.Module:
    """Build the new model on this layout and fill it with the kept weights (collective)."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.errors import UsageError
    from nemo_minitron.model.builder import build_model
    from nemo_minitron.model.params import gather, layer_of, named_weights, rename_layer, shard
    from nemo_minitron.prune.transforms import prune_tensor

    per_stage = [sum(1 for i in keep.layers if lo <= i < hi) for lo, hi in _stage_bounds(old.num_layers)]
    if 0 in per_stage:
        raise UsageError(f"pruning would leave pipeline stage {per_stage.index(0)} without layers "
                         f"(kept per stage: {per_stage}); prune with a smaller --pp")
    dtype = next(model.parameters()).dtype
    new_model = build_model(new, dtype=dtype, layers_per_stage=per_stage)
    old_weights = dict(named_weights(model))
    tp_group = ps.get_tensor_model_parallel_group()
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, param in named_weights(new_model):
            new_layer = layer_of(name)
            old_layer = None if new_layer is None else keep.layers[new_layer]
            old_name = name if old_layer is None else rename_layer(name, old_layer)
            full = gather(old_name, old_weights[old_name].detach(), group=tp_group)
            cut = prune_tensor(old_name, full, old, keep, old_layer)
            param.copy_(shard(name, cut, tp_rank, tp_size))
    new_model.eval()
    return new_model
