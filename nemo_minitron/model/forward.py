"""Forward passes at any TP/PP layout, through megatron-core's pipeline schedules.

Forward steps have Megatron's shape, ``forward_step(data_iterator, model) -> (output,
loss_func)``, and run under ``get_forward_backward_func()``, so the same code serves
PP=1 and PP>1. Results computed on the last pipeline stage are broadcast to the other
stages. The vocabulary's padding rows (``ModelDescription.padded_vocab_size``) are
masked out of every softmax here.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_minitron.runtime.distributed import layout

Batch = dict[str, torch.Tensor]


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Padding columns (global index >= vocab_size) get -inf-like logits on whichever rank holds them."""
    rank = ps.get_tensor_model_parallel_rank()
    local = logits.shape[-1]
    start = rank * local
    if start + local <= vocab_size:
        return logits
    keep = (torch.arange(start, start + local, device=logits.device) < vocab_size)
    return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token CE in fp32 from vocab-parallel logits ``[b, s, V/tp]``; returns ``[b, s]``."""
    logits = mask_padded_vocab(logits.float(), vocab_size)
    # megatron's kernel wants [s, b, V/tp] and targets [s, b]
    return tensor_parallel.vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(),
                                                        labels.transpose(0, 1).contiguous()).transpose(0, 1)


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits from vocab-parallel ones (padding removed)."""
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)[..., :vocab_size]


def _same_shape_runs(microbatches: Sequence[Batch]) -> list[list[Batch]]:
    runs: list[list[Batch]] = []
    for mb in microbatches:
        if runs and runs[-1][0]["tokens"].shape == mb["tokens"].shape:
            runs[-1].append(mb)
        else:
            runs.append([mb])
    return runs


def run_forward_only(model, microbatches: Sequence[Batch], forward_step: Callable) -> list[Any]:
    """Run ``forward_step`` over the micro-batches; returns what the loss functions reported,
    on every rank of this pipeline (broadcast from the last stage). Pipeline schedules need
    one tensor shape per call, so runs of equally shaped micro-batches go separately."""
    reported: list[Any] = []
    for run in _same_shape_runs(microbatches):
        b, s = run[0]["tokens"].shape
        with torch.no_grad():
            reported += get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(run), model=[model],
                num_microbatches=len(run), seq_length=s, micro_batch_size=b, forward_only=True)
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return list(reported)
    box = [list(reported) if ps.is_pipeline_last_stage() else None]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return box[0]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def lm_forward_step(vocab_size: int, device: torch.device | None = None) -> Callable:
    """A Megatron forward step reporting summed token losses and the token count."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if device is not None:
            batch = to_device(batch, device)
        tokens, labels = batch["tokens"], batch["labels"]
        logits = model(tokens, position_ids(tokens), None)

        def loss_func(output: torch.Tensor, non_loss_data: bool = False):
            losses = token_cross_entropy(output, labels, vocab_size)
            total = losses.sum()
            return total, {"loss_sum": total.detach().double(), "tokens": torch.tensor(labels.numel())}

        return logits, loss_func

    return forward_step


def logits_forward_step(vocab_size: int, device: torch.device | None = None) -> Callable:
    """A Megatron forward step reporting full-vocabulary fp32 logits ``[b, s, V]``."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if device is not None:
            batch = to_device(batch, device)
        tokens = batch["tokens"]
        logits = model(tokens, position_ids(tokens), None)

        def loss_func(output: torch.Tensor, non_loss_data: bool = False):
            full = gather_vocab(output.float(), vocab_size).cpu()
            return torch.zeros((), device=output.device), {"logits": full}

        return logits, loss_func

    return forward_step


def full_logits(model, tokens: torch.Tensor, vocab_size: int, micro_batch: int = 1) -> torch.Tensor:
    """fp32 full-vocabulary logits for ``tokens [n, s]`` on every rank (tests, export checks)."""
    device = layout().device
    batches = [{"tokens": tokens[i:i + micro_batch]} for i in range(0, len(tokens), micro_batch)]
    out = run_forward_only(model, batches, logits_forward_step(vocab_size, device))
    return torch.cat([o["logits"] for o in out], dim=0)


def split_microbatches(samples: torch.Tensor, micro_batch: int) -> list[Batch]:
    """``[N, s+1]`` windows -> micro-batches of inputs and next-token labels (last may be smaller)."""
    return [{"tokens": samples[i:i + micro_batch, :-1].contiguous(), "labels": samples[i:i + micro_batch, 1:].contiguous()}
            for i in range(0, len(samples), micro_batch)]
