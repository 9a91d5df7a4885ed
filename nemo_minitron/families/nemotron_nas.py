"""Llama-Nemotron (``nemotron-nas``, ``DeciLMForCausalLM``): a Llama whose every layer has its
own shape, stated in ``block_configs`` (Llama-3.1-Nemotron-51B, Llama-3.3-Nemotron-Super-49B).

Each block is ``{"attention": {"n_heads_in_group", "no_op", "replace_with_linear"}, "ffn":
{"ffn_mult", "no_op", "replace_with_linear"}}``. A layer's query groups are
``num_attention_heads / n_heads_in_group``; its MLP width is ``ffn_mult`` turned into an
intermediate size by the rule of NVIDIA's modeling code, megatron-core
(``MLPConfig.ffn_mult_to_intermediate_size``) and vLLM alike: ``int(2 * ffn_mult * hidden /
3)`` rounded up to a multiple of 256. So only multiples of 256 are representable (any of them
is: ``ffn_mult = 1.5 * width / hidden`` maps back to it exactly); ``ffn_width_error`` says so
for the others. ``no_op`` removes the attention or MLP *and its norm*. ``replace_with_linear``
(a hidden x hidden linear in place of the block), attention sinks, windows and sparsity are
refused on import with the key that states them.

Weights are named as Llama's (a removed part has none). transformers has no class for this
format: an export ships its own modeling code (``checkpoint/decilm/``).
"""

from __future__ import annotations

from typing import Any, Mapping

from nemo_minitron.errors import UsageError, require
from nemo_minitron.families.llama import LLAMA_LAYER
from nemo_minitron.families.spec import DEFAULT_MAX_POSITION_EMBEDDINGS, DEFAULT_NORM_EPS, EMBEDDINGS, Const, Family, Field

#: the MLP width a ``ffn_mult`` gives is a multiple of this
FFN_MULTIPLE = 256
#: keys of a block's attention / ffn that must be absent, null or false (features we do not build)
_UNSUPPORTED_BLOCK_KEYS = {
    "attention": {"replace_with_linear": "a linear layer in place of attention",
                  "window_length": "sliding-window attention", "num_sink_tokens": "attention sink tokens",
                  "sparsify": "sparsified attention", "unshifted_sink": "attention sink tokens",
                  "use_prefill_window_in_sink_attention": "attention sink tokens",
                  "llama4": "Llama-4 attention", "mamba": "a Mamba mixer in place of attention"},
    "ffn": {"replace_with_linear": "a linear layer in place of the MLP", "sparsify": "a sparsified MLP",
            "moe": "a mixture of experts"},
}
_KNOWN_BLOCK_KEYS = {"attention": {"n_heads_in_group", "no_op", "num_query_groups"},
                     "ffn": {"ffn_mult", "no_op", "ffn_hidden_size", "intermediate_size"}}


def ffn_width(ffn_mult: float, hidden_size: int) -> int:
    """The MLP width ``ffn_mult`` states (NVIDIA's and megatron-core's rule)."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return -(-width // FFN_MULTIPLE) * FFN_MULTIPLE


def ffn_mult(width: int, hidden_size: int) -> float:
    """The ``ffn_mult`` that states ``width`` (check ``ffn_width_error`` first)."""
    return 1.5 * width / hidden_size


def ffn_width_error(width: int, hidden_size: int) -> str | None:
    """Why ``width`` cannot be written as a ``ffn_mult`` (None: it can)."""
    if width == 0 or ffn_width(ffn_mult(width, hidden_size), hidden_size) == width:
        return None
    low = width // FFN_MULTIPLE * FFN_MULTIPLE
    return (f"MLP width {width} is not representable in the nemotron-nas format (block_configs' ffn_mult gives "
            f"multiples of {FFN_MULTIPLE}); nearest: {low}, {low + FFN_MULTIPLE}")


def representable_ffn_width(width: int, hidden_size: int) -> bool:
    """Whether a Hugging Face export can state this MLP width (0, removed, always can)."""
    return ffn_width_error(width, hidden_size) is None


def _block_part(block: Mapping[str, Any], i: int, part: str) -> dict[str, Any]:
    value = block.get(part, block.get("mlp") if part == "ffn" else None)
    require(isinstance(value, Mapping), f"nemotron-nas config: block_configs[{i}].{part} is missing")
    for key, v in value.items():
        where = f"block_configs[{i}].{part}.{key}"
        if key in _UNSUPPORTED_BLOCK_KEYS[part]:
            require(not v, f"nemotron-nas config: {where}={v!r} is not supported "
                           f"({_UNSUPPORTED_BLOCK_KEYS[part][key]})")
        elif key not in _KNOWN_BLOCK_KEYS[part] | {"no_op"} and v not in (None, False):
            raise UsageError(f"nemotron-nas config: {where}={v!r} is not supported (unknown block setting)")
    return dict(value)


def layer_shapes_from_config(config: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(query groups, MLP width) of every layer from a ``block_configs`` config (0: removed)."""
    blocks = config.get("block_configs")
    require(isinstance(blocks, list) and blocks, "nemotron-nas config: 'block_configs' must be a non-empty list")
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    shapes = []
    for i, block in enumerate(blocks):
        require(isinstance(block, Mapping), f"nemotron-nas config: block_configs[{i}] is not a mapping")
        attention, ffn = _block_part(block, i, "attention"), _block_part(block, i, "ffn")
        if attention.get("no_op"):
            groups = 0
        elif attention.get("num_query_groups") is not None:
            groups = int(attention["num_query_groups"])
        else:
            per_group = attention.get("n_heads_in_group")
            require(isinstance(per_group, int) and per_group > 0 and heads % per_group == 0,
                    f"nemotron-nas config: block_configs[{i}].attention.n_heads_in_group={per_group!r} must divide "
                    f"num_attention_heads ({heads})")
            groups = heads // per_group
        if ffn.get("no_op"):
            width = 0
        elif ffn.get("ffn_hidden_size") is not None or ffn.get("intermediate_size") is not None:
            width = int(ffn.get("ffn_hidden_size") or ffn["intermediate_size"])
        else:
            mult = ffn.get("ffn_mult")
            require(isinstance(mult, (int, float)) and mult > 0,
                    f"nemotron-nas config: block_configs[{i}].ffn.ffn_mult={mult!r} must be a positive number")
            width = ffn_width(float(mult), hidden)
        shapes.append((groups, width))
    return shapes


