"""A model described as data: a decoder's shapes and features, and what follows from them.

A ``ModelDescription`` is all that is needed to build a megatron-core ``GPTModel``
(``model.builder``), to write a Hugging Face ``config.json`` (``checkpoint.hf_export``)
and to count parameters, FLOPs and KV-cache bytes (the pruning planner), so planning
a 70B model needs no weights. It is stored as JSON inside every project checkpoint.

``architecture`` names the family (``nemo_minitron.families``: llama, mistral, qwen2,
qwen3, nemotron, and the mixture-of-experts mixtral, qwen3_moe, qwen2_moe), whose table
fixes the features (MLP activation, norm kind, biases, QK-norm, shared-expert gate); the
converter between HF configs and descriptions is ``checkpoint.hf_format``. Pruned shapes
are first-class: ``head_dim`` is explicit and need not equal ``hidden_size /
num_attention_heads``.

Mixture of experts (``num_experts > 0``): every layer's MLP is megatron's MoE layer, a
router (``num_experts x hidden``) sending each token to its ``moe_top_k`` experts, each
a SwiGLU MLP of width ``moe_ffn_hidden_size``, plus optionally one shared expert of width
``moe_shared_ffn_hidden_size`` that every token passes through. Such a model has no dense
MLP: ``ffn_hidden_size`` is 0. It counts *total* parameters (every expert) and *active*
ones (those one token uses: ``moe_top_k`` experts), and FLOPs per token of the active ones.

Hybrid Mamba-Transformer models (``hybrid_pattern`` non-empty, Nemotron-H): each layer is
one kind, a Mamba-2 mixer (``M``, shaped by the ``mamba_*`` fields), attention (``*``), an
MLP (``-``, ``ffn_hidden_size``) or a mixture of experts (``E``, Nemotron 3: the ``moe_*``
fields; experts without a gate, like the MLP, and a sigmoid router with a per-expert bias,
the family's ``moe_router``); the attention and MLP fields shape those layers.
``model/hybrid.py`` holds their shape rules and counts.

Heterogeneous (per-layer) models (``layer_shapes`` non-empty, Llama-Nemotron / DeciLM
style): every layer has its own number of query groups and MLP width (``LayerShape``),
either of which may be 0 (that layer's attention or MLP is removed, with its norm: a
no-op). Attention heads, head_dim and hidden size stay model-wide; each layer's groups
divide the heads. The model-wide ``num_query_groups`` / ``ffn_hidden_size`` are then the
widest layer's (``replace(layer_shapes=...)`` sets them). ``layer_costs`` counts one layer
of any shape (parameters, FLOPs and KV-cache bytes per token), for planners that choose
per-layer shapes; megatron-core builds such models with its heterogeneous config
(``model/builder.py``); Hugging Face writes them as ``nemotron-nas`` (``families/nemotron_nas.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

from nemo_minitron.config import DEFAULT_SEQ_LEN
from nemo_minitron.errors import UsageError, divisors, require
from nemo_minitron.families import FAMILIES, family
from nemo_minitron.families.spec import DEFAULT_MAX_POSITION_EMBEDDINGS, DEFAULT_NORM_EPS, DEFAULT_ROPE_THETA
from nemo_minitron.model import hybrid

#: HF ``model_type`` values this project converts, builds and exports.
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
ACTIVATIONS = ("swiglu", "squared_relu")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")

#: The vocabulary is padded to a multiple of this so that every power-of-two tensor
#: parallel size up to 128 divides it; the padding never depends on the layout, so a
#: checkpoint saved at one TP size loads at any other.
VOCAB_PAD_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One decoder layer's shape in a heterogeneous (per-layer) model."""
    num_query_groups: int   # 0: this layer's attention is removed (a no-op)
    ffn_hidden_size: int    # 0: this layer's MLP is removed (a no-op)

    @property
    def has_attention(self) -> bool:
        return self.num_query_groups > 0

    @property
    def has_mlp(self) -> bool:
        return self.ffn_hidden_size > 0


