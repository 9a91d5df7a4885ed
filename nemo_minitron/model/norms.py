"""LayerNorm with zero-centred gamma for megatron-core's local layer spec.

megatron-core states "1p" norms (Nemotron) with ``layernorm_zero_centered_gamma``: the
stored weight is gamma - 1 and the norm computes with weight + 1, which keeps bf16
weights precise near 1 and lets weight decay pull gamma towards 1. Transformer Engine's
norms and apex's ``FusedLayerNorm`` honour the flag; the local spec's torch norm
(``WrappedTorchNorm``) refuses it (megatron-core 0.16.1 asserts). This module is that
norm for the local spec, so a checkpoint holds the same tensors whichever spec built it
(and the same as HF's ``NemotronLayerNorm1P`` and Megatron-LM's checkpoints).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


class ZeroCenteredLayerNorm(torch.nn.LayerNorm):
    """y = (x - mean) / sqrt(var + eps) * (1 + weight) + bias; megatron's norm constructor."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = True, normalization: str = "LayerNorm") -> None:
        assert config.normalization == "LayerNorm", "zero-centred gamma is implemented for LayerNorm only"
        assert not config.sequence_parallel, "sequence parallel is not supported by the local norm"
        super().__init__(hidden_size, eps=eps)  # float32 parameters, as the local spec's torch norm
        torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


def zero_centered_local_spec(layer_spec, config):
    """The local layer spec with every norm (input, pre-MLP, QK, final) zero-centred, as the
    block spec megatron-core's ``GPTModel`` accepts (its own block would build the final
    norm with the torch norm, which refuses the flag)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    def swap(spec):
        if spec is WrappedTorchNorm:
            return ZeroCenteredLayerNorm
        if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
            return dataclasses.replace(spec, **{f.name: swap(getattr(spec, f.name)) for f in dataclasses.fields(spec)
                                                if f.name in ("submodules", "self_attention") or "layernorm" in f.name})
        return spec

    return TransformerBlockSubmodules(layer_specs=[swap(layer_spec)] * get_num_layers_to_build(config),
                                      layer_norm=ZeroCenteredLayerNorm)
