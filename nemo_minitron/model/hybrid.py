"""Hybrid Mamba-Transformer models (Nemotron-H) as data: the layer pattern and the shapes of
the Mamba-2 mixer, what they count, and how tensor parallelism splits the mixer's tensors.

A hybrid model's layers are one of (megatron-core's ``hybrid_override_pattern`` symbols):
``M`` a Mamba-2 mixer, ``*`` self-attention, ``-`` an MLP, ``E`` a mixture of experts; each
is a pre-norm residual block of its own (no layer holds both attention and an MLP).
A Mamba-2 mixer of ``heads`` heads of ``head_dim`` channels (d_inner = heads x head_dim),
``groups`` groups of B/C state vectors of ``state_dim`` each and a causal conv of width
``conv_kernel`` holds (HF ``NemotronHMamba2Mixer`` = megatron-core ``MambaMixer``):
  in_proj   [2 d_inner + 2 groups state_dim + heads, hidden]   rows [z, x, B, C, dt]
  conv1d    weight [d_inner + 2 groups state_dim, 1, kernel], bias [same]   channels [x, B, C]
  A_log, D, dt_bias   [heads]
  norm      [d_inner]   gated RMSNorm over each group's d_inner / groups channels
  out_proj  [hidden, d_inner]
Tensor parallelism (megatron-core): every rank holds ``heads / tp`` heads and ``groups /
tp`` groups, so in_proj's rows and conv1d's channels are split *section by section* (rank r
holds the r-th part of z, of x, of B, of C and of dt, concatenated), A_log/D/dt_bias/norm
are split plainly, out_proj by columns (``tp_sections`` gives the sections).

Pure code on descriptions; no megatron-core import (``model/mamba.py`` builds the model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

from nemo_minitron.errors import UsageError, require

if TYPE_CHECKING:
    from nemo_minitron.model.description import ModelDescription

MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
LAYER_KINDS = {MAMBA: "Mamba-2 mixer", ATTENTION: "attention", MLP: "MLP", MOE: "mixture of experts"}
#: symbols this project builds, converts and exports (MoE layers: not yet)
SUPPORTED_SYMBOLS = (MAMBA, ATTENTION, MLP)
#: transformers' ``layers_block_type`` names of the symbols
BLOCK_TYPES = {"linear_attention": MAMBA, "full_attention": ATTENTION, "mlp": MLP, "moe": MOE}
#: megatron-core's MambaMixer fixes the gated norm's epsilon (HF uses layer_norm_epsilon for it)
MIXER_NORM_EPS = 1e-5


def check_pattern(pattern: Any, key: str = "hybrid_override_pattern") -> str:
    """A layer pattern of supported symbols, or a one-line error naming ``key``."""
    require(isinstance(pattern, str) and pattern, f"{key} must be a non-empty string of layer symbols, "
                                                  f"got {pattern!r}")
    for symbol in dict.fromkeys(pattern):
        if symbol not in SUPPORTED_SYMBOLS:
            what = f" ({LAYER_KINDS[symbol]} layers are not supported yet)" if symbol in LAYER_KINDS else ""
            raise UsageError(f"{key} {pattern!r}: layer symbol {symbol!r} is not supported{what}; supported: "
                             + ", ".join(f"{s} {LAYER_KINDS[s]}" for s in SUPPORTED_SYMBOLS))
    return pattern


def pattern_from_block_types(block_types: Iterable[str], key: str = "layers_block_type") -> str:
    """transformers 5's ``layers_block_type`` list as a pattern string."""
    block_types = list(block_types)
    unknown = sorted({str(t) for t in block_types if t not in BLOCK_TYPES})
    if unknown:
        raise UsageError(f"{key}: unknown layer type {unknown[0]!r} (known: {', '.join(BLOCK_TYPES)})")
    return "".join(BLOCK_TYPES[t] for t in block_types)


def block_types_from_pattern(pattern: str) -> list[str]:
    names = {symbol: name for name, symbol in BLOCK_TYPES.items()}
    return [names[s] for s in pattern]


def kind_counts(pattern: str) -> dict[str, int]:
    """Layers of each supported kind in ``pattern``: {"M": n, "*": n, "-": n}."""
    return {symbol: pattern.count(symbol) for symbol in SUPPORTED_SYMBOLS}


