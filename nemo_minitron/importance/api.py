"""``compute_importance``: calibrate a checkpoint and write its importance directory.

The calibration samples are the first ``samples`` of the data set megatron-core shuffles
by seed (the same samples whatever the parallel layout), split over data-parallel ranks; one forward pass over them scores
every head, query group, neuron and channel, and Block Importance per layer. Then the
first ``layer_samples`` samples score depth by LM loss: each layer skipped in turn,
and each contiguous block of every requested size.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from nemo_minitron.errors import require
from nemo_minitron.importance.collect import AGGREGATIONS, NEURON_ACTIVATIONS, ActivationCollector
from nemo_minitron.importance.scores import ImportanceScores

log = logging.getLogger("nemo_minitron")


def _check_choice(value: str, allowed: Sequence[str], flag: str) -> None:
    require(value in allowed, f"{flag} must be one of {', '.join(allowed)} (got '{value}')")


def calibration_pass(model, samples, *, micro_batch: int, seq_agg: str, batch_agg: str,
                     neuron_activation: str, num_layers: int, progress: bool = True) -> dict[str, torch.Tensor]:
    """Forward over this rank's share of ``samples`` (``[N, s+1]`` or a TokenDataset) with
    the collector's hooks; global scores."""
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from nemo_minitron.data.dataset import data_parallel_slice
    from nemo_minitron.model.forward import run_forward_only, split_microbatches
    from nemo_minitron.runtime.distributed import is_rank0, layout

    mine = data_parallel_slice(samples, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    batches = split_microbatches(mine, micro_batch)
    collector = ActivationCollector(model, seq_agg=seq_agg, neuron_activation=neuron_activation)
    device = layout().device
    # Pipelines need several micro-batches in flight; with one stage, tick per micro-batch.
    chunk = max(1, 2 * ps.get_pipeline_model_parallel_world_size())
    bar = tqdm(total=len(batches) * ps.get_data_parallel_world_size(), desc="calibration", unit="batch",
               disable=not (progress and is_rank0()), dynamic_ncols=True)
    with collector.active():
        for start in range(0, len(batches), chunk):
            run = batches[start:start + chunk]
            run_forward_only(model, run, _scoring_step(device))
            bar.update(len(run) * ps.get_data_parallel_world_size())
    bar.close()
    scores = collector.finalize(num_layers, batch_agg)
    scores["hidden"] = scores["hidden_per_layer"].sum(dim=0) + scores.pop("final_norm")
    return scores


def _scoring_step(device):
    """A Megatron forward step whose only product is what the hooks record."""
    from nemo_minitron.model.forward import position_ids, to_device

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator), device)
        tokens = batch["tokens"]
        output = model(tokens, position_ids(tokens), None)

        def loss_func(out, non_loss_data=False):
            return torch.zeros((), device=out.device), {}

        return output, loss_func

    return forward_step


def calibration_samples(corpus, tokenizer, *, seq_len: int, samples: int, seed: int,
                        progress: bool = False) -> torch.Tensor:
    """``[samples, seq_len + 1]``: the first samples of the train part, shuffled by ``seed``
    (collective). Asking for more than one pass over the data holds is an error."""
    dataset = corpus.dataset(tokenizer, seq_len=seq_len, seed=seed, part="train", num_samples=samples, exact=True,
                             progress=progress)
    return dataset.take(samples)


