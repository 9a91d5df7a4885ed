"""Tolerances for comparing two floating-point computations of the same quantity, derived
from the arithmetic rather than from what passed on one machine.

float32 rounds each operation to within u = 2^-24 (relative). A float32 accumulation of n
terms whose magnitudes are at most M is within about sqrt(n) * u * M of the exact result
with overwhelming probability (Higham and Mary, "A new approach to probabilistic rounding
error analysis", SIAM J. Sci. Comput. 2019), n * u * M in the worst case. Two
implementations that accumulate in different orders (another library, another tensor or
pipeline split, another thread count) each carry such an error; SAFETY covers the
constant of the bound and the sum of the two errors. Each helper below names the
accumulation it bounds; tests say which one applies and why.
"""

from __future__ import annotations

import math

import torch

U32 = 2.0 ** -24    # float32 unit roundoff
U_BF16 = 2.0 ** -8  # bfloat16 unit roundoff (8 significant bits)
U16 = 2.0 ** -11    # float16 unit roundoff (11 significant bits)
SAFETY = 8.0


def fp32(n_terms: int, magnitude: float) -> float:
    """Two float32 evaluations of one accumulation of ``n_terms`` terms of size ``magnitude``."""
    return SAFETY * math.sqrt(n_terms) * U32 * magnitude


def transformer_logits(width: int, layers: int, reference: torch.Tensor) -> float:
    """Two float32 forward passes of the same transformer (another library, TP/PP layout or
    thread count): every matrix product accumulates over at most ``width`` terms, and the
    layers' errors add up along the residual stream, so the logits come out of about
    width * (2 * layers + 1) accumulated products (attention and MLP of every layer, the
    output layer); relative to the largest logit."""
    return fp32(width * (2 * layers + 1), reference.abs().max().item())


def log_softmax_sum(vocab: int, max_abs_logit: float) -> float:
    """A float32 log-sum-exp over ``vocab`` logits: the sum of exponentials (terms <= 1 after
    the max shift) has a relative error of sqrt(V) u, i.e. an absolute error of sqrt(V) u in
    its log, plus the rounding of adding back the max (u * |max|). KL and cross-entropy
    per token are differences of such terms and of a ``vocab``-term dot product of the
    same size."""
    return SAFETY * U32 * (math.sqrt(vocab) + math.log(vocab) + max_abs_logit)


def fp16_same_ops(layers: int, magnitude: float) -> float:
    """Two float16 evaluations of the same operations that differ only in where a few terms
    join a sum (another pipeline split: a stage's incoming gradient added to a local loss's):
    the difference starts at one float16 rounding (u16) and passes through the
    ``2 * layers + 1`` products of the backward pass, each rounding to float16 again."""
    return SAFETY * (2 * layers + 1) * U16 * magnitude


U64 = 2.0 ** -53    # float64 unit roundoff


def fp64_solve(n: int, condition: float, magnitude: float) -> float:
    """Two float64 solutions of one n x n symmetric positive definite system (another
    factorisation or elimination order): backward stable, so each is within about
    n * u64 * cond of the exact one (Higham, "Accuracy and Stability of Numerical
    Algorithms", ch. 10), relative to ``magnitude``."""
    return SAFETY * n * condition * U64 * magnitude
