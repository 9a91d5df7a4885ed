"""Held-out language-model loss and perplexity, at any TP/PP/DP layout."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from nemo_minitron.data.samples import data_parallel_slice
from nemo_minitron.model.forward import lm_forward_step, run_forward_only, split_microbatches


@dataclasses.dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    samples: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate(model, vocab_size: int, samples: torch.Tensor, micro_batch: int = 1) -> EvalResult:
    """Mean next-token loss over all tokens of ``samples [N, s+1]`` (every rank gets the result)."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.runtime.distributed import layout

    lay = layout()
    mine = data_parallel_slice(samples, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    was_training = model.training
    model.eval()
    reported = run_forward_only(model, split_microbatches(mine, micro_batch), lm_forward_step(vocab_size, lay.device))
    model.train(was_training)
    totals = torch.zeros(2, dtype=torch.float64, device=lay.device)
    for r in reported:
        totals[0] += r["loss_sum"].to(totals)
        totals[1] += float(r["tokens"])
    if dist.is_initialized():
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=int(totals[1].item()),
                      samples=len(samples))
