"""A model described as data: the Llama family's shapes, and what follows from them.

A ``ModelDescription`` is all that is needed to build a megatron-core ``GPTModel``
(``model.builder``), to write a Hugging Face ``config.json`` (``checkpoint.hf_export``)
and to count parameters, FLOPs and KV-cache bytes (the pruning planner), so planning
a 70B model needs no weights. It is stored as JSON inside every project checkpoint.

Pruned shapes are first-class: ``head_dim`` is explicit and need not equal
``hidden_size / num_attention_heads``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

from nemo_minitron.config import DEFAULT_SEQ_LEN
from nemo_minitron.errors import UsageError, divisors, require

#: HF ``model_type`` values this project converts, builds and exports.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

#: The vocabulary is padded to a multiple of this so that every power-of-two tensor
#: parallel size up to 128 divides it; the padding never depends on the layout, so a
#: checkpoint saved at one TP size loads at any other.
VOCAB_PAD_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    architecture: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    #: HF-style rope scaling, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None for plain RoPE.
    rope_scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        require(
            self.architecture in SUPPORTED_ARCHITECTURES,
            f"unsupported architecture '{self.architecture}' (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
        )
        for field in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers",
                      "num_attention_heads", "num_query_groups", "head_dim"):
            value = getattr(self, field)
            require(isinstance(value, int) and value > 0, f"model {field} must be a positive integer, got {value!r}")
        require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"attention heads ({self.num_attention_heads}) must be a multiple of query groups "
            f"({self.num_query_groups})",
        )

    # ------------------------------------------------------------------ derived shapes
    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def padded_vocab_size(self) -> int:
        return int(math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE)

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim

    def replace(self, **changes: Any) -> "ModelDescription":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ counting
    def parameters_per_layer(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * h * self.ffn_hidden_size  # gate, up, down (SwiGLU)
        norms = 2 * h
        return attention + mlp + norms

    def embedding_parameters(self) -> int:
        """Input embedding plus output layer (counted once when tied); true vocabulary."""
        per_table = self.vocab_size * self.hidden_size
        return per_table if self.tie_embeddings else 2 * per_table

    def num_parameters(self) -> int:
        """Parameter count exactly as the exported Hugging Face model reports it."""
        return self.embedding_parameters() + self.num_layers * self.parameters_per_layer() + self.hidden_size

    def flops_per_token(self, seq_len: int = DEFAULT_SEQ_LEN) -> int:
        """Forward FLOPs per token: 2 per weight of every matrix product (the output layer
        included, the embedding lookup excluded) plus attention scores and values over a
        causal context of ``seq_len`` (on average seq_len / 2 keys per query)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        matmul_weights = self.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * self.ffn_hidden_size)
        matmul_weights += self.vocab_size * h
        attention = self.num_layers * 2 * 2 * q * (seq_len / 2)
        return int(2 * matmul_weights + attention)

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        return 2 * self.num_layers * self.num_query_groups * self.head_dim * bytes_per_element

    # ------------------------------------------------------------------ layout rules
    def check_layout(self, tp: int, pp: int) -> None:
        """Raise a one-line UsageError when --tp/--pp cannot hold this model."""
        require(tp >= 1 and pp >= 1, f"--tp and --pp must be >= 1, got --tp {tp} --pp {pp}")
        for what, n in (("query groups", self.num_query_groups), ("attention heads", self.num_attention_heads),
                        ("ffn hidden size", self.ffn_hidden_size)):
            if n % tp:
                ok = [t for t in divisors(self.num_query_groups) if self.num_attention_heads % t == 0
                      and self.ffn_hidden_size % t == 0 and self.padded_vocab_size % t == 0]
                raise UsageError(
                    f"--tp {tp} does not divide the model's {what} ({n}); allowed --tp values: "
                    f"{', '.join(map(str, ok))}"
                )
        require(
            self.padded_vocab_size % tp == 0,
            f"--tp {tp} does not divide the padded vocabulary ({self.padded_vocab_size}); use a power of two",
        )
        require(
            pp <= self.num_layers,
            f"--pp {pp} is larger than the number of layers ({self.num_layers}); allowed: 1..{self.num_layers}",
        )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["rope_scaling"] is not None:
            out["rope_scaling"] = dict(out["rope_scaling"])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelDescription":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        require(not unknown, f"unknown model description keys: {', '.join(unknown)}")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def fingerprint(self) -> dict[str, Any]:
        """The shape facts that importance scores must match to be applied to a model."""
        return {k: getattr(self, k) for k in ("architecture", "vocab_size", "hidden_size", "ffn_hidden_size",
                                              "num_layers", "num_attention_heads", "num_query_groups", "head_dim")}

    def summary(self) -> str:
        return (f"{self.architecture} {self.num_parameters() / 1e6:.1f}M params: layers {self.num_layers}, "
                f"hidden {self.hidden_size}, ffn {self.ffn_hidden_size}, heads {self.num_attention_heads}, "
                f"query groups {self.num_query_groups}, head dim {self.head_dim}, vocab {self.vocab_size}"
                f"{', tied embeddings' if self.tie_embeddings else ''}")


# ---------------------------------------------------------------------- Hugging Face config
_ARCH_BY_CLASS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def _rope_from_hf(config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """HF keeps RoPE settings in ``rope_theta``/``rope_scaling`` (4.x) or ``rope_parameters`` (5.x)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = float(config.get("rope_theta", params.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    merged.pop("rope_theta", None)
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    require(kind in ("llama3", "linear"), f"unsupported rope scaling type '{kind}' (supported: llama3, linear)")
    merged["rope_type"] = kind
    merged.pop("type", None)
    return theta, merged


def description_from_hf_config(config: Mapping[str, Any], name: str = "") -> ModelDescription:
    """Read a Hugging Face ``config.json`` (as a dict) into a ModelDescription."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        classes = config.get("architectures") or []
        model_type = next((_ARCH_BY_CLASS[c] for c in classes if c in _ARCH_BY_CLASS), model_type)
    require(
        model_type in SUPPORTED_ARCHITECTURES,
        f"unsupported architecture '{model_type or config.get('architectures')}' "
        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
    )
    act = config.get("hidden_act", "silu")
    require(act == "silu", f"unsupported activation '{act}' (supported: silu, i.e. SwiGLU)")
    require(not config.get("mlp_bias", False), "MLP biases are not supported")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    theta, scaling = _rope_from_hf(config)
    qkv_bias = bool(config.get("attention_bias", model_type == "qwen2"))
    window = config.get("sliding_window")
    if model_type == "qwen2" and not config.get("use_sliding_window", False):
        window = None
    return ModelDescription(
        architecture=model_type,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        ffn_hidden_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        sliding_window=int(window) if window else None,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
        name=name or str(config.get("_name_or_path", "")),
    )
