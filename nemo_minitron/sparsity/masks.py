"""Sparsity masks on a loaded model: where they live, how they are saved and loaded, and
how training keeps them.

A masked weight carries its mask as an attribute of the parameter (``param.sparsity_mask``:
a bool tensor of the parameter's local shape, True where the weight may be non-zero), so
it follows the parameter through megatron-core's DDP and optimizer wrappers and dtype
casts (which keep the Parameter object and replace its data).

In a checkpoint each mask is one more tensor of the distributed checkpoint
(``sparsity_mask.<canonical name>``, split over TP as its weight is), so masks load at any
TP/PP layout like the weights do. Which weights have masks is recorded in the
checkpoint's provenance (``sparsity.weights``).

Training (``distill``): gradients of masked weights are multiplied by the mask after the
gradients are reduced and before the optimizer step, and the weights are re-zeroed after
it. With the gradient zero at a masked position from the first step on, Adam's moments
there stay exactly 0 (m = b1 m + (1 - b1) 0, v likewise), its update is 0 / (sqrt(0) + eps)
= 0 and decoupled weight decay multiplies a zero weight: the float32 main weights and
optimizer states of megatron-core's (distributed) optimizer stay exactly zero there,
and re-zeroing the parameters after the step changes nothing (it guards against a mask
attached after the optimizer state was built).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from nemo_minitron.checkpoint.dcp_index import load_sharded
from nemo_minitron.model.params import canonical_name, is_gated, named_weights, tp_split_dim, unwrap

MASK_ATTR = "sparsity_mask"
KEY_PREFIX = "sparsity_mask."


def masked_weight_names(provenance: dict) -> list[str]:
    """The canonical weights a checkpoint holds masks of (its provenance's sparsity record)."""
    return sorted((provenance.get("sparsity") or {}).get("weights", {}))


def set_mask(param: torch.nn.Parameter, mask: torch.Tensor) -> None:
    """Attach ``mask`` (this rank's slice) to ``param`` and zero the weights it drops."""
    mask = mask.to(device=param.device, dtype=torch.bool)
    assert mask.shape == param.shape, (mask.shape, param.shape)
    setattr(param, MASK_ATTR, mask)
    with torch.no_grad():
        param.mul_(mask)


def mask_of(param: torch.nn.Parameter) -> torch.Tensor | None:
    return getattr(param, MASK_ATTR, None)


def masked_parameters(model) -> Iterator[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """(canonical name, parameter, mask) for every masked weight this rank holds."""
    inner = unwrap(model)
    for local_name, param in inner.named_parameters():
        mask = mask_of(param)
        if mask is not None:
            yield canonical_name(inner, local_name), param, mask


def has_masks(model) -> bool:
    return next(masked_parameters(model), None) is not None


# ---------------------------------------------------------------------- training
def mask_gradients(model) -> None:
    """Zero the (reduced) gradients of masked weights: megatron's ``main_grad`` under its
    DDP, else ``.grad``."""
    for _, param, mask in masked_parameters(model):
        grad = getattr(param, "main_grad", None)
        grad = grad if grad is not None else param.grad
        if grad is not None:
            grad.mul_(mask)


def apply_masks(model) -> None:
    """Re-zero every masked weight (after an optimizer step)."""
    with torch.no_grad():
        for _, param, mask in masked_parameters(model):
            param.mul_(mask)


# ---------------------------------------------------------------------- checkpoints
def _entries(name: str, mask: torch.Tensor, gated: bool) -> dict[str, ShardedTensor]:
    """This rank's slice of the mask of canonical weight ``name`` as sharded tensors, keyed by
    the canonical name (the global layer number: the same keys at every layout). A gated
    MLP's ``[gate; up]`` is two tensors, each split over TP like the weight's halves."""
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    dim = tp_split_dim(name)
    # one rank saves each slice: the first data-parallel replica (and TP rank 0 of a replicated one)
    replica = (0, tp_rank if dim is None else 0, ps.get_data_parallel_rank())
    offsets = [] if dim is None or tp_size == 1 else [(dim, tp_rank, tp_size)]
    key = KEY_PREFIX + name
    if is_gated(name, gated):
        gate, up = mask.chunk(2, dim=0)
        return {f"{key}.gate": ShardedTensor.from_rank_offsets(f"{key}.gate", gate, *offsets, replica_id=replica),
                f"{key}.up": ShardedTensor.from_rank_offsets(f"{key}.up", up, *offsets, replica_id=replica)}
    return {key: ShardedTensor.from_rank_offsets(key, mask, *offsets, replica_id=replica)}


def _gated(model) -> bool:
    return bool(unwrap(model).config.gated_linear_unit)


def mask_sharded_state_dict(model) -> dict[str, ShardedTensor]:
    """The attached masks as sharded tensors, to save beside the weights."""
    gated = _gated(model)
    out: dict[str, ShardedTensor] = {}
    for name, _, mask in masked_parameters(model):
        out.update(_entries(name, mask.contiguous(), gated))
    return out


def load_masks(model, directory: Path, names: Iterable[str]) -> None:
    """Load the masks of the canonical weights ``names`` this rank holds from the distributed
    checkpoint ``directory`` and attach them (collective)."""
    inner, gated, wanted = unwrap(model), _gated(model), set(names)
    params = {name: p for name, p in named_weights(inner) if name in wanted}
    request: dict[str, ShardedTensor] = {}
    for name, param in params.items():
        request.update(_entries(name, torch.empty(param.shape, dtype=torch.bool, device=param.device), gated))
    loaded = load_sharded(request, directory)
    for name, param in params.items():
        key = KEY_PREFIX + name
        mask = torch.cat([loaded[f"{key}.gate"], loaded[f"{key}.up"]]) if is_gated(name, gated) else loaded[key]
        set_mask(param, mask)


def load_masks_from(model, directory: Path) -> None:
    """Replace the attached masks by the ones saved in ``directory`` (a training checkpoint)."""
    load_masks(model, directory, [name for name, _, _ in masked_parameters(model)])
