"""Least-squares refit of the linear that reads removed units (an idea ModelOpt lacks).

When some inputs of a linear layer W [out, n] are removed (a head's channels at the
input of the attention output projection, MLP neurons at the input of the second MLP
linear), the kept columns can absorb what the removed ones carried, as far as the
removed inputs are linear in the kept ones on the calibration data. With the Gram
matrix G = sum_t x_t x_t^T of the layer's inputs, kept set k and removed set r:

    W'  = argmin_V  sum_t || W x_t - V x_t[k] ||^2  =  W[:, k] + W[:, r] B,
    B   = G[r, k] (G[k, k] + lambda I)^-1

(the normal equations of the regression of x_r on x_k; lambda = ``damping`` times the
mean of diag G[k, k] keeps the solve stable when kept inputs are nearly collinear).
Nothing removed: W' = W[:, k] exactly.
"""

from __future__ import annotations

import torch

DEFAULT_DAMPING = 1e-2


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor,
                  damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """[out, len(kept)] replacement for ``weight[:, kept]`` (same dtype), solved in float64."""
    n = weight.shape[1]
    assert gram.shape == (n, n), (gram.shape, weight.shape)
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    removed = mask.nonzero().flatten()
    if removed.numel() == 0:
        return weight[:, kept].clone()
    g = gram.double().cpu()
    gkk = g[kept][:, kept]
    ridge = damping * gkk.diagonal().mean().clamp(min=1e-30)
    # B^T = (G[k,k] + ridge I)^-1 G[k, r]   (G symmetric)
    bt = torch.linalg.solve(gkk + ridge * torch.eye(len(kept), dtype=g.dtype), g[kept][:, removed])
    w = weight.double().cpu()
    return (w[:, kept] + w[:, removed] @ bt.T).to(weight.dtype).to(weight.device)
