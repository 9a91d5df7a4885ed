"""``prune``: a checkpoint plus its importance directory -> a smaller checkpoint.

Works on the model as loaded at any TP/PP layout: each weight is gathered over its
tensor-parallel group, cut to the kept units (``transforms.prune_tensor``) and sliced
again for this rank, so no rank ever holds more than one full tensor at a time. Layers
never move between pipeline stages: the new model is built with, on each stage, the
kept layers that stage already holds (megatron's ``pipeline_model_parallel_layout``);
its distributed checkpoint then loads balanced at any layout. Everything the user gave
is checked before the first weight is read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from nemo_minitron.checkpoint.hf_export import fallback_note, hf_config
from nemo_minitron.checkpoint.store import (
    CheckpointInfo,
    dtype_name,
    load_checkpoint,
    load_tokenizer,
    read_info,
    require_tokenizer,
    save_checkpoint,
)
from nemo_minitron.config import Names, cli_names, to_dict
from nemo_minitron.errors import UsageError, require
from nemo_minitron.files import check_new_output
from nemo_minitron.importance.local_distill import TrainedVariants, layer_digests, trained_options
from nemo_minitron.importance.scores import SECOND_MOMENTS_FILE, ImportanceScores
from nemo_minitron.model.builder import balanced_stages, build_model
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.params import expert_of, gather, layer_of, named_weights, rename_expert, rename_layer, shard
from nemo_minitron.model.hybrid import kind_counts, tp_sections
from nemo_minitron.prune.config import PruneConfig
from nemo_minitron.prune.plan import plan
from nemo_minitron.prune.refit import refit_columns
from nemo_minitron.prune.select import (
    LAYER_METRICS,
    UnitScores,
    auto_layer_metric,
    keep_plan,
    layers_to_keep,
    parse_layer_metric,
    random_scores,
)
from nemo_minitron.prune.targets import (
    LAYER_KIND_AXES,
    apply_target,
    canonical_target,
    describe_change,
    parse_drop_layers,
    parse_param_count,
)
from nemo_minitron.prune.per_layer import (PerLayerChoice, budget_of, check_shapes, export_refusal, ffn_scores_key,
                                           per_layer_choice)
from nemo_minitron.prune.transforms import _proj_columns, magnitudes, per_layer_tensor, prune_tensor
from nemo_minitron.prune.variants import BlockVariants, kept_neurons, merged_groups
from nemo_minitron.runtime.config import stage_configs
from nemo_minitron.runtime.distributed import all_ranks_ok, check_world_size, current_device, init_distributed
from nemo_minitron.runtime.precision import stored_dtype

log = logging.getLogger("nemo_minitron")


def planned_target(desc: ModelDescription, cfg: PruneConfig, *, tp: int = 1, pp: int = 1,
                   names: Names | None = None) -> dict[str, int]:
    """The config's explicit target (its depth set by ``drop_layers``), or the target of the
    planner's first candidate for its budget."""
    names = names or cli_names(PruneConfig)
    if cfg.target or cfg.drop_layers:
        return target_with_drops(desc, cfg, names)
    budget = parse_param_count(str(cfg.target_params), flag=names("target_params"))
    return plan(desc, budget, cfg, tp=tp, pp=pp, names=names)[0].target()


def planned_description(desc: ModelDescription, cfg: PruneConfig, *, tp: int = 1, pp: int = 1,
                        names: Names | None = None) -> ModelDescription:
    """The pruned shape for the config's explicit target or budget. A hybrid model's depth
    cut has a provisional pattern until importance picks the layers (``prune.targets``)."""
    names = names or cli_names(PruneConfig)
    return apply_target(desc, planned_target(desc, cfg, tp=tp, pp=pp, names=names), tp=tp, pp=pp,
                        flag=names("target"))


def layer_kinds(desc: ModelDescription, new: ModelDescription, target: dict[str, int]) -> dict[str, int] | None:
    """The layers of each kind a hybrid model's depth cut keeps when the target fixes
    them; None when any kind may go."""
    if not desc.is_hybrid or new.num_layers == desc.num_layers or not any(a in target for a in LAYER_KIND_AXES):
        return None
    return kind_counts(new.hybrid_pattern)


