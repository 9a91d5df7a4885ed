"""Norms for megatron-core's local layer spec where its torch norm refuses the config.

megatron-core 0.16.1's local-spec norm (``WrappedTorchNorm``) asserts on two settings
this project needs:
- zero-centred gamma ("1p" norms, Nemotron; ``layernorm_zero_centered_gamma``): the
  stored weight is gamma - 1 and the norm computes with weight + 1, which keeps bf16
  weights precise near 1 and lets weight decay pull gamma towards 1. Transformer
  Engine's norms and apex's ``FusedLayerNorm`` honour the flag; ``ZeroCenteredLayerNorm``
  does so here, so a checkpoint holds the same tensors whichever spec built it (and the
  same as HF's ``NemotronLayerNorm1P`` and Megatron-LM's checkpoints);
- sequence parallelism (training a mixture of experts at TP > 1): each rank normalises
  its slice of the sequence with the replicated weights, whose gradients are then partial
  sums; megatron sums them over the TP group for parameters marked ``sequence_parallel``,
  as TE's and apex's norms mark theirs. ``LocalNorm`` marks them here.
``local_norm_spec`` puts ``LocalNorm`` in every norm place of a local layer spec.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build


class ZeroCenteredLayerNorm(torch.nn.LayerNorm):
    """y = (x - mean) / sqrt(var + eps) * (1 + weight) + bias; megatron's norm constructor."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = True, normalization: str = "LayerNorm") -> None:
        assert config.normalization == "LayerNorm", "zero-centred gamma is implemented for LayerNorm only"
        super().__init__(hidden_size, eps=eps)  # float32 parameters, as the local spec's torch norm
        torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class LocalNorm:
    """megatron's norm constructor (a class, as megatron's ``build_module`` instantiates
    classes; like ``WrappedTorchNorm`` it returns a torch norm): the config's norm,
    zero-centred where it says so, its parameters marked for megatron's sum over TP ranks
    under sequence parallelism."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm") -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma:
            norm = ZeroCenteredLayerNorm(config, hidden_size, eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            assert config.normalization == "RMSNorm", config.normalization
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def local_norm_spec(layer_spec, config):
    """The local layer spec (or a heterogeneous model's block spec) with every norm (input, pre-MLP, QK, final) built by
    ``LocalNorm``, as the block spec megatron-core's ``GPTModel`` accepts (its own block
    would build the final norm with the torch norm, which refuses these settings)."""
    def swap(spec):
        if spec is WrappedTorchNorm:
            return LocalNorm
        if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
            return dataclasses.replace(spec, **{f.name: swap(getattr(spec, f.name)) for f in dataclasses.fields(spec)
                                                if f.name in ("submodules", "self_attention") or "layernorm" in f.name})
        return spec

    if isinstance(layer_spec, TransformerBlockSubmodules):  # a heterogeneous model's layers, this stage's
        return TransformerBlockSubmodules(layer_specs=[swap(s) for s in layer_spec.layer_specs], layer_norm=LocalNorm)
    return TransformerBlockSubmodules(layer_specs=[swap(layer_spec)] * get_num_layers_to_build(config),
                                      layer_norm=LocalNorm)
