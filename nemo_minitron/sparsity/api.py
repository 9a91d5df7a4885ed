"""``sparsify``: one-shot N:M or unstructured sparsity masks for a checkpoint's linear layers.

    CKPT --(calibration: magnitude | wanda | sparsegpt)--> CKPT2 (weights zero where masked,
                                                                  masks, provenance.sparsity)

Calibration reads the first ``samples`` samples of ``data`` through the project's data
layer (as ``importance`` does; the same at every layout), split over data-parallel
ranks, and hooks the inputs of the chosen linears (``collect.py``). Each layer's
statistics are summed over the ranks of its pipeline stage; its mask (and SparseGPT's
weight update) is computed on the full TP-gathered weight by one rank of the stage (the
layers of a stage are dealt round-robin over its tensor- and data-parallel ranks), sent
to the others, and sliced back as the weight is sharded.

Sequential calibration (``sequential``, the default for wanda and sparsegpt) follows
both papers: the layers are calibrated one at a time, in order, each on the outputs of
the layers before it as already sparsified, so that later layers make up for the error
of earlier ones (within a layer, its linears share one pass of the layer still dense,
as SparseGPT's reference implementation does). At PP > 1 this is kept exact by making
every step a whole forward pass through megatron-core's pipeline schedule: pass k runs
all stages, only the stage holding layer k records and solves, and the next pass sees
the result. It costs one forward pass over the calibration data per sparsified layer
(ModelOpt's SparseGPT and ``sequential=False`` take one pass of the dense model for all
layers and hold every layer's statistics at once).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from nemo_minitron.checkpoint.store import (
    CheckpointInfo,
    dtype_name,
    load_checkpoint,
    load_tokenizer,
    read_info,
    require_tokenizer,
    save_checkpoint,
)
from nemo_minitron.config import Names, log_settings, to_dict
from nemo_minitron.data.dataset import check_corpus, data_parallel_slice
from nemo_minitron.errors import require
from nemo_minitron.files import check_new_output
from nemo_minitron.importance.api import calibration_samples, hooks_only_step
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.forward import run_forward_only, split_microbatches
from nemo_minitron.model.hybrid import not_yet
from nemo_minitron.model.params import gather, layer_of, named_weights, shard
from nemo_minitron.runtime.config import stage_configs
from nemo_minitron.runtime.distributed import check_world_size, init_distributed, is_rank0, layout
from nemo_minitron.runtime.precision import stored_dtype
from nemo_minitron.runtime.progress import progress_bar
from nemo_minitron.sparsity.collect import InputStatistics, linear_modules
from nemo_minitron.sparsity.config import DECODER_MODULES, MODULES, Pattern, SparsifyConfig, parse_pattern
from nemo_minitron.sparsity.masks import masked_weight_names, set_mask
from nemo_minitron.sparsity.rules import magnitude_mask, wanda_mask
from nemo_minitron.sparsity.sparsegpt import sparsegpt

log = logging.getLogger("nemo_minitron")


def _input_width(desc: ModelDescription, module: str) -> int:
    """Input columns of a module's full (TP=1) weight."""
    return {"qkv": desc.hidden_size, "proj": desc.num_attention_heads * desc.head_dim, "fc1": desc.hidden_size,
            "fc2": desc.ffn_hidden_size, "output": desc.hidden_size}[module]


