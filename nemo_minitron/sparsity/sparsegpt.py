"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", ICML 2023): one-shot masks and weight updates from a layer's Hessian.

For a linear layer with weight W [out, in] and calibration inputs X [in, tokens], the
layer-wise objective ||W X - W' X||^2 has the Hessian H = 2 X X^T (the same for every
row). Its columns are processed left to right: when column j is fixed (its pruned
weights set to zero), the error it leaves is spread over the columns not yet fixed with
the optimal brain surgeon update, read off the upper Cholesky factor U of H^-1:

    err = (w_j - q_j) / U_jj,    W[:, j:] -= err  U[j, j:]

(U's row j is the row of the inverse Hessian of the columns j.. as they stand then, so
one factorisation serves every step). Masks are chosen from the scores w^2 / U_jj^2: for
N:M at the first column of every group of M, for an unstructured ratio once per block of
``block_size`` columns over all rows of the block (the paper's adaptive mask selection).
Updates are lazy: within a block of ``block_size`` columns only the block is updated
column by column; the block's accumulated errors reach the columns after it in one
matrix product. The Hessian is dampened by ``damp`` times its mean diagonal; an input
column that never saw a non-zero value (zero diagonal) gets a unit diagonal and zero
weights. Scaling H by a constant changes nothing, so callers pass X X^T summed over the
tokens. Everything is computed in float64.
"""

from __future__ import annotations

import torch

from nemo_minitron.sparsity.config import Pattern


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the dampened H^-1, the dead input columns)."""
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True), dead


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, *, block_size: int = 128,
              damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(updated weight in float64 with zeros where pruned, keep mask) for ``weight`` [out, in]
    and ``hessian`` [in, in]. N:M needs ``block_size`` to be a multiple of M."""
    assert not pattern.is_nm or block_size % pattern.m == 0, (block_size, pattern)
    w = weight.double().clone()
    u, dead = inverse_hessian_factor(hessian, damp)
    w[:, dead] = 0.0
    rows, cols = w.shape
    keep = torch.ones_like(w, dtype=torch.bool)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        block = w[:, b0:b1].clone()
        u_block = u[b0:b1, b0:b1]
        diag = u_block.diagonal()
        errors = torch.zeros_like(block)
        keep_block = torch.ones_like(block, dtype=torch.bool)
        if not pattern.is_nm:  # the block's mask, from the weights as the earlier blocks left them
            scores = block.square() / diag.square()
            pruned = scores.flatten().topk(round(pattern.ratio * scores.numel()), largest=False).indices
            keep_block.view(-1)[pruned] = False
        for j in range(b1 - b0):
            if pattern.is_nm and j % pattern.m == 0:
                scores = block[:, j:j + pattern.m].square() / diag[j:j + pattern.m].square()
                kept = scores.topk(pattern.n, dim=1).indices
                keep_block[:, j:j + pattern.m] = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, kept, True)
            column = block[:, j]
            err = column * ~keep_block[:, j] / diag[j]  # (w - q) / U_jj, q = w where kept, 0 where pruned
            block[:, j:] -= err.unsqueeze(1) * u_block[j, j:].unsqueeze(0)
            errors[:, j] = err
        w[:, b0:b1] = block * keep_block  # exact zeros where pruned
        keep[:, b0:b1] = keep_block
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    return w, keep
