"""Held-out language-model loss and perplexity, at any TP/PP/DP layout."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from nemo_minitron.data.dataset import data_parallel_bounds
from nemo_minitron.model.forward import lm_forward_step, run_forward_only, split_microbatches
from nemo_minitron.runtime.distributed import layout

CHUNK_MICROBATCHES = 32  # micro-batches read and run at a time: memory stays flat in the data size


@dataclasses.dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    samples: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate(model, vocab_size: int, samples, micro_batch: int = 1) -> EvalResult:
    """Mean next-token loss over all tokens of ``samples``, a ``[N, s+1]`` tensor or a
    TokenDataset (read a chunk at a time); every rank gets the result."""
    lay = layout()
    lo, hi = data_parallel_bounds(len(samples), ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    was_training = model.training
    model.eval()
    step = lm_forward_step(vocab_size, lay.device)
    reported = []
    for start in range(lo, hi, CHUNK_MICROBATCHES * micro_batch):
        stop = min(hi, start + CHUNK_MICROBATCHES * micro_batch)
        chunk = samples[start:stop] if isinstance(samples, torch.Tensor) else samples.take(stop - start, start)
        reported += run_forward_only(model, split_microbatches(chunk, micro_batch), step)
    model.train(was_training)
    loss, tokens = mean_token_loss(reported)
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=tokens, samples=len(samples))


def mean_token_loss(reported: list[dict]) -> tuple[float, int]:
    """The mean token loss and the token count of ``lm_forward_step``'s reports, summed in
    float64 in their order, then over data-parallel ranks (every rank gets the result)."""
    totals = torch.zeros(2, dtype=torch.float64, device=layout().device)
    for r in reported:
        totals[0] += r["loss_sum"].to(totals)
        totals[1] += float(r["tokens"])
    if dist.is_initialized():
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
    return (totals[0] / totals[1].clamp(min=1)).item(), int(totals[1].item())