def target_weights(desc: ModelDescription, cfg: SparsifyConfig, tp: int, names: Names) -> list[str]:
    """The canonical weights to sparsify, in order (layer by layer, then the output layer),
    after checking that the pattern fits each at this tensor-parallel size."""
    not_yet(desc, "sparsify")
    desc.require_uniform("sparsify")
    require(not desc.is_moe, f"{names('modules')}: sparsify handles dense MLPs; this {desc.architecture} model has "
                             "mixture-of-experts layers (not supported yet)")
    pattern = parse_pattern(cfg.pattern, names("pattern"))
    layers = sorted(set(cfg.layers)) if cfg.layers else list(range(desc.num_layers))
    require(layers[-1] < desc.num_layers, f"{names('layers')}: the model has layers 0-{desc.num_layers - 1} "
                                          f"(got {layers[-1]})")
    require("output" not in cfg.modules or not desc.tie_embeddings,
            f"{names('modules')} output: this model ties its output layer to the embedding, which sparsify does "
            "not change")
    for module in cfg.modules:
        width = _input_width(desc, module)
        local = width // tp if module in ("proj", "fc2") else width  # row-parallel layers split their input
        require(not pattern.is_nm or local % pattern.m == 0,
                f"{names('pattern')} {pattern}: {module} has {local} input columns per tensor-parallel rank at "
                f"tensor parallel size {tp} ({width} in all), not a multiple of {pattern.m}")
    if pattern.is_nm and cfg.method == "sparsegpt":
        require(cfg.block_size % pattern.m == 0, f"{names('block_size')} {cfg.block_size} must be a multiple of "
                                                 f"{pattern.m} for {names('pattern')} {pattern}")
    out = [f"decoder.layers.{i}.{MODULES[m]}" for i in layers for m in DECODER_MODULES if m in cfg.modules]
    return out + (["output_layer.weight"] if "output" in cfg.modules else [])


def calibration_groups(targets: list[str], cfg: SparsifyConfig) -> list[list[str]]:
    """The weights sparsified after each calibration pass: one layer per pass (sequential), or
    all after one pass; magnitude needs no pass."""
    if not cfg.needs_data or not cfg.sequential:
        return [targets]
    groups: dict[int | None, list[str]] = {}
    for name in targets:
        groups.setdefault(layer_of(name), []).append(name)
    return list(groups.values())


def _solve(method: str, full: torch.Tensor, stats: torch.Tensor | None, pattern: Pattern,
           cfg: SparsifyConfig) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(new weight or None when the kept weights do not change, keep mask) of one full weight."""
    if method == "magnitude":
        return None, magnitude_mask(full, pattern)
    if method == "wanda":
        return None, wanda_mask(full, stats, pattern)
    return sparsegpt(full, stats, pattern, block_size=cfg.block_size, damp=cfg.damp)


def _real_rows(name: str, full: torch.Tensor, vocab_size: int) -> int:
    """Rows that are weights: the output layer's vocabulary padding rows are not."""
    return vocab_size if name == "output_layer.weight" else full.shape[0]