def kept_pattern(pattern: str, kept_layers: Sequence[int]) -> str:
    """The pattern of the layers kept (original indices, ascending)."""
    return "".join(pattern[i] for i in kept_layers)


def provisional_pattern(pattern: str, counts: dict[str, int]) -> str:
    """A pattern with ``counts`` layers of each kind, each kind losing its last layers: the
    stand-in for a depth cut whose layers importance has not chosen yet (the parameter
    count depends on how many layers of each kind remain, not on which)."""
    seen = dict.fromkeys(SUPPORTED_SYMBOLS, 0)
    out = []
    for symbol in pattern:
        seen[symbol] += 1
        if seen[symbol] <= counts[symbol]:
            out.append(symbol)
    return "".join(out)


# ---------------------------------------------------------------------- mixer shapes
def d_inner(desc: "ModelDescription") -> int:
    return desc.mamba_num_heads * desc.mamba_head_dim


def bc_channels(desc: "ModelDescription") -> int:
    """Channels of B (and of C): one state vector per group."""
    return desc.mamba_num_groups * desc.mamba_state_dim


def conv_channels(desc: "ModelDescription") -> int:
    return d_inner(desc) + 2 * bc_channels(desc)


def in_proj_rows(desc: "ModelDescription") -> int:
    return 2 * d_inner(desc) + 2 * bc_channels(desc) + desc.mamba_num_heads


def tp_sections(desc: "ModelDescription", name: str) -> list[int] | None:
    """The row sections of a fused mixer tensor, each split over the TP ranks on its own
    (in_proj: z, x, B, C, dt; conv1d: x, B, C); None for every other tensor."""
    if not desc.is_hybrid:
        return None
    if name.endswith("mixer.in_proj.weight"):
        return [d_inner(desc), d_inner(desc), bc_channels(desc), bc_channels(desc), desc.mamba_num_heads]
    if name.endswith(("mixer.conv1d.weight", "mixer.conv1d.bias")):
        return [d_inner(desc), bc_channels(desc), bc_channels(desc)]
    return None


def mixer_parameters(desc: "ModelDescription") -> int:
    """One Mamba-2 mixer (its input norm excluded): in/out projections, conv, A_log, D,
    dt_bias, gated norm."""
    h, inner, heads = desc.hidden_size, d_inner(desc), desc.mamba_num_heads
    conv = conv_channels(desc) * (desc.mamba_conv_kernel + 1)  # weight and bias
    return h * in_proj_rows(desc) + conv + 3 * heads + inner + inner * h


def layer_parameters(desc: "ModelDescription", symbol: str, active: bool = False) -> int:
    """One layer of the pattern, its (RMS) input norm included."""
    body = {MAMBA: mixer_parameters, ATTENTION: lambda d: d.attention_parameters(),
            MLP: lambda d: d.mlp_parameters(active)}[symbol](desc)
    return body + desc.norm_parameters(desc.hidden_size)


def mixer_flops_per_token(desc: "ModelDescription") -> int:
    """Forward FLOPs of one mixer per token: projections (2 per weight), the conv, and the
    SSD recurrence's state update and read-out (state x head_dim per head, 2 each)."""
    projections = desc.hidden_size * (in_proj_rows(desc) + d_inner(desc))
    scan = 2 * 2 * d_inner(desc) * desc.mamba_state_dim
    return 2 * projections + 2 * conv_channels(desc) * desc.mamba_conv_kernel + scan


def ssm_state_bytes(desc: "ModelDescription", bytes_per_element: int = 2) -> int:
    """Recurrent state of one sequence over all Mamba layers (independent of its length):
    the SSM state (heads x head_dim x state) and the conv window (channels x (kernel - 1))."""
    per_layer = d_inner(desc) * desc.mamba_state_dim + conv_channels(desc) * (desc.mamba_conv_kernel - 1)
    return desc.hybrid_pattern.count(MAMBA) * per_layer * bytes_per_element


