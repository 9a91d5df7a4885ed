"""Weight name and layout mapping between Hugging Face Llama-family models and
megatron-core's canonical (TP=1) tensors. Pure tensor code: no files, no processes.

Both directions are lazy (``get`` callbacks), so a rank reads only the tensors of the
layers it holds.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.params import layer_of

Getter = Callable[[str], torch.Tensor]

_LAYER_RENAMES = {  # canonical suffix -> HF suffix (one-to-one tensors)
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


def interleave_qkv(desc: ModelDescription, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF's separate q/k/v (rows: heads x head_dim) -> megatron's per-group [q.., k, v] rows."""
    g, d = desc.num_query_groups, desc.head_dim
    rest = q.shape[1:]
    q = q.reshape(g, desc.heads_per_group * d, *rest)
    k = k.reshape(g, d, *rest)
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(desc: ModelDescription, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d, hpg = desc.num_query_groups, desc.head_dim, desc.heads_per_group
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (hpg + 2) * d, *rest)
    q, k, v = grouped.split([hpg * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def hf_to_canonical(desc: ModelDescription, name: str, get: Getter) -> torch.Tensor:
    """The canonical megatron tensor ``name`` built from HF tensors fetched with ``get``."""
    padded = desc.padded_vocab_size
    if name == "embedding.word_embeddings.weight":
        return pad_vocab(get("model.embed_tokens.weight"), padded)
    if name == "output_layer.weight":
        return pad_vocab(get("model.embed_tokens.weight" if desc.tie_embeddings else "lm_head.weight"), padded)
    if name == "decoder.final_layernorm.weight":
        return get("model.norm.weight")
    i = layer_of(name)
    if i is None:
        raise KeyError(name)
    prefix, suffix = f"model.layers.{i}.", name.split(f"decoder.layers.{i}.", 1)[1]
    if suffix in _LAYER_RENAMES:
        return get(prefix + _LAYER_RENAMES[suffix])
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        return interleave_qkv(desc, *(get(f"{prefix}self_attn.{p}_proj.{kind}") for p in "qkv"))
    if suffix == "mlp.linear_fc1.weight":
        return torch.cat([get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")], dim=0)
    raise KeyError(name)


def canonical_names(desc: ModelDescription) -> list[str]:
    names = ["embedding.word_embeddings.weight"]
    for i in range(desc.num_layers):
        p = f"decoder.layers.{i}."
        names += [p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight"]
        if desc.qkv_bias:
            names.append(p + "self_attention.linear_qkv.bias")
        names += [p + "self_attention.linear_proj.weight", p + "pre_mlp_layernorm.weight",
                  p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    names.append("decoder.final_layernorm.weight")
    if not desc.tie_embeddings:
        names.append("output_layer.weight")
    return names


def canonical_to_hf(desc: ModelDescription, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors (vocabulary padding removed) for one canonical megatron tensor."""
    v = desc.vocab_size
    if name == "embedding.word_embeddings.weight":
        yield "model.embed_tokens.weight", tensor[:v]
        return
    if name == "output_layer.weight":
        if not desc.tie_embeddings:
            yield "lm_head.weight", tensor[:v]
        return
    if name == "decoder.final_layernorm.weight":
        yield "model.norm.weight", tensor
        return
    i = layer_of(name)
    prefix, suffix = f"model.layers.{i}.", name.split(f"decoder.layers.{i}.", 1)[1]
    if suffix in _LAYER_RENAMES:
        yield prefix + _LAYER_RENAMES[suffix], tensor
    elif suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        for p, t in zip("qkv", split_qkv(desc, tensor)):
            yield f"{prefix}self_attn.{p}_proj.{kind}", t
    elif suffix == "mlp.linear_fc1.weight":
        gate, up = tensor.chunk(2, dim=0)
        yield prefix + "mlp.gate_proj.weight", gate
        yield prefix + "mlp.up_proj.weight", up
    else:
        raise KeyError(name)
