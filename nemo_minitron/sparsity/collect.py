"""Calibration statistics of the linear layers to sparsify, from forward pre-hooks.

Per layer and over every calibration token x (the layer's input, a row of X):
- ``norms`` (Wanda): sum_t x_j^2 per input column j, a vector [in];
- ``hessian`` (SparseGPT): sum_t x x^T, the matrix [in, in] (H = 2 X X^T up to a
  factor, which SparseGPT does not depend on).
Both are computed and kept in float64 (the solves downstream are float64 too: the masks
and SparseGPT's weights are those of exact arithmetic on the activations, up to float64
rounding), as full (TP=1)
statistics of which each rank fills its part: its data-parallel share of the tokens and
its tensor-parallel share of the columns (a row-parallel layer's own input slice; for a
column-parallel layer, whose input every TP rank holds whole, the rank's 1/tp of the
columns), the Hessian's other index running over the whole input (gathered over TP for a
row-parallel layer). One sum over the ranks of the pipeline stage (tensor x data
parallel) then gives every rank the full statistics.

With Transformer Engine's spec the input norm is fused into ``linear_qkv`` / ``linear_fc1``,
whose input is then the norm's input: the norm's output is recomputed as importance does.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from nemo_minitron.importance.collect import fused_norm_output
from nemo_minitron.model.params import canonical_name, tp_split_dim, unwrap

KINDS = ("norms", "hessian")


def linear_modules(model, names: set[str]) -> dict[str, torch.nn.Module]:
    """canonical weight name -> the module owning it, for the ``names`` this rank holds."""
    inner = unwrap(model)
    found = {}
    for module_name, module in inner.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            name = canonical_name(inner, f"{module_name}.weight")
            if name in names:
                found[name] = module
    return found


def _column_range(name: str, full_width: int, local_width: int) -> tuple[int, int]:
    """The input columns this TP rank accounts for."""
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    if tp_split_dim(name) == 1:  # row-parallel: the rank's own input slice
        return rank * local_width, (rank + 1) * local_width
    bounds = torch.tensor_split(torch.arange(full_width), size)[rank]
    return (int(bounds[0]), int(bounds[-1]) + 1) if len(bounds) else (0, 0)


class InputStatistics:
    """``with stats.active(): run forward`` accumulates; ``reduce()`` (collective) completes."""

    def __init__(self, model, modules: dict[str, torch.nn.Module], kind: str):
        assert kind in KINDS, kind
        self.config = unwrap(model).config
        self.modules, self.kind = modules, kind
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.sums: dict[str, torch.Tensor] = {}

    def _hook(self, name: str):
        row_parallel = tp_split_dim(name) == 1

        def hook(module, args):
            x = args[0].detach()
            if hasattr(module, "layer_norm_weight"):  # TE: the norm is inside this module
                x = fused_norm_output(x, module, self.config)
            local = x.flatten(0, -2).double()  # [tokens, in_local]
            full = gather_from_tensor_model_parallel_region(x).flatten(0, -2).double() if row_parallel and \
                self.tp > 1 and self.kind == "hessian" else local
            width = local.shape[1] * (self.tp if row_parallel else 1)
            lo, hi = _column_range(name, width, local.shape[1])
            mine = local if row_parallel else local[:, lo:hi]
            if name not in self.sums:
                shape = (width,) if self.kind == "norms" else (width, width)
                self.sums[name] = torch.zeros(shape, dtype=torch.float64, device=x.device)
            if self.kind == "norms":
                self.sums[name][lo:hi] += mine.square().sum(0)
            else:
                self.sums[name][:, lo:hi] += full.T @ mine
        return hook

    @contextlib.contextmanager
    def active(self):
        handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def reduce(self) -> dict[str, torch.Tensor]:
        """Sum over this stage's tensor- and data-parallel ranks; every rank gets every sum."""
        if dist.is_initialized():
            group = ps.get_tensor_and_data_parallel_group()
            for name in sorted(self.modules):
                if name not in self.sums:  # a rank with no tokens (cannot happen: samples >= dp)
                    raise RuntimeError(f"no calibration input reached {name}")
                dist.all_reduce(self.sums[name], group=group)
        return self.sums