# ---------------------------------------------------------------------- checks and megatron settings
def check_description(desc: "ModelDescription") -> None:
    """Shape rules of a hybrid description (called by ModelDescription)."""
    pattern = check_pattern(desc.hybrid_pattern, "hybrid pattern")
    require(len(pattern) == desc.num_layers,
            f"hybrid pattern {pattern!r} has {len(pattern)} layers, the model {desc.num_layers}")
    for field in ("mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim", "mamba_conv_kernel",
                  "mamba_chunk_size"):
        value = getattr(desc, field)
        require(isinstance(value, int) and value > 0, f"model {field} must be a positive integer, got {value!r}")
    require(desc.mamba_num_heads % desc.mamba_num_groups == 0,
            f"Mamba heads ({desc.mamba_num_heads}) must be a multiple of Mamba groups ({desc.mamba_num_groups}): "
            "the heads of a group share its B and C")
    require(desc.norm_eps == MIXER_NORM_EPS, f"a hybrid model's norm epsilon must be {MIXER_NORM_EPS} (megatron-core's "
                                             f"Mamba mixer fixes its gated norm's), got {desc.norm_eps}")


def check_layout(desc: "ModelDescription", tp: int, pp: int) -> None:
    """The layout rules a hybrid model adds: whole heads and groups per TP rank, and equal
    pipeline stages (megatron-core's MambaStack splits the pattern evenly)."""
    for what, n in (("Mamba heads", desc.mamba_num_heads), ("Mamba groups", desc.mamba_num_groups)):
        require(n % tp == 0, f"--tp {tp} does not divide the model's {what} ({n}); allowed --tp values: "
                             + ", ".join(str(t) for t in range(1, n + 1) if desc.mamba_num_heads % t == 0
                                         and desc.mamba_num_groups % t == 0))
    require(desc.num_layers % pp == 0,
            f"--pp {pp} does not divide the hybrid model's {desc.num_layers} layers (megatron-core's MambaStack "
            "puts the same number on every stage); allowed --pp values: "
            + ", ".join(str(p) for p in range(1, desc.num_layers + 1) if desc.num_layers % p == 0))


def check_stages(desc: "ModelDescription", layers_per_stage: Sequence[int]) -> None:
    require(len(set(layers_per_stage)) == 1, f"a hybrid model's pipeline stages hold equal numbers of layers "
                                             f"(megatron-core's MambaStack); got {list(layers_per_stage)}")


def mamba_config(desc: "ModelDescription") -> dict[str, Any]:
    """megatron-core's TransformerConfig settings of the Mamba mixers (empty for other models)."""
    if not desc.is_hybrid:
        return {}
    return dict(mamba_num_heads=desc.mamba_num_heads, mamba_head_dim=desc.mamba_head_dim,
                mamba_num_groups=desc.mamba_num_groups, mamba_state_dim=desc.mamba_state_dim,
                is_hybrid_model=True)


#: megatron-core's module names under ``decoder.layers.{i}.`` in each kind of layer
_LAYER_MODULES = {MAMBA: ("norm.", "mixer."), ATTENTION: ("input_layernorm.", "self_attention."),
                  MLP: ("pre_mlp_layernorm.", "mlp.")}


def layer_holds(desc: "ModelDescription", layer: int, name: str) -> bool:
    """Whether layer ``layer`` has the weight ``name`` (``decoder.layers.{i}.<module>...``):
    in a hybrid model only those of the layer's kind; in a heterogeneous one those of the
    parts (attention, MLP) the layer keeps; in others every layer has every weight."""
    module = name.split(".", 3)[3]
    if desc.is_heterogeneous:
        shape = desc.layer_shape(layer)
        if module.startswith(_LAYER_MODULES[ATTENTION]):
            return shape.has_attention
        return shape.has_mlp or not module.startswith(_LAYER_MODULES[MLP])
    if not desc.is_hybrid:
        return True
    return module.startswith(_LAYER_MODULES[desc.hybrid_pattern[layer]])


def not_yet(desc: "ModelDescription", what: str) -> None:
    """A one-line refusal of a stage that does not handle hybrid models yet."""
    require(not desc.is_hybrid, f"{what} of a hybrid Mamba-Transformer model ({desc.architecture}) is not "
                                "supported yet")
