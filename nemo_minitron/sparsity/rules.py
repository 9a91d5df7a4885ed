"""Which weights to keep, from scores: the mask rules of magnitude and Wanda pruning.

A mask is a bool tensor of the weight's shape, True where the weight stays. Scores are
compared
- N:M: in every group of M consecutive input columns of a row, the N highest stay;
- unstructured: the ``ratio`` lowest go, per output row (Wanda's comparison group) or over
  the whole matrix (magnitude's, as layer-wise magnitude pruning does).
Weights are canonical (TP=1) tensors ``[out, in]``: fused ``linear_qkv`` and
``[gate; up]`` ``linear_fc1`` count as one matrix whose rows are independent.
"""

from __future__ import annotations

import torch

from nemo_minitron.sparsity.config import Pattern


def keep_mask(scores: torch.Tensor, pattern: Pattern, *, per_row: bool) -> torch.Tensor:
    """The mask keeping the highest ``scores`` [out, in] under ``pattern``."""
    rows, cols = scores.shape
    if pattern.is_nm:
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        kept = groups.topk(pattern.n, dim=-1).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, kept, True).reshape(rows, cols)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if per_row:
        pruned = scores.topk(round(pattern.ratio * cols), dim=1, largest=False).indices
        return keep.scatter_(1, pruned, False)
    pruned = scores.flatten().topk(round(pattern.ratio * scores.numel()), largest=False).indices
    keep.view(-1)[pruned] = False
    return keep


def magnitude_mask(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """|W|: per group of M (N:M), or over the whole matrix (unstructured)."""
    return keep_mask(weight.abs().float(), pattern, per_row=False)


def wanda_mask(weight: torch.Tensor, input_sq_sums: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Wanda (Sun et al. 2024): |W_ij| x ||X_j||_2, the input column's norm over every
    calibration token (``input_sq_sums``: sum of squares per input column), compared within
    each output row."""
    scores = weight.abs().double() * input_sq_sums.double().sqrt().unsqueeze(0)
    return keep_mask(scores, pattern, per_row=True)