@dataclasses.dataclass(frozen=True)
class LayerCosts:
    """What one decoder layer costs: parameters (its norms included), forward FLOPs per
    token (matrix products, and attention over a causal context of ``seq_len``) and
    KV-cache bytes per token."""
    parameters: int
    flops_per_token: int
    kv_cache_bytes_per_token: int


def _as_layer_shape(value: Any, i: int) -> LayerShape:
    if isinstance(value, LayerShape):
        return value
    if isinstance(value, Mapping) and set(value) == {"num_query_groups", "ffn_hidden_size"}:
        return LayerShape(**value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return LayerShape(*value)
    raise UsageError(f"model layer_shapes[{i}] must be {{num_query_groups, ffn_hidden_size}}, got {value!r}")


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
    norm_eps: float = DEFAULT_NORM_EPS
    rope_theta: float = DEFAULT_ROPE_THETA
    #: HF-style rope scaling, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None for plain RoPE.
    rope_scaling: Mapping[str, Any] | None = None
    #: fraction of each head's dimensions that RoPE rotates (the first ones; Nemotron: 0.5)
    rotary_percent: float = 1.0
    max_position_embeddings: int = DEFAULT_MAX_POSITION_EMBEDDINGS
    tie_embeddings: bool = False
    #: MLP: "swiglu" (gated: gate, up, down) or "squared_relu" (up, down; no gate)
    activation: str = "swiglu"
    #: "RMSNorm" (weight) or "LayerNorm" (weight and bias)
    normalization: str = "RMSNorm"
    #: norm weights stored as gamma - 1 (megatron's layernorm_zero_centered_gamma, HF's "1p")
    zero_centered_gamma: bool = False
    qkv_bias: bool = False
    #: per-head norm (over head_dim) of queries and keys before RoPE
    qk_norm: bool = False
    #: routed experts per layer (0: a dense model; otherwise every layer is a MoE layer)
    num_experts: int = 0
    #: experts each token is routed to
    moe_top_k: int = 0
    #: width of each routed expert's MLP
    moe_ffn_hidden_size: int = 0
    #: width of the shared expert every token passes through (0: none)
    moe_shared_ffn_hidden_size: int = 0
    #: the shared expert's output is scaled by sigmoid(x . w) (Qwen2-MoE)
    moe_shared_expert_gate: bool = False
    #: the top-k router probabilities are renormalised to sum to 1 (Mixtral; Qwen's norm_topk_prob)
    moe_normalize_top_k: bool = True
    #: weight of the router's load-balancing loss per layer in training (HF's router_aux_loss_coef)
    moe_aux_loss_coeff: float = 0.0
    #: the routed experts' weights are multiplied by this (Nemotron 3's routed_scaling_factor)
    moe_routed_scaling_factor: float = 1.0
    #: hybrid models: one symbol per layer, megatron's hybrid_override_pattern (M Mamba-2 mixer,
    #: * attention, - MLP, E mixture of experts); "" for a decoder whose every layer is attention + MLP
    hybrid_pattern: str = ""
    #: Mamba-2 mixers: heads, channels per head, B/C groups (heads of a group share B and C),
    #: state size, causal conv width, and the scan's chunk length (arithmetic only: the
    #: function is the same at any chunk length, the rounding is not)
    mamba_num_heads: int = 0
    mamba_head_dim: int = 0
    mamba_num_groups: int = 0
    mamba_state_dim: int = 0
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 128
    #: heterogeneous models: one shape per layer (query groups, MLP width; 0 removes that
    #: part); () for a model whose layers are all alike
    layer_shapes: tuple[LayerShape, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        fam = family(self.architecture)
        # JSON and Python callers may give lists of dicts or pairs: store LayerShapes
        object.__setattr__(self, "layer_shapes", tuple(_as_layer_shape(v, i)
                                                       for i, v in enumerate(self.layer_shapes or ())))
        positive = ["vocab_size", "hidden_size", "num_layers", "num_attention_heads", "head_dim"]
        if not self.is_heterogeneous:  # a per-layer model's are its widest layer's (checked with the layers)
            positive += ["num_query_groups"] + (["ffn_hidden_size"] if self.has_dense_mlp else [])
        for field in positive:
            value = getattr(self, field)
            require(isinstance(value, int) and value > 0, f"model {field} must be a positive integer, got {value!r}")
        self._check_experts(fam.moe or (fam.hybrid and hybrid.MOE in self.hybrid_pattern))
        if self.is_heterogeneous:
            self._check_layer_shapes()
        require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"attention heads ({self.num_attention_heads}) must be a multiple of query groups "
            f"({self.num_query_groups})",
        )
        require(self.activation in ACTIVATIONS,
                f"model activation '{self.activation}' is not supported (supported: {', '.join(ACTIVATIONS)})")
        require(self.normalization in NORMALIZATIONS, f"model normalization '{self.normalization}' is not "
                                                      f"supported (supported: {', '.join(NORMALIZATIONS)})")
        for key, value in fam.feature_values().items():
            require(getattr(self, key) == value,
                    f"a {self.architecture} model has {key}={value!r}, this description {getattr(self, key)!r}")
        require(0 < self.rotary_percent <= 1 and self.rotary_dim > 0 and self.rotary_dim % 2 == 0,
                f"rotary_percent {self.rotary_percent} of head_dim {self.head_dim} must give an even number "
                "of rotated dimensions")
        require(fam.partial_rotary is not None or self.rotary_percent == 1.0,
                f"a {self.architecture} model rotates whole heads (rotary_percent 1.0, got {self.rotary_percent})")
        require(fam.hybrid == self.is_hybrid, f"a {self.architecture} model " + (
            "has a hybrid layer pattern" if fam.hybrid else f"has no hybrid layer pattern (got {self.hybrid_pattern!r})"))
        if self.is_hybrid:
            hybrid.check_description(self)
        require(not fam.heterogeneous or self.is_heterogeneous,
                f"a {self.architecture} model has per-layer shapes (layer_shapes)")

    def _check_layer_shapes(self) -> None:
        shapes = self.layer_shapes
        require(not self.is_moe and not self.is_hybrid,
                "per-layer shapes (layer_shapes) are supported for dense decoders, not mixtures of experts or hybrids")
        require(len(shapes) == self.num_layers, f"model layer_shapes has {len(shapes)} entries, the model "
                                                f"{self.num_layers} layers")
        for i, s in enumerate(shapes):
            for field in ("num_query_groups", "ffn_hidden_size"):
                value = getattr(s, field)
                require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                        f"layer {i}: {field} must be a whole number >= 0, got {value!r}")
            require(not s.has_attention or self.num_attention_heads % s.num_query_groups == 0,
                    f"layer {i}: query groups ({s.num_query_groups}) must divide the attention heads "
                    f"({self.num_attention_heads}); allowed: 0 (attention removed), "
                    + ", ".join(map(str, divisors(self.num_attention_heads))))
        require(any(s.has_attention for s in shapes), "per-layer shapes remove the attention of every layer: "
                                                      "at least one layer must keep attention")
        widest = (max(s.num_query_groups for s in shapes), max(s.ffn_hidden_size for s in shapes))
        require((self.num_query_groups, self.ffn_hidden_size) == widest,
                f"a per-layer model's num_query_groups and ffn_hidden_size are its widest layer's {widest}, got "
                f"{(self.num_query_groups, self.ffn_hidden_size)} (ModelDescription.replace sets them)")

    def _check_experts(self, moe_family: bool) -> None:
        moe_fields = ("num_experts", "moe_top_k", "moe_ffn_hidden_size", "moe_shared_ffn_hidden_size")
        if not moe_family:
            what = "without MoE layers (E) " if self.is_hybrid else ""
            require(all(getattr(self, f) == 0 for f in moe_fields),
                    f"a {self.architecture} model {what}has no experts (num_experts 0, got {self.num_experts})")
            return
        for field in moe_fields:
            value = getattr(self, field)
            require(isinstance(value, int) and value >= 0, f"model {field} must be a whole number >= 0, got {value!r}")
        require(self.num_experts >= 1 and self.moe_ffn_hidden_size >= 1,
                f"a {self.architecture} model needs experts (num_experts {self.num_experts}, moe_ffn_hidden_size "
                f"{self.moe_ffn_hidden_size})")
        require(1 <= self.moe_top_k <= self.num_experts,
                f"top-k {self.moe_top_k} must be 1..{self.num_experts} (the model's experts)")
        if self.sigmoid_router:
            # megatron-core's sigmoid router renormalises the top-k weights exactly when k > 1
            require(self.moe_normalize_top_k == (self.moe_top_k > 1),
                    f"top-k {self.moe_top_k} with{'' if self.moe_normalize_top_k else 'out'} renormalised weights "
                    f"(norm_topk_prob={self.moe_normalize_top_k}) is not supported: megatron-core's sigmoid router "
                    "renormalises the top-k weights exactly when top-k > 1")
        else:
            # renormalised top-1 weights are always 1 (no gradient reaches the router): megatron-core
            # refuses top-1 without moe_router_pre_softmax
            require(self.moe_top_k >= 2 or not self.moe_normalize_top_k,
                    f"top-k 1 with renormalised top-k probabilities (a {self.architecture} model's routing) is not "
                    "supported: megatron-core refuses it")
        require(self.moe_routed_scaling_factor > 0,
                f"model moe_routed_scaling_factor must be > 0, got {self.moe_routed_scaling_factor}")
        require(not self.moe_shared_expert_gate or self.moe_shared_ffn_hidden_size > 0,
                f"a {self.architecture} model has a shared expert (moe_shared_ffn_hidden_size > 0)")
        if self.is_hybrid:  # MoE layers beside dense ones; experts are MLPs of the model's activation
            return
        require(self.ffn_hidden_size == 0, f"a {self.architecture} model has no dense MLP (ffn_hidden_size 0, got "
                                           f"{self.ffn_hidden_size})")
        require(self.gated, "experts are SwiGLU MLPs")

    # ------------------------------------------------------------------ derived shapes
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_hybrid(self) -> bool:
        return bool(self.hybrid_pattern)

    @property
    def is_heterogeneous(self) -> bool:
        """Layers of different shapes (``layer_shapes``), built with megatron-core's heterogeneous config."""
        return bool(self.layer_shapes)

    def require_uniform(self, what: str) -> None:
        """A one-line refusal of a stage that does not handle per-layer shapes yet."""
        require(not self.is_heterogeneous, f"{what} of a model with per-layer shapes ({self.architecture}) is not "
                                           "supported yet")

    def layer_shape(self, layer: int) -> LayerShape:
        """The shape of layer ``layer`` (0-based), for uniform models too."""
        if self.layer_shapes:
            return self.layer_shapes[layer]
        return LayerShape(self.num_query_groups, self.ffn_hidden_size)

    def all_layer_shapes(self) -> tuple[LayerShape, ...]:
        return tuple(self.layer_shape(i) for i in range(self.num_layers))

    @property
    def has_dense_mlp(self) -> bool:
        """Some layer has a dense MLP (every layer of a dense GPT model; ``-`` layers of a hybrid)."""
        return hybrid.MLP in self.hybrid_pattern if self.is_hybrid else not self.is_moe

    @property
    def sigmoid_router(self) -> bool:
        """Experts are chosen by sigmoid scores plus a per-expert bias (the family's ``moe_router``)."""
        return family(self.architecture).moe_router == "sigmoid"

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def padded_vocab_size(self) -> int:
        return int(math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE)

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (the first ones), as HF and megatron round it."""
        return int(self.head_dim * self.rotary_percent)

    @property
    def gated(self) -> bool:
        """The MLP's first linear is [gate; up] (SwiGLU)."""
        return self.activation == "swiglu"

    @property
    def mlp_matrices(self) -> int:
        """hidden x ffn matrices per MLP: gate, up, down (gated) or up, down."""
        return 3 if self.gated else 2

    def norm_parameters(self, size: int) -> int:
        """Parameters of one norm over ``size`` channels (LayerNorm has a bias)."""
        return size * (2 if self.normalization == "LayerNorm" else 1)

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim

    def mlp_widths(self) -> list[tuple[str, int]]:
        """The MLP widths tensor parallelism splits: the dense MLP's, or each expert's and the shared one's."""
        dense = [("ffn hidden size", self.ffn_hidden_size)] if self.has_dense_mlp else []
        if not self.is_moe:
            return dense
        shared = [("shared expert's ffn hidden size", self.moe_shared_ffn_hidden_size)]
        return dense + [("experts' ffn hidden size", self.moe_ffn_hidden_size)] + (
            shared if self.moe_shared_ffn_hidden_size else [])

    def replace(self, **changes: Any) -> "ModelDescription":
        """A copy with ``changes``; new non-empty ``layer_shapes`` also set the model-wide
        num_query_groups / ffn_hidden_size to the widest layer's unless given."""
        shapes = changes.get("layer_shapes")
        if shapes:
            shapes = tuple(_as_layer_shape(v, i) for i, v in enumerate(shapes))
            changes["layer_shapes"] = shapes
            changes.setdefault("num_query_groups", max(s.num_query_groups for s in shapes))
            changes.setdefault("ffn_hidden_size", max(s.ffn_hidden_size for s in shapes))
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ counting
    def attention_parameters(self, num_query_groups: int | None = None) -> int:
        """One layer's attention (its norm excluded), with ``num_query_groups`` (default the model's; 0: none)."""
        groups = self.num_query_groups if num_query_groups is None else num_query_groups
        if groups == 0:
            return 0
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, groups * d
        attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        return attention + (2 * self.norm_parameters(d) if self.qk_norm else 0)  # q and k norms, shared by heads

    def dense_mlp_parameters(self, ffn_hidden_size: int | None = None) -> int:
        """One dense MLP of width ``ffn_hidden_size`` (default the model's)."""
        return self.mlp_matrices * self.hidden_size * (self.ffn_hidden_size if ffn_hidden_size is None else ffn_hidden_size)

    def mlp_parameters(self, active: bool = False, ffn_hidden_size: int | None = None) -> int:
        """One layer's MLP: the dense MLP (of width ``ffn_hidden_size``, default the model's),
        or router + experts (``active``: the top-k a token uses) + the shared expert and its gate
        (a sigmoid router's expert bias is a buffer, not a parameter, as in transformers)."""
        h, m = self.hidden_size, self.mlp_matrices
        if not self.is_moe:
            return self.dense_mlp_parameters(ffn_hidden_size)
        experts = self.moe_top_k if active else self.num_experts
        shared = m * h * self.moe_shared_ffn_hidden_size + (h if self.moe_shared_expert_gate else 0)
        return self.num_experts * h + experts * m * h * self.moe_ffn_hidden_size + shared

    def parameters_per_layer(self, active: bool = False) -> int:
        return self.attention_parameters() + self.mlp_parameters(active) + 2 * self.norm_parameters(self.hidden_size)

    def embedding_parameters(self) -> int:
        """Input embedding plus output layer (counted once when tied); true vocabulary."""
        per_table = self.vocab_size * self.hidden_size
        return per_table if self.tie_embeddings else 2 * per_table

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count exactly as the exported Hugging Face model reports it; ``active``:
        only those one token uses (a mixture of experts' top-k experts, not all of them)."""
        if self.is_hybrid:
            layers = sum(n * hybrid.layer_parameters(self, symbol, active)
                         for symbol, n in hybrid.kind_counts(self.hybrid_pattern).items())
        elif self.is_heterogeneous:
            layers = sum(layer_costs(self, s).parameters for s in self.layer_shapes)
        else:
            layers = self.num_layers * self.parameters_per_layer(active)
        return self.embedding_parameters() + layers + self.norm_parameters(self.hidden_size)

    def num_active_parameters(self) -> int:
        return self.num_parameters(active=True)

    def flops_per_token(self, seq_len: int = DEFAULT_SEQ_LEN) -> int:
        """Forward FLOPs per token: 2 per weight of every matrix product (the output layer
        included, the embedding lookup excluded) plus attention scores and values over a
        causal context of ``seq_len`` (on average seq_len / 2 keys per query)."""
        if self.is_heterogeneous:
            layers = sum(layer_costs(self, s, seq_len).flops_per_token for s in self.layer_shapes)
            return int(layers + self.output_layer_flops_per_token())
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        if self.is_hybrid:  # each layer one kind; Mamba mixers: see hybrid.mixer_flops_per_token
            attention_layers = self.hybrid_pattern.count(hybrid.ATTENTION)
            mlp_weights = (self.hybrid_pattern.count(hybrid.MLP) * self.dense_mlp_parameters()
                           + self.hybrid_pattern.count(hybrid.MOE) * (self.mlp_parameters(active=True) if self.is_moe
                                                                      else 0))
            mixers = self.hybrid_pattern.count(hybrid.MAMBA) * hybrid.mixer_flops_per_token(self)
        else:
            attention_layers = self.num_layers
            mlp_weights = self.num_layers * self.mlp_parameters(active=True)
            mixers = 0
        # a mixture of experts multiplies by its router, top-k experts and shared expert (and gate)
        matmul_weights = attention_layers * (h * q + 2 * h * kv + q * h) + mlp_weights
        attention = attention_layers * 2 * 2 * q * (seq_len / 2)
        return int(2 * matmul_weights + attention + mixers + self.output_layer_flops_per_token())

    def output_layer_flops_per_token(self) -> int:
        """The FLOPs per token outside the decoder layers: the output layer's product (true
        vocabulary x hidden); the embedding lookup and the final norm count none."""
        return 2 * self.vocab_size * self.hidden_size

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        if self.is_heterogeneous:
            return sum(layer_costs(self, s, bytes_per_element=bytes_per_element).kv_cache_bytes_per_token
                       for s in self.layer_shapes)
        attention_layers = self.hybrid_pattern.count("*") if self.is_hybrid else self.num_layers
        return 2 * attention_layers * self.num_query_groups * self.head_dim * bytes_per_element

    def ssm_state_bytes(self, bytes_per_element: int = 2) -> int:
        """Recurrent state per sequence of a hybrid model's Mamba layers (0 for others)."""
        return hybrid.ssm_state_bytes(self, bytes_per_element) if self.is_hybrid else 0

    # ------------------------------------------------------------------ layout rules
    def check_layout(self, tp: int, pp: int) -> None:
        """Raise a one-line UsageError when --tp/--pp cannot hold this model."""
        require(tp >= 1 and pp >= 1, f"--tp and --pp must be >= 1, got --tp {tp} --pp {pp}")
        widths = self.mlp_widths()
        for what, n in (("query groups", self.num_query_groups), ("attention heads", self.num_attention_heads),
                        *widths):
            if n % tp:
                ok = [t for t in divisors(self.num_query_groups) if self.num_attention_heads % t == 0
                      and all(w % t == 0 for _, w in widths) and self.padded_vocab_size % t == 0]
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
        if self.is_hybrid:
            hybrid.check_layout(self, tp, pp)
        for i, shape in enumerate(self.layer_shapes):
            for what, n in (("query groups", shape.num_query_groups), ("ffn hidden size", shape.ffn_hidden_size)):
                require(n % tp == 0, f"--tp {tp} does not divide layer {i}'s {what} ({n}); allowed --tp values: "
                        + ", ".join(str(t) for t in self._per_layer_tp_sizes()))

    def _per_layer_tp_sizes(self) -> list[int]:
        return [t for t in divisors(self.num_attention_heads) if self.padded_vocab_size % t == 0
                and all(s.num_query_groups % t == 0 and s.ffn_hidden_size % t == 0 for s in self.layer_shapes)]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layer_shapes"] = [dataclasses.asdict(s) for s in self.layer_shapes]
        if out["rope_scaling"] is not None:
            out["rope_scaling"] = dict(out["rope_scaling"])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelDescription":
        data = dict(data)
        # checkpoints written before sliding windows were refused stored this key as null
        require(data.pop("sliding_window", None) is None, "sliding-window attention is not supported")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        require(not unknown, f"unknown model description keys: {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def fingerprint(self) -> dict[str, Any]:
        """The shape facts that importance scores must match to be applied to a model."""
        keys = ("architecture", "vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                "num_query_groups", "head_dim")
        if self.is_moe:  # dense fingerprints stay as they were written before experts existed
            keys += ("num_experts", "moe_ffn_hidden_size", "moe_shared_ffn_hidden_size")
        if self.is_hybrid:
            keys += ("hybrid_pattern", "mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim")
        out = {k: getattr(self, k) for k in keys}
        if self.is_heterogeneous:
            out["layer_shapes"] = [[s.num_query_groups, s.ffn_hidden_size] for s in self.layer_shapes]
        return out

    def summary(self) -> str:
        features = [f for f, on in (
            ("tied embeddings", self.tie_embeddings), ("squared-ReLU MLP", self.activation == "squared_relu"),
            ("LayerNorm" + (" (zero-centred gamma)" if self.zero_centered_gamma else ""),
             self.normalization == "LayerNorm"),
            ("QKV bias", self.qkv_bias), ("QK-norm", self.qk_norm),
            (f"RoPE on {self.rotary_percent:.0%} of head dims", self.rotary_percent != 1.0),
            (f"layers {self.hybrid_pattern}, Mamba heads {self.mamba_num_heads} x {self.mamba_head_dim} in "
             f"{self.mamba_num_groups} groups, state {self.mamba_state_dim}", self.is_hybrid)) if on]
        if self.is_moe:
            dense = f"ffn {self.ffn_hidden_size} (MLP layers), " if self.has_dense_mlp else ""  # a hybrid's - layers
            mlp = (dense + f"{self.num_experts} experts (top-{self.moe_top_k}) of width {self.moe_ffn_hidden_size}"
                   + (f" + shared expert {self.moe_shared_ffn_hidden_size}" if self.moe_shared_ffn_hidden_size else ""))
            size = f"{self.num_parameters() / 1e6:.1f}M params ({self.num_active_parameters() / 1e6:.1f}M active)"
        elif self.is_heterogeneous:
            mlp = "per-layer ffn " + "/".join(str(s.ffn_hidden_size) for s in self.layer_shapes)
            size = f"{self.num_parameters() / 1e6:.1f}M params"
        else:
            mlp, size = f"ffn {self.ffn_hidden_size}", f"{self.num_parameters() / 1e6:.1f}M params"
        return (f"{self.architecture} {size}: layers {self.num_layers}, "
                f"hidden {self.hidden_size}, {mlp}, heads {self.num_attention_heads}, "
                f"query groups {self._groups_summary()}, head dim {self.head_dim}, vocab {self.vocab_size}"
                + "".join(f", {f}" for f in features))


    def _groups_summary(self) -> str:
        if not self.is_heterogeneous:
            return str(self.num_query_groups)
        return "per-layer " + "/".join(str(s.num_query_groups) for s in self.layer_shapes) + " (0: removed)"


def layer_costs(desc: ModelDescription, shape: LayerShape, seq_len: int = DEFAULT_SEQ_LEN,
                bytes_per_element: int = 2) -> LayerCosts:
    """What one decoder layer of ``shape`` costs in the model ``desc`` (whose hidden size,
    heads, head_dim, activation and norms it takes): parameters (as the exported Hugging Face
    model counts them, its norms included: a removed attention or MLP takes its norm with
    it), forward FLOPs per token (2 per weight of every matrix product, plus attention
    scores and values over a causal context of ``seq_len``, on average seq_len / 2 keys)
    and KV-cache bytes per token (``bytes_per_element`` each). The sum over a model's layers
    plus the embeddings, final norm and output layer is ``num_parameters`` / ``flops_per_token``
    / ``kv_cache_bytes_per_token`` of a heterogeneous ``desc``. Dense decoders only."""
    require(not desc.is_moe and not desc.is_hybrid, "layer_costs counts dense decoder layers")
    h, d = desc.hidden_size, desc.head_dim
    g, f = shape.num_query_groups, shape.ffn_hidden_size
    q, kv = desc.num_attention_heads * d, g * d
    norm = desc.norm_parameters(h)
    parameters = (desc.attention_parameters(g) + (norm if g else 0)
                  + desc.mlp_parameters(ffn_hidden_size=f) + (norm if f else 0))
    attention_flops = (2 * (h * q + 2 * h * kv + q * h) + 2 * 2 * q * (seq_len / 2)) if g else 0
    flops = attention_flops + 2 * desc.mlp_matrices * h * f
    return LayerCosts(parameters=int(parameters), flops_per_token=int(flops),
                      kv_cache_bytes_per_token=2 * kv * bytes_per_element)
