"""``compute_importance``: calibrate a checkpoint and write its importance directory.

The calibration samples are the first ``samples`` of the data set megatron-core shuffles
by seed (the same samples whatever the parallel layout), split over data-parallel ranks; one forward pass over them scores
every head, query group, neuron and channel, and Block Importance per layer. Then the
first ``layer_samples`` samples score depth by LM loss: each layer skipped in turn,
each contiguous block of every requested size, and (``greedy_layers``) a greedy
elimination down to the largest requested size.

A killed run started again with the same settings resumes: every finished phase, layer-loss
pass, block-variant micro-batch and locally distilled layer is kept in the output's
journal (importance/journal.py) until the output is complete.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import torch
from megatron.core import parallel_state as ps
from safetensors.torch import save_file

from nemo_minitron.checkpoint.store import (
    atomic_directory,
    load_checkpoint,
    load_tokenizer,
    read_info,
)
from nemo_minitron.config import Names, default_of, log_settings, resume_safe_fields, to_dict, yaml_text
from nemo_minitron.data.dataset import check_corpus, data_parallel_slice
from nemo_minitron.errors import require
from nemo_minitron.files import check_new_output
from nemo_minitron.importance.blocks import score_block_variants, variant_passes
from nemo_minitron.importance.collect import ActivationCollector
from nemo_minitron.importance.config import SECOND_MOMENTS_AUTO_BYTES, ImportanceConfig, second_moments_bytes
from nemo_minitron.importance.journal import Journal
from nemo_minitron.importance.layers import (
    SkipLosses,
    best_contiguous_blocks,
    drop_set_losses,
    greedy_drop_order,
    layer_loss_drops,
)
from nemo_minitron.importance.local_distill import TrainedVariants, distill_block_variants, trained_options
from nemo_minitron.importance.plots import write_plots
from nemo_minitron.importance.scores import SECOND_MOMENTS_FILE, ImportanceScores
from nemo_minitron.prune.variants import block_variants
from nemo_minitron.model.forward import position_ids, run_forward_only, split_microbatches, to_device
from nemo_minitron.runtime.config import stage_configs
from nemo_minitron.runtime.distributed import check_world_size, init_distributed, is_rank0, layout
from nemo_minitron.runtime.precision import log_compute_dtype, resolve_dtype
from nemo_minitron.runtime.progress import progress_bar

log = logging.getLogger("nemo_minitron")


def calibration_pass(model, samples, *, micro_batch: int, seq_agg: str, batch_agg: str,
                     neuron_activation: str, num_layers: int,
                     head_score: str = default_of(ImportanceConfig, "head_score"),
                     channel_norms: str = default_of(ImportanceConfig, "channel_norms"),
                     mamba_activation: str = default_of(ImportanceConfig, "mamba_activation"),
                     second_moments: bool = False, progress: bool = True,
                     layer_pass_tokens: int = 0) -> dict[str, torch.Tensor]:
    """Forward over this rank's share of ``samples`` (``[N, s+1]`` or a TokenDataset) with the
    collector's hooks; global scores (``final_norm`` [hidden] is the final norm's own channel
    term, included in ``hidden`` only with ``channel_norms="layers+final"``; ``second_moments``
    adds the Gram matrices). After the first batches, logs the estimated time of the whole
    stage (``layer_pass_tokens``: the tokens the loss-drop passes will cost afterwards)."""
    mine = data_parallel_slice(samples, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    batches = split_microbatches(mine, micro_batch)
    collector = ActivationCollector(model, seq_agg=seq_agg, neuron_activation=neuron_activation,
                                    head_score=head_score, second_moments=second_moments,
                                    mamba_activation=mamba_activation)
    device = layout().device
    # Pipelines need several micro-batches in flight; with one stage, tick per micro-batch.
    chunk = max(1, 2 * ps.get_pipeline_model_parallel_world_size())
    bar = progress_bar(len(batches) * ps.get_data_parallel_world_size(), "calibration", progress, unit="batch")
    with collector.active():
        for start in range(0, len(batches), chunk):
            t0 = time.time()
            run = batches[start:start + chunk]
            run_forward_only(model, run, hooks_only_step(device))
            bar.update(len(run) * ps.get_data_parallel_world_size())
            if start == 0 and len(batches) > chunk:
                per_token = (time.time() - t0) / sum(b["tokens"].numel() for b in run)
                _log_estimate(per_token, sum(b["tokens"].numel() for b in batches[chunk:]),
                              layer_pass_tokens // ps.get_data_parallel_world_size())
    bar.close()
    scores = collector.finalize(num_layers, batch_agg)
    scores["hidden"] = hidden_scores(scores, channel_norms)
    return scores


def hidden_scores(scores: dict[str, torch.Tensor], channel_norms: str) -> torch.Tensor:
    """Embedding-channel scores: the per-layer norm terms, plus the final norm's if asked."""
    hidden = scores["hidden_per_layer"].sum(dim=0)
    return hidden + scores["final_norm"] if channel_norms == "layers+final" else hidden