def compute_importance(checkpoint: str, data: Sequence[str], out: str, *, samples: int = 1024, seq_len: int = 512,
                       micro_batch: int = 4, batch_agg: str = "l2", seq_agg: str = "mean",
                       neuron_activation: str = "post", layer_samples: int | None = None,
                       drop_blocks: Sequence[int] = (), seed: int = 1234, tp: int = 1, pp: int = 1,
                       dtype: str | torch.dtype | None = None, split: str | None = None,
                       data_cache: str | None = None, progress: bool = True) -> ImportanceScores:
    """Score every prunable unit of ``checkpoint`` on ``data``; write and return the scores."""
    from tqdm import tqdm

    from nemo_minitron.checkpoint.store import check_new_output, load_checkpoint, load_tokenizer, parse_dtype, read_info
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.evaluate import evaluate
    from nemo_minitron.importance.layers import best_contiguous_blocks, layer_loss_drops
    from nemo_minitron.importance.plots import write_plots
    from nemo_minitron.runtime.distributed import check_world_size, init_distributed, is_rank0

    # ---- everything the user gave is checked before any work
    info = read_info(checkpoint)
    desc = info.description
    out_path = check_new_output(out)
    _check_choice(batch_agg, AGGREGATIONS, "--batch-agg")
    _check_choice(seq_agg, AGGREGATIONS, "--seq-agg")
    _check_choice(neuron_activation, NEURON_ACTIVATIONS, "--neuron-activation")
    require(samples >= 1, f"--samples must be >= 1 (got {samples})")
    require(micro_batch >= 1, f"--micro-batch must be >= 1 (got {micro_batch})")
    require(seq_len <= desc.max_position_embeddings,
            f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({desc.max_position_embeddings})")
    layer_samples = samples if layer_samples is None else layer_samples
    require(1 <= layer_samples <= samples, f"--layer-samples must be between 1 and --samples ({samples}), "
                                           f"got {layer_samples}")
    for k in drop_blocks:
        require(1 <= k < desc.num_layers, f"--drop-blocks {k}: a block must hold 1 to {desc.num_layers - 1} layers")
    compute_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    desc.check_layout(tp, pp)
    dp = check_world_size(tp, pp)
    require(samples >= dp, f"--samples {samples} is fewer than the {dp} data-parallel ranks")
    tokenizer = load_tokenizer(checkpoint)
    corpus = check_corpus(data, vocab_size=desc.vocab_size, split=split, cache_dir=data_cache, tokenizer=tokenizer)

    # ---- work
    start = time.time()
    init_distributed(tp, pp, seed)
    calibration = calibration_samples(corpus, tokenizer, seq_len=seq_len, samples=samples, seed=seed,
                                      progress=progress)
    model, info = load_checkpoint(checkpoint, dtype=compute_dtype)
    log.info("importance of %s on %d samples x %d tokens (%s over the sequence, %s over samples)",
             checkpoint, samples, seq_len, seq_agg, batch_agg)
    tensors = calibration_pass(model, calibration, micro_batch=micro_batch, seq_agg=seq_agg, batch_agg=batch_agg,
                               neuron_activation=neuron_activation, num_layers=desc.num_layers, progress=progress)
    tensors["query_groups"] = tensors["heads"].unflatten(1, (desc.num_query_groups, desc.heads_per_group)).sum(-1)

    layer_set = calibration[:layer_samples]
    passes = desc.num_layers + sum(desc.num_layers - k + 1 for k in drop_blocks)
    bar = tqdm(total=passes, desc="layer loss", unit="pass", disable=not (progress and is_rank0()), dynamic_ncols=True)
    full_loss = evaluate(model, desc.vocab_size, layer_set, micro_batch=micro_batch).loss
    drops = layer_loss_drops(model, desc.vocab_size, desc.num_layers, layer_set, micro_batch, full_loss, bar)
    blocks = best_contiguous_blocks(model, desc.vocab_size, desc.num_layers, layer_set, micro_batch, full_loss,
                                    list(drop_blocks), bar)
    bar.close()
    tensors["layer_loss_drop"] = torch.tensor(drops, dtype=torch.float64)
    tensors = {k: v.float().cpu() for k, v in tensors.items()}

    bi, ld = tensors["layer_block_importance"], tensors["layer_loss_drop"]
    summary = {
        "model": desc.fingerprint(),
        "checkpoint": str(checkpoint),
        "settings": {"data": corpus.blend.label, "split": split, "samples": samples, "seq_len": seq_len, "micro_batch": micro_batch,
                     "seq_agg": seq_agg, "batch_agg": batch_agg, "neuron_activation": neuron_activation,
                     "layer_samples": layer_samples, "drop_blocks": list(drop_blocks), "seed": seed,
                     "tp": tp, "pp": pp, "dp": dp, "dtype": str(compute_dtype or info.dtype).replace("torch.", "")},
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
        },
        "wall_seconds": round(time.time() - start, 1),
    }
    scores = ImportanceScores(tensors, summary)
    from nemo_minitron.checkpoint.store import atomic_directory

    with atomic_directory(out_path) as tmp:
        if is_rank0():
            scores.save(tmp)
            summary["plots"] = write_plots(tensors, blocks, tmp)
            scores.save(tmp)
    top = summary["layers"]["ranked_by_loss_drop"][:5]
    log.info("importance written to %s in %.0f s; most important layers by loss drop: %s", out_path,
             summary["wall_seconds"], top)
    return scores