def target_with_drops(desc: ModelDescription, cfg: PruneConfig, names: Names) -> dict[str, int]:
    """The explicit target, its depth set by ``drop_layers`` (1-indexed) when given."""
    target = canonical_target(dict(cfg.target), names("target"))
    if cfg.drop_layers:
        depth = desc.num_layers - len(parse_drop_layers(cfg.drop_layers, desc.num_layers, names("drop_layers")))
        require(target.get("layers", depth) == depth, f"{names('target')} layers={target.get('layers')} disagrees "
                                                      f"with {names('drop_layers')}, which leaves {depth} layers")
        target["layers"] = depth
    return target


def _count_per_stage(kept_layers: list[int], num_layers: int, pp: int) -> list[int]:
    sizes = balanced_stages(num_layers, pp)
    return [sum(1 for i in kept_layers if sum(sizes[:s]) <= i < sum(sizes[:s + 1])) for s in range(pp)]


def kept_layers_per_stage(kept_layers: list[int], num_layers: int, pp: int, hybrid: bool = False) -> list[int]:
    """How many kept layers each pipeline stage of the loaded (balanced) model holds;
    a one-line error when a stage would hold none, or (``hybrid``: megatron-core's
    MambaStack puts the same number on every stage) when stages would differ."""
    per_stage = _count_per_stage(kept_layers, num_layers, pp)
    require(not hybrid or len(set(per_stage)) == 1,
            f"--pp {pp}: the layers kept leave {', '.join(map(str, per_stage))} on the pipeline stages; a hybrid "
            "model's stages hold equal numbers (megatron-core's MambaStack): prune with --pp 1 (the pruned "
            "checkpoint loads at any --pp that divides its layers)")
    if 0 in per_stage:
        empty = per_stage.index(0)
        lo = sum(balanced_stages(num_layers, pp)[:empty])
        hi = lo + balanced_stages(num_layers, pp)[empty]
        workable = next(p for p in range(pp - 1, 0, -1) if 0 not in _count_per_stage(kept_layers, num_layers, p))
        raise UsageError(f"--pp {pp}: pipeline stage {empty} holds layers {lo}..{hi - 1}, all of which are dropped; "
                         f"prune with --pp {workable} (the pruned checkpoint loads at any --pp)")
    return per_stage


def _magnitude_scores(model, desc: ModelDescription) -> UnitScores:
    """Weight-mass scores of every unit, from full (TP-gathered) tensors; collective."""
    L = desc.num_layers
    out = {"hidden": torch.zeros(desc.hidden_size, dtype=torch.float64),
           "ffn": torch.zeros(L, desc.ffn_hidden_size, dtype=torch.float64),
           "heads": torch.zeros(L, desc.num_attention_heads, dtype=torch.float64),
           "query_groups": torch.zeros(L, desc.num_query_groups, dtype=torch.float64),
           "layers": torch.zeros(L, dtype=torch.float64)}
    if desc.is_moe:
        out.update(experts=torch.zeros(L, desc.num_experts, dtype=torch.float64),
                   moe_ffn=torch.zeros(L, desc.num_experts, desc.moe_ffn_hidden_size, dtype=torch.float64),
                   shared_ffn=torch.zeros(L, desc.moe_shared_ffn_hidden_size, dtype=torch.float64))
    if desc.is_hybrid:
        out.update(mamba_heads=torch.zeros(L, desc.mamba_num_heads, dtype=torch.float64),
                   mamba_head_dim=torch.zeros(L, desc.mamba_head_dim, dtype=torch.float64))
    tied_copy = desc.tie_embeddings and not ps.is_pipeline_first_stage()
    for name, param in named_weights(model):
        full = gather(name, param.detach(), group=ps.get_tensor_model_parallel_group(), gated=desc.gated,
                      sections=tp_sections(desc, name)).cpu()
        if name == "output_layer.weight" and tied_copy:
            continue  # the last stage's copy of the tied embedding: counted once, on the first stage
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            full = full[: desc.vocab_size]  # padding rows are not weights of any channel
        layer, expert = layer_of(name), expert_of(name)
        for axis, values in magnitudes(name, full, desc).items():
            if axis == "hidden":
                out["hidden"] += values
            elif axis == "expert":  # an expert's own tensor: its mass, and its neurons'
                out["experts"][layer, expert] += values
            elif axis == "moe_ffn":
                out["moe_ffn"][layer, expert] += values
            else:
                out[axis][layer] += values
        if layer is not None:
            out["layers"][layer] += full.double().square().sum()
    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        for key, value in out.items():  # every stage adds what it holds
            moved = value.to(current_device())
            dist.all_reduce(moved, group=ps.get_pipeline_model_parallel_group())
            out[key] = moved.cpu()
    return UnitScores(**out)