def _solve_rows(name: str, full: torch.Tensor, stats: torch.Tensor | None, pattern: Pattern, cfg: SparsifyConfig,
                vocab_size: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``_solve`` on the weight's real rows; padding rows (zero) are masked out whole."""
    rows = _real_rows(name, full, vocab_size)
    new, keep = _solve(cfg.method, full[:rows], stats, pattern, cfg)
    if rows < full.shape[0]:
        keep = torch.cat([keep, keep.new_zeros(full.shape[0] - rows, full.shape[1])])
        new = None if new is None else torch.cat([new, new.new_zeros(full.shape[0] - rows, full.shape[1])])
    return new, keep


def _stage_group_ranks() -> tuple[object, list[int]]:
    if not dist.is_initialized():
        return None, [0]
    group = ps.get_tensor_and_data_parallel_group()
    return group, dist.get_process_group_ranks(group)


def sparsify_weights(model, desc: ModelDescription, names: list[str], stats: dict[str, torch.Tensor],
                     pattern: Pattern, cfg: SparsifyConfig) -> dict[str, float]:
    """Mask (and for SparseGPT update) the weights ``names`` this stage holds, in place
    (collective over the stage's ranks); returns each one's fraction of zeros (on the
    rank that computed it)."""
    weights = dict(named_weights(model))
    group, ranks = _stage_group_ranks()
    me = dist.get_rank() if dist.is_initialized() else 0
    tp_group, tp_rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    zeros: dict[str, float] = {}
    for k, name in enumerate(n for n in names if n in weights):
        param = weights[name]
        full = gather(name, param.detach(), group=tp_group, gated=desc.gated)
        owner = ranks[k % len(ranks)]
        if owner == me:
            new, keep = _solve_rows(name, full, stats.get(name), pattern, cfg, desc.vocab_size)
            zeros[name] = 1.0 - keep[:_real_rows(name, full, desc.vocab_size)].float().mean().item()
        else:
            new = torch.empty(full.shape, dtype=torch.float64, device=full.device) if cfg.method == "sparsegpt" \
                else None
            keep = torch.empty(full.shape, dtype=torch.bool, device=full.device)
        if len(ranks) > 1:
            packed = keep.to(torch.uint8)  # gloo broadcasts no bool tensors
            dist.broadcast(packed, src=owner, group=group)
            keep = packed.bool()
            if new is not None:
                dist.broadcast(new, src=owner, group=group)
        with torch.no_grad():
            if new is not None:
                param.copy_(shard(name, new, tp_rank, tp_size, gated=desc.gated).to(param.dtype))
            set_mask(param, shard(name, keep, tp_rank, tp_size, gated=desc.gated))
    return zeros


def _all_zeros(local: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized():
        return local
    parts: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def sparsify(checkpoint: str, out: str, data: Sequence[str] | None = None, config: SparsifyConfig | None = None, *,
             progress: bool = True, names: Names | None = None, data_names: Names | None = None,
             **options) -> Path:
    """Write ``out``, ``checkpoint`` with sparsity masks on its linear layers (collective);
    returns its path.

    ``data``: calibration sources (wanda, sparsegpt; magnitude reads none). ``config``: a
    SparsifyConfig (defaults if None); ``options``: any of its fields (``pattern`` "2:4" or
    "unstructured:0.5", ``method``, ``modules``, ``layers``, ``samples``, ``seq_len``,
    ``sequential``, ...), or ``tp``, ``pp``, ``seed``, ``dtype`` (of the saved checkpoint;
    default: the source's), ``split``, ``cache_dir``."""
    # ---- everything the user gave is checked before any work
    configs = stage_configs(SparsifyConfig, config, options, names, data_names)
    cfg, run_cfg, data_opts, names, data_names = configs.stage, configs.run, configs.data, configs.names, \
        configs.data_names
    tp, pp, seed = configs.parallel.tp, configs.parallel.pp, run_cfg.seed
    info = read_info(checkpoint)
    desc = info.description
    targets = target_weights(desc, cfg, tp, names)
    pattern = parse_pattern(cfg.pattern, names("pattern"))
    existing = info.provenance.get("sparsity")
    require(not masked_weight_names(info.provenance),
            f"'{checkpoint}' is already sparse ({existing and existing.get('pattern')} by "
            f"{existing and existing.get('method')}); sparsify the dense model it came from")
    require_tokenizer(checkpoint, "the sparse checkpoint carries it")
    out_path = check_new_output(out)
    compute_dtype = stored_dtype(run_cfg.dtype, names("dtype"))  # auto: as stored (the masks are of its weights)
    desc.check_layout(tp, pp)
    dp = check_world_size(tp, pp)
    tokenizer = load_tokenizer(checkpoint)
    corpus = None
    if cfg.needs_data:
        require(bool(data), f"--data is required by {names('method')} {cfg.method} (calibration)")
        require(cfg.seq_len <= desc.max_position_embeddings,
                f"{names('seq_len')} {cfg.seq_len} exceeds the model's max_position_embeddings "
                f"({desc.max_position_embeddings})")
        require(cfg.samples >= dp, f"{names('samples')} {cfg.samples} is fewer than the {dp} data-parallel ranks")
        corpus = check_corpus(data, vocab_size=desc.vocab_size, split=data_opts.split, split_flag=data_names("split"),
                              cache_dir=data_opts.cache_dir, cache_flag=data_names("cache_dir"), tokenizer=tokenizer)
    resolved = {"checkpoint": str(checkpoint), "data": corpus.blend.label if corpus else None, "seed": seed,
                "dtype": run_cfg.dtype, **to_dict(data_opts), **to_dict(cfg)}

    # ---- work
    start = time.time()
    init_distributed(tp, pp, seed)
    batches = []
    if corpus is not None:
        samples = calibration_samples(corpus, tokenizer, seq_len=cfg.seq_len, samples=cfg.samples, seed=seed,
                                      progress=progress, samples_flag=names("samples"))
        mine = data_parallel_slice(samples, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        batches = split_microbatches(mine, cfg.micro_batch)
    model, info = load_checkpoint(checkpoint, dtype=compute_dtype)
    groups = calibration_groups(targets, cfg)
    if is_rank0():
        passes = f", {len(groups)} calibration passes of {cfg.samples} x {cfg.seq_len} tokens" if cfg.needs_data else ""
        log_settings(log, f"sparsify {checkpoint}: {pattern} by {cfg.method} on {len(targets)} weights "
                          f"({', '.join(cfg.modules)}){passes}", resolved,
                     f"{out_path}/nemo_minitron.json (provenance.sparsity.config)")
    zeros: dict[str, float] = {}
    timings = {"calibration_seconds": 0.0, "solve_seconds": 0.0}
    bar = progress_bar(len(groups), "sparsify", progress, unit="pass" if cfg.needs_data else "step")
    for group in groups:
        t0 = time.time()
        stats: dict[str, torch.Tensor] = {}
        if cfg.needs_data:
            collector = InputStatistics(model, linear_modules(model, set(group)),
                                        "hessian" if cfg.method == "sparsegpt" else "norms")
            with collector.active():
                run_forward_only(model, batches, hooks_only_step(layout().device))
            stats = collector.reduce()
        t1 = time.time()
        zeros.update(sparsify_weights(model, desc, group, stats, pattern, cfg))
        timings["calibration_seconds"] += t1 - t0
        timings["solve_seconds"] += time.time() - t1
        bar.update(1)
    bar.close()
    zeros = _all_zeros(zeros)
    sizes = {name: _numel(desc, name) for name in targets}
    zero_count = sum(zeros[n] * sizes[n] for n in targets)
    record = {"pattern": str(pattern), "method": cfg.method, "modules": list(cfg.modules),
              "layers": sorted({layer_of(n) for n in targets} - {None}), "sequential": cfg.sequential,
              "sparsified_from": str(checkpoint), "data": resolved["data"], "config": resolved,
              "weights": {n: round(zeros[n], 6) for n in targets},
              "masked_parameters": sum(sizes.values()), "zero_parameters": int(round(zero_count)),
              "model_sparsity": zero_count / desc.num_parameters(),
              "layout": {"tp": tp, "pp": pp, "dp": dp}, **{k: round(v, 2) for k, v in timings.items()},
              "wall_seconds": round(time.time() - start, 1)}
    kept = {k: v for k, v in info.provenance.items() if k != "created"}
    saved_dtype = dtype_name(compute_dtype) if compute_dtype is not None else info.dtype
    path = save_checkpoint(model, CheckpointInfo(desc, saved_dtype, {**kept, "sparsity": record}),
                           out_path, tokenizer=tokenizer)
    log.info("sparsify done in %.0f s: %d of %d parameters of %d weights zero (%.1f%% of the model)",
             record["wall_seconds"], record["zero_parameters"], record["masked_parameters"], len(targets),
             100 * record["model_sparsity"])
    return path


def _numel(desc: ModelDescription, name: str) -> int:
    """Parameters of a canonical weight (the output layer without its vocabulary padding)."""
    if name == "output_layer.weight":
        return desc.vocab_size * desc.hidden_size
    module = next(m for m, suffix in MODULES.items() if name.endswith(suffix))
    rows = {"qkv": (desc.num_attention_heads + 2 * desc.num_query_groups) * desc.head_dim,
            "proj": desc.hidden_size, "fc1": desc.ffn_hidden_size * (2 if desc.gated else 1),
            "fc2": desc.hidden_size}[module]
    return rows * _input_width(desc, module)