def _log_estimate(seconds_per_token: float, calibration_tokens: int, layer_tokens: int) -> None:
    def fmt(seconds: float) -> str:
        return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 \
            else f"{seconds:.0f} s"

    calib, layers = seconds_per_token * calibration_tokens, seconds_per_token * layer_tokens
    log.info("estimated time from the first batch: calibration %s more, layer loss drops at most %s (lower --samples, "
             "--layer-samples or --drop-blocks to shorten)", fmt(calib), fmt(layers))


def hooks_only_step(device):
    """A Megatron forward step whose only product is what the hooks record."""
    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator), device)
        tokens = batch["tokens"]
        output = model(tokens, position_ids(tokens), None)

        def loss_func(out, non_loss_data=False):
            return torch.zeros((), device=out.device), {}

        return output, loss_func

    return forward_step


def _score_blocks(model, desc, calibration: torch.Tensor, variants, tensors: dict, cfg: ImportanceConfig,
                  progress: bool, fc2_grams: torch.Tensor | None, names: Names,
                  journal: Journal) -> tuple[dict, TrainedVariants | None]:
    """Add the block-variant scores (importance/blocks.py) to ``tensors``, the variants first
    trained by local distillation with ``cfg.block_distill_steps`` (importance/local_distill.py);
    their summary and the trained variants. ``fc2_grams`` (--second-moments): the untrained
    MLP widths are scored refit as well (trained ones replace the weights refit repairs).
    ``journal``: each trained layer and each scored micro-batch is kept there, and what a
    killed run kept is not done again."""
    trained = None
    if cfg.block_distill_steps:
        start, stop = cfg.block_distill_range()
        count = sum(map(len, trained_options(variants).values()))
        bar = progress_bar(count * desc.num_layers // ps.get_data_parallel_world_size(), "block distillation",
                           progress, unit="variant")
        trained = distill_block_variants(model, desc, calibration[start:stop], variants, tensors["ffn"],
                                         tensors["query_groups"], steps=cfg.block_distill_steps,
                                         lr=cfg.block_distill_lr, batch=cfg.block_distill_batch, progress=bar,
                                         finished=lambda i: journal.load_tensors(f"distilled-layer{i}.safetensors",
                                                                                 layout().device),
                                         on_layer=lambda i, t: journal.save_tensors(
                                             f"distilled-layer{i}.safetensors", t, every_rank_calls=False))
        bar.close()
        log.info("block variants trained by local distillation in %.0f s (%d steps on %d samples, lr %g)",
                 trained.record["seconds"], cfg.block_distill_steps, stop - start, cfg.block_distill_lr)
    samples = calibration[:min(cfg.block_samples, cfg.samples)]
    # a refit is scored on samples left out of its second moments (importance/blocks.py): none left, no refit scores
    refit_grams = fc2_grams if trained is None and len(samples) < len(calibration) else None
    if fc2_grams is not None and trained is None and refit_grams is None:
        log.warning("%s %s: no refit scores of the MLP widths, as the block variants are scored on all %d "
                    "calibration samples and a refit is scored on samples outside its second moments (lower %s)",
                    names("block_variants"), names("second_moments"), len(samples), names("block_samples"))
    t0 = time.time()
    micro_batches = -(-len(samples) // ps.get_data_parallel_world_size() // cfg.micro_batch)
    passes = variant_passes(desc, variants, refit=refit_grams is not None)
    bar = progress_bar(passes * micro_batches, "block variants", progress, unit="variant")
    # the sums after each micro-batch are this rank's own, for this micro-batch size and DP size only
    state = f"blocks-dp{ps.get_data_parallel_rank()}of{ps.get_data_parallel_world_size()}-mb{cfg.micro_batch}.pt"
    tensors.update(score_block_variants(model, desc, samples, variants, tensors["ffn"], tensors["query_groups"],
                                        cfg.micro_batch, bar, trained=trained, fc2_grams=refit_grams,
                                        done=journal.load_object(state),
                                        on_batch=lambda sums: journal.save_object(state, sums)))
    bar.close()
    seconds = time.time() - t0
    log.info("block variants scored in %.0f s (%d layers x %d options%s on %d samples)", seconds, desc.num_layers,
             passes // desc.num_layers, ", the MLP widths also refit" if refit_grams is not None else "",
             len(samples))
    summary = {**variants.to_dict(), "samples": len(samples), "tokens": len(samples) * (samples.shape[1] - 1),
               "seconds": round(seconds, 1), "refit_scores": refit_grams is not None}
    if trained is not None:
        summary["distill"] = trained.record
    return summary, trained


def calibration_samples(corpus, tokenizer, *, seq_len: int, samples: int, seed: int, progress: bool = False,
                        samples_flag: str = "--samples") -> torch.Tensor:
    """``[samples, seq_len + 1]``: the first samples of the train part, shuffled by ``seed``
    (collective). Asking for more than one pass over the data holds is an error."""
    dataset = corpus.dataset(tokenizer, seq_len=seq_len, seed=seed, part="train", num_samples=samples, exact=True,
                             samples_flag=samples_flag, progress=progress)
    return dataset.take(samples)


def _second_moments_wanted(asked: bool | None, desc, pp: int, names: Names) -> bool:
    """Whether the run collects the Gram matrices: as asked (a one-line error for a model refit
    cannot use), or with auto (None) for a dense model whose matrices fit SECOND_MOMENTS_AUTO_BYTES."""
    unusable = "experts" if desc.is_moe else "Mamba layers" if desc.is_hybrid else None
    require(not (asked and unusable), f"{names('second_moments')} (for prune --refit) is for dense MLPs and "
                                      f"attention; this {desc.architecture} model has {unusable}")
    if asked is not None:
        return asked
    size = second_moments_bytes(desc, pp)
    if unusable is None and size <= SECOND_MOMENTS_AUTO_BYTES:
        log.info("%s auto: on (%.2f GiB of Gram matrices on each rank, for prune's refit)",
                 names("second_moments"), size / 2**30)
        return True
    log.info("%s auto: off (%s); prune will not refit", names("second_moments"),
             f"the model has {unusable}" if unusable else
             f"the Gram matrices would take {size / 2**30:.1f} GiB on each rank, over the "
             f"{SECOND_MOMENTS_AUTO_BYTES / 2**30:.0f} GiB auto collects; {names('second_moments')} collects them anyway")
    return False


def compute_importance(checkpoint: str, data: Sequence[str], out: str, config: ImportanceConfig | None = None, *,
                       progress: bool = True, names: Names | None = None, data_names: Names | None = None,
                       **options) -> ImportanceScores:
    """Score every prunable unit of ``checkpoint`` on ``data``; write and return the scores.

    ``config``: an ImportanceConfig (defaults if None); ``options``: any of its fields, or
    ``tp``, ``pp``, ``seed``, ``dtype``, ``split``, ``cache_dir``, overriding it."""
    # ---- everything the user gave is checked before any work
    configs = stage_configs(ImportanceConfig, config, options, names, data_names)
    cfg, run_cfg, data_opts, names, data_names = configs.stage, configs.run, configs.data, configs.names, \
        configs.data_names
    tp, pp, seed = configs.parallel.tp, configs.parallel.pp, run_cfg.seed
    samples, seq_len, micro_batch = cfg.samples, cfg.seq_len, cfg.micro_batch
    info = read_info(checkpoint)
    desc = info.description
    desc.require_uniform("importance")
    out_path = check_new_output(out)
    require(seq_len <= desc.max_position_embeddings,
            f"{names('seq_len')} {seq_len} exceeds the model's max_position_embeddings "
            f"({desc.max_position_embeddings})")
    layer_samples = cfg.layer_sample_count()
    if cfg.block_variants:
        require(tp == 1 and pp == 1, f"{names('block_variants')} scores at --tp 1 --pp 1 (got --tp {tp} --pp {pp}); "
                                     "data parallel ranks share the samples")
        variants = block_variants(desc, cfg.ffn_variants, cfg.ffn_multiple)
    for k in cfg.drop_blocks:
        require(1 <= k < desc.num_layers, f"{names('drop_blocks')} {k}: a block must hold 1 to "
                                          f"{desc.num_layers - 1} layers")
    second_moments = _second_moments_wanted(cfg.second_moments, desc, pp, names)
    dtype = resolve_dtype(run_cfg.dtype, names("dtype"))
    desc.check_layout(tp, pp)
    dp = check_world_size(tp, pp)
    require(samples >= dp, f"{names('samples')} {samples} is fewer than the {dp} data-parallel ranks")
    tokenizer = load_tokenizer(checkpoint)
    corpus = check_corpus(data, vocab_size=desc.vocab_size, split=data_opts.split, split_flag=data_names("split"),
                          cache_dir=data_opts.cache_dir, cache_flag=data_names("cache_dir"), tokenizer=tokenizer,
                          parts=("train",))
    resolved = {"checkpoint": str(checkpoint), "data": corpus.blend.label, "seed": seed, "dtype": dtype.name,
                **to_dict(data_opts), **to_dict(cfg)}

    # ---- work
    start = time.time()
    init_distributed(tp, pp, seed)
    journal = Journal.open(out_path, resolved, ignore=resume_safe_fields(ImportanceConfig))
    calibration = calibration_samples(corpus, tokenizer, seq_len=seq_len, samples=samples, seed=seed,
                                      progress=progress, samples_flag=names("samples"))
    model, info = load_checkpoint(checkpoint, dtype=dtype.torch)
    log_compute_dtype(dtype)
    passes = cfg.layer_passes(desc.num_layers)
    if is_rank0():
        log_settings(log, f"importance of {checkpoint} on {samples} samples x {seq_len} tokens of {corpus.blend.label} "
                          f"({cfg.seq_agg} over the sequence, {cfg.batch_agg} over samples); layer loss drops on "
                          f"{layer_samples} of them ({passes} passes)", resolved, f"{out_path}/config.yaml")
    calibrated = journal.load_json("calibration.json")
    calibration_kept = calibrated is not None
    if not calibration_kept:
        calibration_start = time.time()
        tensors = calibration_pass(model, calibration, micro_batch=micro_batch, seq_agg=cfg.seq_agg,
                                   batch_agg=cfg.batch_agg, neuron_activation=cfg.neuron_activation,
                                   num_layers=desc.num_layers, head_score=cfg.head_score,
                                   channel_norms=cfg.channel_norms, mamba_activation=cfg.mamba_activation,
                                   second_moments=second_moments, progress=progress,
                                   layer_pass_tokens=passes * layer_samples * seq_len)
        calibrated = {"seconds": round(time.time() - calibration_start, 1)}
        tensors.update({k: tensors[k].float() for k in ("proj_gram", "fc2_gram") if k in tensors})
        journal.save_tensors("calibration.safetensors", tensors)
        journal.save_json("calibration.json", calibrated)
    else:
        tensors = journal.load_tensors("calibration.safetensors", layout().device)
    grams = {k: tensors.pop(k).cpu() for k in ("proj_gram", "fc2_gram") if k in tensors}
    tensors["query_groups"] = tensors["heads"].unflatten(1, (desc.num_query_groups, desc.heads_per_group)).sum(-1)

    known = journal.load_json("layer_losses.json") or {}
    if journal.resumed:
        log.info("resuming the unfinished run in '%s': calibration pass %s, %d layer-loss passes kept",
                 journal.directory, "kept" if calibration_kept else "to do", len(known))
    losses = SkipLosses(model, desc.vocab_size, calibration[:layer_samples], micro_batch, known=known,
                        on_measure=lambda measured: journal.save_json("layer_losses.json", measured))
    bar = progress_bar(passes, "layer loss", progress, unit="pass")
    full_loss = losses()
    drops = layer_loss_drops(losses, desc.num_layers, bar)
    blocks = best_contiguous_blocks(losses, desc.num_layers, list(cfg.drop_blocks), bar)
    greedy_steps = max(cfg.drop_blocks) if cfg.greedy_layers and cfg.drop_blocks else 0
    greedy = greedy_drop_order(losses, desc.num_layers, greedy_steps, bar)
    drop_sets = drop_set_losses(losses, blocks, drops, tensors["layer_block_importance"].tolist(), greedy, bar)
    bar.close()
    blocks_summary = trained = None
    if cfg.block_variants:
        blocks_summary, trained = _score_blocks(model, desc, calibration, variants, tensors, cfg, progress,
                                                grams.get("fc2_gram"), names, journal)
        blocks_summary["calibration_seconds"] = calibrated["seconds"]
    tensors["layer_loss_drop"] = torch.tensor(drops, dtype=torch.float64)
    tensors = {k: v.float().cpu() for k, v in tensors.items()}

    bi, ld = tensors["layer_block_importance"], tensors["layer_loss_drop"]
    summary = {
        "model": desc.fingerprint(),
        "checkpoint": str(checkpoint),
        "config": resolved,
        "layout": {"tp": tp, "pp": pp, "dp": dp, "dtype": dtype.name,
                   "dtype_reason": dtype.describe()},
        "samples": samples,
        "tokens": samples * seq_len,
        "layer_tokens": layer_samples * seq_len,
        "full_loss": full_loss,
        "layers": {
            "ranked_by_loss_drop": sorted(range(desc.num_layers), key=lambda i: -ld[i].item()),
            "ranked_by_block_importance": sorted(range(desc.num_layers), key=lambda i: -bi[i].item()),
            "loss_drop": ld.tolist(),
            "block_importance": bi.tolist(),
            "contiguous_blocks": blocks,
            "greedy": {"order": [e["layer"] for e in greedy], "loss": [e["loss"] for e in greedy],
                       "candidates": [e["candidates"] for e in greedy]},
            "drop_sets": drop_sets,
        },
        "wall_seconds": round(time.time() - start, 1),
    }
    if blocks_summary is not None:
        summary["block_variants"] = blocks_summary
    scores = ImportanceScores(tensors, summary)

    with atomic_directory(out_path) as tmp:
        if is_rank0():
            scores.save(tmp)
            summary["plots"] = write_plots(tensors, blocks, tmp)
            scores.save(tmp)
            (tmp / "config.yaml").write_text(yaml_text(resolved))
            if grams:
                save_file(grams, str(tmp / SECOND_MOMENTS_FILE))
            if trained is not None:
                trained.save(tmp)
    journal.remove()
    top = summary["layers"]["ranked_by_loss_drop"][:5]
    log.info("importance written to %s in %.0f s; most important layers by loss drop: %s", out_path,
             summary["wall_seconds"], top)
    return scores
