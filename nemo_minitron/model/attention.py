"""Core attention for megatron-core's local layer spec on a CPU, with PyTorch's SDPA.

The local spec's ``DotProductAttention`` computes attention unfused: ``baddbmm`` into a
[b * heads, s, s] score buffer, a masked float32 softmax (its fused kernel needs CUDA),
``bmm`` with the values and a permute back. On a CPU that is about a tenth of a
distillation step. ``torch.nn.functional.scaled_dot_product_attention`` computes the same
causal softmax attention in one kernel (blocked, in cache, float32 accumulation) with its
own backward.

``SDPAttention`` is a ``DotProductAttention`` (the same constructor, attributes and
checkpoint entries) that takes the SDPA path where the two mean the same:

- a causal self-attention layer (``attn_mask_type`` causal), queries and keys of one
  length (training, a forward over whole sequences, a prefill from position 0), no
  explicit ``attention_mask`` (the causal mask is implied), no attention bias, no packed
  sequences (THD);
- the plain softmax (``softmax_type`` vanilla), no sliding window, no query-key layer
  scaling (a float16 overflow guard that rescales inside the softmax);
- no attention dropout while training (megatron draws its dropout from its RNG tracker;
  SDPA would draw other masks).

Anything else goes to ``DotProductAttention.forward`` unchanged: decode steps against a KV
cache (one query, many keys: SDPA's causal mask is aligned top-left, megatron attends to
all keys), explicit or padding masks, dropout in training, sliding windows, softmax
offsets. Grouped queries repeat each key/value head for its query heads, as
``DotProductAttention`` does; each tensor-parallel rank sees its own heads.

Numerics: the masked scores are -inf here and -10000 in megatron's softmax; every causal
row keeps its diagonal, so both give exact zeros there in float32. Float32 results differ
by accumulation order only; in bfloat16 SDPA keeps the scores and probabilities in float32
where megatron rounds the scores and the probabilities to bfloat16 around its float32
softmax.

``sdpa_attention_spec`` puts ``SDPAttention`` in every core-attention place of a local
layer spec (a layer, a heterogeneous model's block, a hybrid stack); ``local_cpu_spec``
does so where the local spec runs without a GPU (``model/builder.py``, ``model/mamba.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` computed by SDPA where that is exact in meaning (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # settings fixed at construction under which the SDPA path means the same
        self.sdpa_applies = (self.attn_mask_type == AttnMaskType.causal
                             and getattr(self.config, "softmax_type", "vanilla") == "vanilla"
                             and self.scale_mask_softmax.window_size is None
                             and not self.config.apply_query_key_layer_scaling)

    def uses_sdpa(self, query: torch.Tensor, key: torch.Tensor, attention_mask, attention_bias,
                  packed_seq_params) -> bool:
        """Whether this call takes the SDPA path (else ``DotProductAttention``'s)."""
        return (self.sdpa_applies and attention_mask is None and attention_bias is None
                and packed_seq_params is None and query.shape[0] == key.shape[0]
                and not (self.training and self.attention_dropout.p > 0))

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [s, b, heads, d], key and value [s, b, groups, d] -> [s, b, heads * d]."""
        if not self.uses_sdpa(query, key, attention_mask, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        repeats = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if repeats > 1:
            key = key.repeat_interleave(repeats, dim=2)
            value = value.repeat_interleave(repeats, dim=2)
        # [s, b, h, d] -> [b, h, s, d]: views; SDPA's CPU kernel reads strided inputs
        context = F.scaled_dot_product_attention(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3),
                                                 value.permute(1, 2, 0, 3), is_causal=True,
                                                 scale=self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)


def sdpa_attention_spec(spec: Any) -> Any:
    """``spec`` (a ModuleSpec, a submodules dataclass or a list of them) with ``SDPAttention``
    wherever it names ``DotProductAttention``; the rest unchanged (a new spec, the given one
    is not modified)."""
    if spec is DotProductAttention:
        return SDPAttention
    if isinstance(spec, list):
        return [sdpa_attention_spec(s) for s in spec]
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changed = {}
        for f in dataclasses.fields(spec):
            if not f.init:
                continue
            value = getattr(spec, f.name)
            new = sdpa_attention_spec(value)
            if new is not value:
                changed[f.name] = new
        return dataclasses.replace(spec, **changed) if changed else spec
    return spec


def local_cpu_spec(spec: Any, te: bool) -> Any:
    """The spec a model is built with: ``sdpa_attention_spec(spec)`` for the local spec on a
    machine without a GPU (where megatron-core's fused softmax cannot run either), else ``spec``."""
    return spec if te or torch.cuda.is_available() else sdpa_attention_spec(spec)