def block_configs(num_attention_heads: int, hidden_size: int, shapes) -> list[dict[str, Any]]:
    """``block_configs`` of per-layer shapes (``LayerShape``s); a one-line error for a width
    the format cannot state."""
    out = []
    for i, s in enumerate(shapes):
        problem = ffn_width_error(s.ffn_hidden_size, hidden_size)
        require(problem is None, f"layer {i}: {problem}")
        attention = ({"n_heads_in_group": None, "no_op": True, "replace_with_linear": False}
                     if s.num_query_groups == 0 else
                     {"n_heads_in_group": num_attention_heads // s.num_query_groups, "no_op": False,
                      "replace_with_linear": False})
        ffn = ({"ffn_mult": None, "no_op": True, "replace_with_linear": False} if s.ffn_hidden_size == 0 else
               {"ffn_mult": ffn_mult(s.ffn_hidden_size, hidden_size), "no_op": False, "replace_with_linear": False})
        out.append({"attention": attention, "ffn": ffn})
    return out


def megatron_block_configs(desc) -> dict[str, Any]:
    """megatron-core's ``heterogeneous_layers_config_encoded_json`` contents for a description
    with per-layer shapes: ``block_configs`` stating each layer's groups and width directly
    (``num_query_groups``, ``ffn_hidden_size``: any width, which megatron-core's
    HeterogeneousTransformerConfig reads first), with the Hugging Face keys beside them where
    they can state it (``n_heads_in_group``, ``ffn_mult``: for tools that read those); a
    removed part is a ``no_op``."""
    blocks = []
    for s in desc.all_layer_shapes():
        attention = {"no_op": not s.has_attention, "replace_with_linear": False,
                     "num_query_groups": s.num_query_groups or None,
                     "n_heads_in_group": desc.num_attention_heads // s.num_query_groups if s.has_attention else None}
        mlp = {"no_op": not s.has_mlp, "replace_with_linear": False, "ffn_hidden_size": s.ffn_hidden_size or None}
        if s.has_mlp and representable_ffn_width(s.ffn_hidden_size, desc.hidden_size):
            mlp["ffn_mult"] = ffn_mult(s.ffn_hidden_size, desc.hidden_size)
        blocks.append({"attention": attention, "ffn": mlp})
    return {"block_configs": blocks}


NEMOTRON_NAS = Family(
    model_type="nemotron-nas", hf_class="DeciLMForCausalLM", config_class="DeciLMConfig", heterogeneous=True,
    config=(
        Field("vocab_size", "vocab_size", cast=int),
        Field("hidden_size", "hidden_size", cast=int),
        Field("num_hidden_layers", "num_layers", cast=int),
        Field("num_attention_heads", "num_attention_heads", cast=int),
        Field("head_dim", "head_dim", default=lambda c: c["hidden_size"] // c["num_attention_heads"], cast=int),
        Const("hidden_act", "silu", "the MLP activation"),
        Field("rms_norm_eps", "norm_eps", default=DEFAULT_NORM_EPS, cast=float),
        Field("max_position_embeddings", "max_position_embeddings", default=DEFAULT_MAX_POSITION_EMBEDDINGS, cast=int),
        Field("tie_word_embeddings", "tie_embeddings", default=False, cast=bool),
        Field("bos_token_id", "bos_token_id", default=None),
        Field("eos_token_id", "eos_token_id", default=None),
        Field("pad_token_id", "pad_token_id", default=None),
        Const("attention_bias", False, "attention biases"),
        Const("mlp_bias", False, "MLP biases"),
    ),
    # Llama's names; a layer whose attention or MLP is removed has none of that part's weights
    weights={**EMBEDDINGS, **LLAMA_LAYER},
    # written by NVIDIA's configs, unused by the model (each layer's shape is in block_configs)
    ignored_keys=("intermediate_size", "num_key_value_heads"),
)