def prune(checkpoint: str, importance: str, out: str, config: PruneConfig | None = None, *,
          names: Names | None = None, layer_choice: PerLayerChoice | None = None, **options) -> Path:
    """Write the pruned checkpoint ``out`` (collective over all ranks); returns its path.

    ``checkpoint``: a project checkpoint, or a Megatron-LM / Megatron-Bridge / NeMo 2 one.
    ``config``: a PruneConfig (``target`` {axis: size} for any of hidden, ffn, heads,
    query_groups, layers (or ModelOpt's names), and/or ``drop_layers`` (1-indexed, as
    ModelOpt and NeMo number them), or ``target_params`` a budget such as "90M"; ``order``
    importance | magnitude | random; ``layer_metric`` auto | greedy | best | contiguous | loss |
    block | "3,7,9" (0-indexed); ``refit``: least-squares refit of the layers reading removed
    heads and neurons, from the importance run's second moments, see refit.py; with
    ``per_layer``, each narrowed MLP's second linear for its own kept neurons);
    ``options``: any of its fields, or ``tp``, ``pp``, ``seed``, ``dtype`` (of the saved
    checkpoint; auto, the default: the source's); ``layer_choice``: with ``per_layer``, prune
    to this choice (made under the same budget, e.g. a search's alternative) instead of the
    budget's optimum."""
    configs = stage_configs(PruneConfig, config, options, names, data=False)
    cfg, run_cfg, names = configs.stage, configs.run, configs.names
    tp, pp = configs.parallel.tp, configs.parallel.pp
    seed, dtype, order, layer_metric = run_cfg.seed, run_cfg.dtype, cfg.order, cfg.layer_metric

    if cfg.per_layer:
        return _prune_per_layer(checkpoint, importance, out, cfg, names, tp=tp, pp=pp, seed=seed, dtype=dtype,
                                choice=layer_choice)
    require(layer_choice is None, f"a per-layer choice needs {names('per_layer')}")

    # ---- validate everything before any weight is read
    info = read_info(checkpoint)
    old = info.description
    require_tokenizer(checkpoint, "the pruned checkpoint carries it")
    if cfg.drop_layers:  # 1-indexed (ModelOpt, NeMo) -> the explicit 0-indexed list

        layer_metric = ",".join(map(str, parse_drop_layers(cfg.drop_layers, old.num_layers, names("drop_layers"))))
    parse_layer_metric(layer_metric, old.num_layers, flag=names("layer_metric"))
    compute_dtype = stored_dtype(dtype, names("dtype"))  # auto: as stored (pruning copies weights)
    scores = ImportanceScores.load(importance)
    scores.check_matches(old)
    refit = resolve_refit(cfg.refit, old, importance, scores, names, per_layer=False, order=order)
    grams = _second_moments(importance, scores, names) if refit else None
    out_path = check_new_output(out)
    old.check_layout(tp, pp)
    target = planned_target(old, cfg, tp=tp, pp=pp, names=names)
    new = apply_target(old, target, tp=tp, pp=pp, flag=names("target"))
    kinds = layer_kinds(old, new, target)
    exported_as = fallback_note(new, hf_config(new, torch.float32, names("target")))  # a shape transformers holds
    # Layers: by --layer-metric with importance scores, or an explicit list whatever the order;
    # the baselines otherwise choose layers their own way (random: seeded; magnitude: weight
    # mass, known only once the weights are loaded).
    units = random_scores(old, seed) if order == "random" else None
    layers_by_metric = order == "importance" or layer_metric not in LAYER_METRICS or old.num_layers == new.num_layers
    kept_layers = None
    if layers_by_metric:
        kept_layers = layers_to_keep(old, new, layer_metric, scores.summary, scores.tensors,
                                     flag=names("layer_metric"), kinds=kinds)
    elif order == "random":
        kept_layers = layers_to_keep(old, new, "scores", {}, {"scores": units.layers}, kinds=kinds)
    if kept_layers is not None:
        kept_layers_per_stage(kept_layers, old.num_layers, pp, hybrid=old.is_hybrid)
        new = apply_target(old, target, tp=tp, pp=pp, flag=names("target"), kept_layers=kept_layers)
    check_world_size(tp, pp)

    # ---- work
    init_distributed(tp, pp, seed)
    model, info = load_checkpoint(checkpoint, dtype=compute_dtype)
    if order == "importance":
        units = UnitScores(hidden=scores["hidden"], ffn=scores["ffn"], heads=scores["heads"],
                           query_groups=scores["query_groups"], layers=scores["layer_loss_drop"],
                           experts=scores.tensors.get("experts"), moe_ffn=scores.tensors.get("moe_ffn"),
                           shared_ffn=scores.tensors.get("shared_ffn"), mamba_heads=scores.tensors.get("mamba_heads"),
                           mamba_head_dim=scores.tensors.get("mamba_head_dim"))
    elif order == "magnitude":
        units = _magnitude_scores(model, old)
    if kept_layers is None:  # magnitude with a layer drop
        kept_layers = layers_to_keep(old, new, "scores", {}, {"scores": units.layers}, kinds=kinds)
        new = apply_target(old, target, tp=tp, pp=pp, flag=names("target"), kept_layers=kept_layers)
    keep = keep_plan(old, new, units, kept_layers)
    per_stage = kept_layers_per_stage(kept_layers, old.num_layers, pp, hybrid=old.is_hybrid)
    log.info("pruning %s (%s): %.1fM -> %.1fM parameters, order %s", checkpoint, describe_change(old, new),
             old.num_parameters() / 1e6, new.num_parameters() / 1e6, order)
    if exported_as:
        log.info("%s", exported_as)
    dropped = [i for i in range(old.num_layers) if i not in set(kept_layers)]
    if dropped:
        how = f"--order {order}'s layer scores"
        if layers_by_metric and layer_metric not in LAYER_METRICS:
            how = "the list given"
        elif layers_by_metric and layer_metric == "auto":
            how = "--layer-metric auto: {}, as {}".format(*auto_layer_metric(old, new, scores.summary))
        elif layers_by_metric:
            how = f"--layer-metric {layer_metric}"
        log.info("dropping layers %s (numbered from 1 as ModelOpt and NeMo count them, --drop-layers; megatron's "
                 "decoder.layers.%s) by %s", ",".join(str(i + 1) for i in dropped),
                 "{" + ",".join(map(str, dropped)) + "}", how)

    new_model = _build_pruned(model, old, new, keep, per_stage, grams=grams)
    provenance = {"pruned_from": str(checkpoint), "importance": str(importance), "config": to_dict(cfg),
                  "refit": refit, "seed": seed, "change": describe_change(old, new), "kept": keep.summary(),
                  "dropped_layers": {"numbered_from_1": [i + 1 for i in dropped], "numbered_from_0": dropped},
                  "parent_model": old.to_dict()}
    saved_dtype = dtype_name(compute_dtype) if compute_dtype is not None else info.dtype
    return save_checkpoint(new_model, CheckpointInfo(new, saved_dtype, provenance), out_path,
                           tokenizer=load_tokenizer(checkpoint))


