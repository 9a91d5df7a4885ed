"""How a model family is written down: a table, read in both directions by one converter.

A ``Family`` states, as data only:
- ``features``: the ModelDescription fields the family fixes (MLP activation, norm kind,
  QKV bias, QK-norm, ...). A description of the family must have exactly these values.
- ``config``: Hugging Face ``config.json`` keys, each one of
    ``Field(hf, field)``    an HF key holding a description field (read and written);
    ``Const(hf, value)``    a key we support only at ``value`` (read: absent or equal, else a
                            one-line error naming the key and ``feature``; written as ``value``);
                            with ``feature=None`` it is only written;
    ``Check(hf, ok)``       read only: ``ok(value)`` must hold, else the same error.
  RoPE (``rope_theta``, ``rope_scaling``, ``partial_rotary_factor`` or transformers 5's
  ``rope_parameters``) is read and written by the converter for every family.
- ``weights``: canonical megatron-core name (TP=1; ``{i}`` is the layer) -> HF name(s) and
  the transform between them (``checkpoint/hf_format.py`` implements the transforms):
    ``"hf.name"``                    the same tensor
    ``("vocab", "hf.name")``         rows padded to the padded vocabulary (and cut on export)
    ``("qkv", q, k, v)``             megatron's fused QKV, rows grouped by query group
    ``("gate_up", gate, up)``        megatron's fused [gate; up] first MLP linear
  ``output_layer.weight`` of a model with tied embeddings is the embedding (never written).
  A mixture-of-experts family (``moe=True``) also has ``{e}`` (the expert) in its names:
  megatron's ``mlp.experts.local_experts.{e}.linear_fc1.weight`` <-> HF's
  ``mlp.experts.{e}.gate_proj.weight`` and ``up_proj``, and a rule for the router.

Adding a family is adding one such table (see ``llama.py``, ``qwen.py``, ``nemotron.py``,
``moe.py``) and its tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Union

#: What a config that leaves these out means (also the ModelDescription defaults).
DEFAULT_NORM_EPS = 1e-5
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_MAX_POSITION_EMBEDDINGS = 4096

#: Description features every family states; the defaults are the Llama family's.
DEFAULT_FEATURES: Mapping[str, Any] = {
    "activation": "swiglu",        # swiglu (gated, silu) | squared_relu (no gate)
    "normalization": "RMSNorm",    # RMSNorm | LayerNorm (with bias)
    "zero_centered_gamma": False,  # norm weight stored as gamma - 1 ("1p")
    "qkv_bias": False,
    "qk_norm": False,              # RMSNorm/LayerNorm over head_dim on queries and keys
    "moe_shared_expert_gate": False,  # the shared expert's output scaled by sigmoid(x . w) (Qwen2-MoE)
}

_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Field:
    hf: str
    field: str
    #: when the HF config omits the key: a value, or a function of the config
    default: Any = _REQUIRED
    cast: Callable[[Any], Any] | None = None

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclasses.dataclass(frozen=True)
class Const:
    hf: str
    value: Any
    #: what another value would mean (for the error); None: written on export, never checked
    feature: str | None = None


@dataclasses.dataclass(frozen=True)
class Check:
    hf: str
    ok: Callable[[Any], bool]
    feature: str


ConfigEntry = Union[Field, Const, Check]
WeightRule = Union[str, tuple]


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    hf_class: str
    config_class: str
    config: tuple[ConfigEntry, ...]
    weights: Mapping[str, WeightRule]
    features: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: RoPE scaling types the family's HF implementation and ours both compute
    rope_scaling: tuple[str, ...] = ("llama3", "linear")
    #: HF's implementation honours ``partial_rotary_factor``: its value when the config
    #: omits it (None: HF rotates whole heads, and so does the description)
    partial_rotary: float | None = None
    #: another family to write the model as when transformers refuses this one's shape
    fallback: str | None = None
    #: every layer's MLP is a mixture of experts (the description's num_experts > 0)
    moe: bool = False
    #: a hybrid Mamba-Transformer family (the description's hybrid_pattern is set; model/hybrid.py)
    hybrid: bool = False
    #: every layer has its own shape (the description's layer_shapes; Llama-Nemotron's block_configs)
    heterogeneous: bool = False
    #: the family's attention has rotary position embeddings (RoPE keys are read and written)
    rope: bool = True
    #: config keys the family's configs carry without using them here (not refused as unsupported)
    ignored_keys: tuple[str, ...] = ()

    def feature_values(self) -> dict[str, Any]:
        return {**DEFAULT_FEATURES, **self.features}


# ------------------------------------------------------------------ shared table parts
def common_config(norm_eps_key: str, default_act: str,
                  mlp_width: tuple[str, str] = ("intermediate_size", "ffn_hidden_size")) -> tuple[ConfigEntry, ...]:
    """The shape keys every decoder family shares, and its norm epsilon and activation;
    ``mlp_width``: the HF key of the MLP's width and the description field it holds."""
    return (
        Field("vocab_size", "vocab_size", cast=int),
        Field("hidden_size", "hidden_size", cast=int),
        Field(*mlp_width, cast=int),
        Field("num_hidden_layers", "num_layers", cast=int),
        Field("num_attention_heads", "num_attention_heads", cast=int),
        Field("num_key_value_heads", "num_query_groups", default=lambda c: c["num_attention_heads"], cast=int),
        Field("head_dim", "head_dim", default=lambda c: c["hidden_size"] // c["num_attention_heads"], cast=int),
        Const("hidden_act", default_act, "the MLP activation"),
        Field(norm_eps_key, "norm_eps", default=DEFAULT_NORM_EPS, cast=float),
        Field("max_position_embeddings", "max_position_embeddings", default=DEFAULT_MAX_POSITION_EMBEDDINGS, cast=int),
        Field("tie_word_embeddings", "tie_embeddings", default=False, cast=bool),
        Field("bos_token_id", "bos_token_id", default=None),
        Field("eos_token_id", "eos_token_id", default=None),
        Field("pad_token_id", "pad_token_id", default=None),
    )


def full_attention_only(layer_types: Any) -> bool:
    return layer_types is None or set(layer_types) <= {"full_attention"}


L, M = "model.layers.{i}.", "decoder.layers.{i}."

#: Embeddings, final norm and output layer: the same in every family here.
EMBEDDINGS: Mapping[str, WeightRule] = {
    "embedding.word_embeddings.weight": ("vocab", "model.embed_tokens.weight"),
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": ("vocab", "lm_head.weight"),
}

#: Attention as Llama writes it: separate q/k/v and o projections.
ATTENTION: Mapping[str, WeightRule] = {
    M + "self_attention.linear_qkv.weight": ("qkv", *(f"{L}self_attn.{p}_proj.weight" for p in "qkv")),
    M + "self_attention.linear_proj.weight": L + "self_attn.o_proj.weight",
}