def _build_pruned(model, old: ModelDescription, new: ModelDescription, keep, per_stage: list[int],
                  grams: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Build the new model on this layout and fill it with the kept weights (collective).
    ``grams`` ({"proj_gram", "fc2_gram"}: [layers, n, n]): refit the output projection and
    the second MLP linear by least squares for the heads and neurons removed (refit.py)."""
    dtype = next(model.parameters()).dtype
    new_model = build_model(new, dtype=dtype, layers_per_stage=per_stage)
    old_weights = dict(named_weights(model))
    # megatron placed the new layers by the layout; each must be one this stage already holds
    stage = ps.get_pipeline_model_parallel_rank()
    held = {layer_of(n) for n in old_weights} - {None}
    placed = sorted({layer_of(n) for n, _ in named_weights(new_model)} - {None})
    assert placed == list(range(sum(per_stage[:stage]), sum(per_stage[:stage + 1]))), (stage, placed, per_stage)
    assert all(keep.layers[i] in held for i in placed), (stage, placed, keep.layers, sorted(held))

    tp_group = ps.get_tensor_model_parallel_group()
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, param in named_weights(new_model):
            new_layer = layer_of(name)
            old_layer = None if new_layer is None else keep.layers[new_layer]
            old_name = name if old_layer is None else rename_layer(name, old_layer)
            if expert_of(name) is not None:  # the new model's expert e is the e-th kept one
                old_name = rename_expert(old_name, int(keep.experts[old_layer][expert_of(name)]))
            full = gather(old_name, old_weights[old_name].detach(), group=tp_group, gated=old.gated,
                          sections=tp_sections(old, old_name))
            if grams is not None and old_layer is not None:
                full = _refit(old_name, full, old, old_layer, grams, keep.heads[old_layer], keep.ffn[old_layer])
            cut = prune_tensor(old_name, full, old, keep, old_layer)
            param.copy_(shard(name, cut, tp_rank, tp_size, gated=new.gated, sections=tp_sections(new, name)))
    new_model.eval()
    return new_model


def check_refit(old: ModelDescription, importance: str, scores: ImportanceScores, names: Names, *,
                per_layer: bool) -> None:
    """What ``refit`` needs, before any weight is read (one-line errors): a dense model, the
    importance run's second moments and, ``per_layer``, untrained block variants."""
    require(not (old.is_moe or old.is_hybrid), f"{names('refit')} refits dense MLPs and attention; this "
                                               f"{old.architecture} model has "
                                               + ("experts" if old.is_moe else "Mamba layers"))
    # Refused with trained variants (importance --block-distill-steps): every narrowed MLP is then a
    # trained variant, its weights fit to the parent block's output already (through the whole
    # block, not only its last linear) and scored as trained. Refitting them from the parent's
    # second moments would undo that training; refitting only untrained ones refits nothing.
    require(not (per_layer and (scores.summary.get("block_variants") or {}).get("distill")),
            f"{names('refit')} with {names('per_layer')}: --importance '{importance}' holds block variants trained "
            "by importance --block-distill-steps, which replace the pruned weights refit would repair; drop "
            f"{names('refit')} or score untrained variants")
    ImportanceScores.require_second_moments(importance, flag=names("refit"))


def resolve_refit(asked: bool | None, old: ModelDescription, importance: str, scores: ImportanceScores,
                  names: Names, *, per_layer: bool, order: str = "importance") -> bool:
    """Whether a prune refits: as asked (True: what it needs, or a one-line error), or with auto
    (None) wherever it applies and is expected to help, logged either way."""
    if asked is not None:
        if asked:
            require(order == "importance", f"{names('refit')} needs {names('order')} importance (got '{order}')")
            check_refit(old, importance, scores, names, per_layer=per_layer)
        return asked
    tokens = scores.summary.get("tokens") or 0
    widest = max(old.ffn_hidden_size, old.num_attention_heads * old.head_dim)
    why_not = ("the model has experts" if old.is_moe else "the model has Mamba layers" if old.is_hybrid
               else f"{names('order')} {order}" if order != "importance"
               else f"'{importance}' holds no second moments (importance --second-moments)"
               if not (Path(importance) / SECOND_MOMENTS_FILE).is_file()
               else "its block variants are trained (importance --block-distill-steps)"
               if per_layer and (scores.summary.get("block_variants") or {}).get("distill")
               # a fit on fewer tokens than columns is exact on them and may generalise worse than the cut
               else f"its second moments come from {tokens} calibration tokens, fewer than the {widest} columns "
                    "refit solves for" if tokens < widest else None)
    if why_not is None:
        log.info("%s auto: on (least-squares refit from the second moments in '%s')", names("refit"), importance)
    else:
        log.info("%s auto: off: %s", names("refit"), why_not)
    return why_not is None


def _second_moments(importance: str, scores: ImportanceScores, names: Names) -> dict[str, torch.Tensor]:
    """The Gram matrices --refit solves with; a warning when fewer calibration tokens than a
    matrix has columns went into them: the least-squares fit is then (almost) exact on those
    tokens and can leave the model worse elsewhere than the plain cut does."""
    grams = ImportanceScores.load_second_moments(importance, flag=names("refit"))
    tokens = scores.summary.get("tokens")
    width = max(g.shape[-1] for g in grams.values())
    if tokens is not None and tokens < width:
        log.warning("%s: the second moments in '%s' come from %d calibration tokens, fewer than the %d columns "
                    "they refit; the refit fits those tokens and may generalise worse than no refit (run "
                    "importance with --samples x --seq-len >= %d)", names("refit"), importance, tokens, width,
                    width)
    return grams


def _refit(name: str, full: torch.Tensor, old: ModelDescription, old_layer: int, grams: dict[str, torch.Tensor],
           heads: torch.Tensor | None, neurons: torch.Tensor | None) -> torch.Tensor:
    """The full tensor of the parent's layer ``old_layer`` with its input columns for the kept
    ``heads`` / ``neurons`` refit (None: all kept, nothing to refit); the cut follows as usual."""
    if heads is not None and name.endswith("self_attention.linear_proj.weight"):
        columns, gram = _proj_columns(old, heads), grams["proj_gram"][old_layer]
    elif neurons is not None and name.endswith("mlp.linear_fc2.weight"):
        columns, gram = neurons, grams["fc2_gram"][old_layer]
    else:
        return full
    full = full.clone()
    full[:, columns] = refit_columns(full, gram, columns)
    return full


# ---------------------------------------------------------------------- per-layer (Puzzle-style)
def _prune_per_layer(checkpoint: str, importance: str, out: str, cfg: PruneConfig, names: Names, *, tp: int,
                     pp: int, seed: int, dtype, choice: PerLayerChoice | None = None) -> Path:
    """``prune --per-layer``: the checkpoint with each layer's shape chosen under the budget."""
    info = read_info(checkpoint)
    old = info.description
    require_tokenizer(checkpoint, "the pruned checkpoint carries it")
    compute_dtype = stored_dtype(dtype, names("dtype"))
    require(not (old.is_moe or old.is_hybrid) and not old.layer_shapes,
            f"{names('per_layer')} chooses the layers of a uniform dense transformer; this model "
            + ("has experts" if old.is_moe else "has Mamba layers" if old.is_hybrid else "is already per-layer"))
    scores = ImportanceScores.load(importance)
    scores.check_matches(old)
    refit = resolve_refit(cfg.refit, old, importance, scores, names, per_layer=True)
    grams = _second_moments(importance, scores, names) if refit else None
    out_path = check_new_output(out)
    old.check_layout(tp, pp)
    variants, optimum = per_layer_choice(old, scores, cfg, cfg.target_params, names, tp=tp, refit=refit)
    choice = choice or optimum
    budget = budget_of(cfg, cfg.target_params, names)
    new = check_shapes(old, choice, tp, pp)
    refusal = export_refusal(new, names("per_layer"))  # as a uniform prune: only shapes transformers can hold
    require(refusal is None, refusal or "")
    trained = chosen_trained_variants(importance, scores, old, new)
    check_world_size(tp, pp)

    init_distributed(tp, pp, seed)
    model, info = load_checkpoint(checkpoint, dtype=compute_dtype)
    if trained is not None:
        check_trained_parent(model, old, trained, checkpoint, importance)
    log.info("pruning %s per layer: %.1fM -> %.1fM parameters, summed %s score %.4f; query groups per layer %s, "
             "ffn per layer %s", checkpoint, old.num_parameters() / 1e6, new.num_parameters() / 1e6,
             cfg.block_score, choice.score, [s.num_query_groups for s in choice.shapes],
             [s.ffn_hidden_size for s in choice.shapes])
    new_model = _build_per_layer(model, old, new, scores, trained, grams)
    provenance = {"pruned_from": str(checkpoint), "importance": str(importance), "config": to_dict(cfg),
                  "refit": refit, "seed": seed, "change": f"per layer ({cfg.block_score} score {choice.score:.4f})",
                  "per_layer": {"variants": variants.to_dict(), "score": choice.score, "cost": choice.cost,
                                "refit_scores": "_refit_" in ffn_scores_key(scores, cfg.block_score, refit),
                                "budget_text": f"{budget.describe(budget.limit)} {budget.what()}",
                                "layer_scores": list(choice.layer_scores),
                                "trained_variants": None if trained is None else {
                                    "blocks": sorted({".".join(k.split(".")[:4]) for k in trained.tensors}),
                                    **{k: trained.record[k] for k in ("steps", "lr", "samples", "batch")}}},
                  "parent_model": old.to_dict()}
    saved_dtype = dtype_name(compute_dtype) if compute_dtype is not None else info.dtype
    return save_checkpoint(new_model, CheckpointInfo(new, saved_dtype, provenance), out_path,
                           tokenizer=load_tokenizer(checkpoint))


def _build_per_layer(model, old: ModelDescription, new: ModelDescription, scores: ImportanceScores,
                     trained: TrainedVariants | None = None, grams: dict[str, torch.Tensor] | None = None
                     ) -> torch.nn.Module:
    """The per-layer model on this layout, every weight the parent's (transforms.per_layer_tensor):
    the most important neurons of each narrowed MLP, each merged K/V group the mean of its
    run of groups (variants.merged_groups), or the chosen variant's ``trained`` tensors
    (importance --block-distill-steps); collective. ``grams`` (--refit): each narrowed MLP's
    second linear refit for its own kept neurons as a uniform prune refits (``_refit``). No
    attention is refit: merging K/V groups keeps every query head, so the output projection
    loses no input (the format fixes the head count model-wide); a removed block has nothing
    to refit, a block kept whole nothing removed."""
    dtype = next(model.parameters()).dtype
    new_model = build_model(new, dtype=dtype)
    old_weights = dict(named_weights(model))
    tp_group = ps.get_tensor_model_parallel_group()
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, param in named_weights(new_model):
            layer = layer_of(name)
            full = gather(name, old_weights[name].detach(), group=tp_group, gated=old.gated)  # collective: always
            replacement = _trained_tensor(trained, name, new) if trained is not None else None
            if replacement is not None:
                full = replacement.to(param.dtype)
            elif layer is not None:
                shape = new.layer_shapes[layer]
                narrowed = shape.ffn_hidden_size not in (0, old.ffn_hidden_size)
                merged = shape.num_query_groups not in (0, old.num_query_groups)
                neurons = kept_neurons(scores["ffn"][layer], shape.ffn_hidden_size) if narrowed else None
                if grams is not None:  # per-layer models keep their layers: the parent's index is the layer's
                    full = _refit(name, full, old, layer, grams, None, neurons)
                full = per_layer_tensor(
                    name.split(f"decoder.layers.{layer}.", 1)[1], full, old, neurons,
                    merged_groups(scores["query_groups"][layer], shape.num_query_groups) if merged else None)
            param.copy_(shard(name, full, tp_rank, tp_size, gated=new.gated))
    new_model.eval()
    return new_model


def _trained_tensor(trained: TrainedVariants, name: str, new: ModelDescription) -> torch.Tensor | None:
    """The trained tensor of the chosen variant that ``name`` belongs to (None: not trained)."""
    layer = layer_of(name)
    if layer is None:
        return None
    suffix = name.split(f"decoder.layers.{layer}.", 1)[1]
    shape = new.layer_shapes[layer]
    for kind, size in (("attention", shape.num_query_groups), ("ffn", shape.ffn_hidden_size)):
        block = trained.block(layer, kind, size)
        if block is not None and suffix in block:
            return block[suffix]
    return None


def chosen_trained_variants(importance: str, scores: ImportanceScores, old: ModelDescription,
                            new: ModelDescription) -> TrainedVariants | None:
    """The trained tensors (importance --block-distill-steps) of the variants ``new`` chose
    (None when the importance run trained none); before any work."""
    record = scores.summary["block_variants"].get("distill")
    if not record:
        return None
    trained = trained_options(BlockVariants.from_dict(scores.summary["block_variants"]))
    wanted = [(layer, kind, size) for layer, shape in enumerate(new.layer_shapes)
              for kind, size in (("attention", shape.num_query_groups), ("ffn", shape.ffn_hidden_size))
              if size in trained[kind]]
    return TrainedVariants.load(importance, record, wanted) if wanted else None


def check_trained_parent(model, old: ModelDescription, trained: TrainedVariants, checkpoint: str,
                         importance: str) -> None:
    """Refuse (one line, on every rank) trained variants whose parent layers differ from the
    loaded checkpoint's: their digests were taken from the model importance trained them on
    (collective)."""
    recorded = trained.record["parent_digests"]
    layers = {int(k.split(".")[1]) for k in trained.tensors}
    dtype = next(model.parameters()).dtype
    name = str(dtype).removeprefix("torch.")
    if name not in recorded:  # this model is more precise than the one importance ran: compare in that one's
        name = next(iter(recorded))
    tp_group = ps.get_tensor_model_parallel_group()
    held = {layer_of(n) for n, _ in named_weights(model)} & layers
    full = ((n, gather(n, p.detach(), group=tp_group, gated=old.gated)) for n, p in named_weights(model)
            if layer_of(n) in held)
    mine = layer_digests(full, held, [getattr(torch, name)])[name]
    differing = sorted(layer for layer in held if mine[str(layer)] != recorded[name][str(layer)])
    require(all_ranks_ok(not differing),
            f"--importance '{importance}': its trained block variants were trained from other weights than "
            f"'{checkpoint}' holds" + (f" (layer {differing[0]} differs)" if differing else "")
            + "; rerun importance --block-distill-steps on this checkpoint")
