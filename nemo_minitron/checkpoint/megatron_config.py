"""Megatron model configurations <-> ``ModelDescription``, through one table.

A Megatron checkpoint states its model in one of three vocabularies:

- Megatron-LM: the ``args`` Namespace in ``common.pt`` (argument names, read by
  ``megatron/training/checkpointing.py: load_args_from_checkpoint`` and turned into a
  ``TransformerConfig`` by ``megatron/training/argument_utils.py:
  core_transformer_config_from_args``; ``gpt_builders.py: gpt_builder`` reads the rest);
- Megatron-Bridge: ``run_config.yaml``'s ``model:`` section, a ``GPTModelProvider``
  (``megatron/bridge/models/gpt_provider.py``: TransformerConfig fields plus GPT fields);
- NeMo 2: ``context/model.yaml``'s ``config:`` section, a ``GPTConfig``/``LlamaConfig``
  (``nemo/collections/llm/gpt/model/{base,llama}.py``: the same TransformerConfig fields).

``normalize_args`` first rewrites Megatron-LM's argument names into the TransformerConfig
vocabulary the other two use; ``FIELDS`` then maps that vocabulary onto
``ModelDescription``'s shape fields, ``features`` reads the features a family fixes
(MLP activation, norm, zero-centred gamma, QKV bias, QK-norm; the family is the one
``nemo_minitron.families.family_with`` finds), and ``FIXED`` lists every setting whose
other values no description can express (MLA, biases on every linear ...): reading
one is an error naming the field. Mixtures of experts (``num_moe_experts``) are read by
``moe_fields`` (GPT: Mixtral, Qwen3-MoE, Qwen2-MoE; hybrid ``E`` layers: Nemotron 3).
Absent keys take megatron-core's defaults
(``DEFAULTS``). Writing goes the other way (``megatron_lm_args``,
``bridge_model_section``).

Hybrid Mamba-Transformer models (megatron-core's ``MambaModel``, Nemotron-H) are told by
their layer pattern: Megatron-LM's ``hybrid_override_pattern`` argument (renamed
``hybrid_layer_pattern`` in 2026), Megatron-Bridge's ``MambaModelProvider`` /
``HybridModelProvider`` field of either name (``NemotronHBridge.CONFIG_MAPPING``). Their
settings are turned into the Hugging Face ``NemotronHConfig`` keys Bridge's
``megatron_to_hf_config`` writes, and read by the ``nemotron_h`` family table like any
Hugging Face config (``hybrid_description``).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Mapping

import torch

from nemo_minitron.checkpoint.hf_format import description_from_hf_config
from nemo_minitron.errors import UsageError, require
from nemo_minitron.families import family, family_with, nemotron_nas
from nemo_minitron.model import hybrid
from nemo_minitron.model.builder import moe_config
from nemo_minitron.model.description import ModelDescription

#: ModelDescription field <- TransformerConfig / GPTModelProvider key. ``None`` in the
#: config means the default in the comment.
FIELDS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",        # None: one group per head
    "head_dim": "kv_channels",                     # None: hidden_size // num_attention_heads
    "norm_eps": "layernorm_epsilon",
    "rope_theta": "rotary_base",
    "rotary_percent": "rotary_percent",
    "max_position_embeddings": "seq_length",       # GPTModel's max_sequence_length
    "tie_embeddings": "share_embeddings_and_output_weights",
}

#: megatron-core's values of the keys read here when a config omits them
#: (TransformerConfig, GPTModelProvider / GPTConfig).
DEFAULTS: dict[str, Any] = {
    "normalization": "LayerNorm", "gated_linear_unit": False, "activation_func": "gelu", "add_bias_linear": True,
    "add_qkv_bias": False, "qk_layernorm": False, "layernorm_zero_centered_gamma": False,
    "position_embedding_type": "learned_absolute", "rotary_percent": 1.0, "layernorm_epsilon": 1e-5,
    "rotary_base": 10000, "share_embeddings_and_output_weights": True,
}

#: key -> (values a ModelDescription can express, what the key is).
FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "add_bias_linear": ((False,), "biases on every linear layer"),
    "position_embedding_type": (("rope",), "the position embedding"),
    "rotary_interleaved": ((False, None), "interleaved rotary embeddings"),
    "multi_latent_attention": ((False, None), "multi-latent attention (MLA)"),
    "apply_residual_connection_post_layernorm": ((False, None), "post-norm residuals"),
    "mtp_num_layers": ((None, 0), "multi-token prediction layers"),
    "hybrid_layer_pattern": ((None, ""), "hybrid (Mamba) layers"),
    "experimental_attention_variant": ((None,), "an experimental attention variant"),
    "window_size": ((None,), "sliding-window attention"),
    "softmax_scale": ((None,), "a custom attention softmax scale"),
    "no_rope_freq": ((None,), "layers without rotary embeddings"),
}

#: MLP activation: (gated_linear_unit, activation_func name) -> ModelDescription.activation
ACTIVATIONS = {(True, "silu"): "swiglu", (False, "squared_relu"): "squared_relu"}


#: Megatron-LM argument -> TransformerConfig / provider key (argument renames of
#: core_transformer_config_from_args and of arguments.py before Jan 2026).
_ARG_RENAMES = {
    "norm_epsilon": "layernorm_epsilon",
    "apply_layernorm_1p": "layernorm_zero_centered_gamma",
    "num_experts": "num_moe_experts",
    "use_rope_scaling": "rope_scaling",
    "rotary_seq_len_interpolation_factor": "seq_len_interpolation_factor",
    "hybrid_override_pattern": "hybrid_layer_pattern",
}

# megatron-core's Llama 3 RoPE scaling (RotaryEmbedding._apply_scaling defaults)
_MCORE_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def normalize_args(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """Megatron-LM's ``args`` in TransformerConfig / provider vocabulary."""
    a = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    cfg = dict(a)
    for old, new in _ARG_RENAMES.items():
        if a.get(old) is not None and a.get(new) is None:
            cfg[new] = a[old]
    if "disable_bias_linear" in a and "add_bias_linear" not in a:
        cfg["add_bias_linear"] = not a["disable_bias_linear"]
    cfg["share_embeddings_and_output_weights"] = not a.get("untie_embeddings_and_output_weights", False)
    cfg["seq_length"] = a.get("max_position_embeddings") or a.get("seq_length")
    if a.get("swiglu"):
        cfg.update(gated_linear_unit=True, activation_func="silu")
    elif a.get("squared_relu"):
        cfg.update(gated_linear_unit=False, activation_func="squared_relu")
    elif a.get("quick_geglu"):
        cfg.update(gated_linear_unit=True, activation_func="quick_gelu")
    else:
        cfg.update(gated_linear_unit=False, activation_func="gelu")
    if not a.get("group_query_attention", False):
        cfg["num_query_groups"] = None
    return cfg


def _callable_name(value: Any) -> Any:
    """``{_target_: torch.nn.functional.silu, _call_: false}`` (YAML) or a function -> 'silu'."""
    if isinstance(value, Mapping) and "_target_" in value:
        value = value["_target_"]
    if callable(value):
        value = getattr(value, "__name__", str(value))
    return str(value).rsplit(".", 1)[-1] if isinstance(value, str) else value


def _number(value: Any, key: str, source: str, kind=float):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"{source}: {key}={value!r} is not a number") from None


def _rope_scaling(cfg: Mapping[str, Any], source: str) -> dict[str, Any] | None:
    if cfg.get("rope_scaling"):
        factor = _number(cfg.get("rope_scaling_factor", 8.0), "rope_scaling_factor", source)
        return {"rope_type": "llama3", "factor": factor, **_MCORE_LLAMA3}
    if cfg.get("old_context_len") is not None and cfg.get("scale_factor") is not None:
        # NeMo 2's Llama31Config applies Llama 3 scaling with its own four fields
        return {"rope_type": "llama3", "factor": _number(cfg["scale_factor"], "scale_factor", source),
                "low_freq_factor": _number(cfg.get("low_freq_factor", 1.0), "low_freq_factor", source),
                "high_freq_factor": _number(cfg.get("high_freq_factor", 4.0), "high_freq_factor", source),
                "original_max_position_embeddings": _number(cfg["old_context_len"], "old_context_len", source, int)}
    if cfg.get("seq_len_interpolation_factor") is not None:
        return {"rope_type": "linear",
                "factor": _number(cfg["seq_len_interpolation_factor"], "seq_len_interpolation_factor", source)}
    return None


def _same(value: Any, allowed: tuple[Any, ...]) -> bool:
    for a in allowed:
        if value == a or (isinstance(a, float) and isinstance(value, (int, float)) and math.isclose(value, a)):
            return True
    return False


def _get(cfg: Mapping[str, Any], key: str, defaults: Mapping[str, Any] = DEFAULTS) -> Any:
    value = cfg.get(key)
    return defaults.get(key) if value is None and key in defaults else value


def check_supported(cfg: Mapping[str, Any], source: str, fixed: Mapping[str, tuple] = FIXED,
                    defaults: Mapping[str, Any] = DEFAULTS) -> None:
    """A one-line error naming the first setting a ModelDescription cannot express."""
    for key, (allowed, what) in fixed.items():
        value = _get(cfg, key, defaults)
        if not _same(value, allowed):
            shown = " or ".join(repr(a) for a in allowed)
            raise UsageError(f"{source}: {key}={value!r} ({what}) is not supported ({key} must be {shown})")


def features(cfg: Mapping[str, Any], source: str, defaults: Mapping[str, Any] = DEFAULTS) -> dict[str, Any]:
    """The family features (nemo_minitron.families.DEFAULT_FEATURES) the config states."""
    gated = bool(_get(cfg, "gated_linear_unit", defaults))
    act = _callable_name(_get(cfg, "activation_func", defaults))
    activation = ACTIVATIONS.get((gated, act))
    require(activation is not None, f"{source}: activation_func={act!r} with gated_linear_unit={gated} (the MLP "
                                    "activation) is not supported (supported: silu gated, i.e. SwiGLU; squared_relu)")
    return {"activation": activation, "normalization": _get(cfg, "normalization", defaults),
            "zero_centered_gamma": bool(_get(cfg, "layernorm_zero_centered_gamma", defaults)),
            "qkv_bias": bool(_get(cfg, "add_qkv_bias", defaults)), "qk_norm": bool(_get(cfg, "qk_layernorm", defaults))}


def description_from_config(cfg: Mapping[str, Any], *, vocab_size: int, source: str, name: str = "") -> ModelDescription:
    """ModelDescription from a config in TransformerConfig / provider vocabulary."""
    if is_hybrid_config(cfg):
        return hybrid_description(cfg, vocab_size=vocab_size, source=source, name=name)
    check_supported(cfg, source)
    moe = moe_fields(cfg, source, MOE_FIXED_GPT) if cfg.get("num_moe_experts") else {}
    # the one GPT family with a shared expert (Qwen2-MoE) gates it
    require(not moe or bool(moe["moe_shared_ffn_hidden_size"]) == moe["moe_shared_expert_gate"],
            f"{source}: moe_shared_expert_intermediate_size={cfg.get('moe_shared_expert_intermediate_size')!r} with "
            f"moe_shared_expert_gate={moe.get('moe_shared_expert_gate')!r} is not supported (a GPT model's shared "
            "expert is gated, as Qwen2-MoE's)")
    feats = features(cfg, source)
    try:
        fam = family_with({**feats, "moe": bool(moe), "moe_shared_expert_gate": moe.get("moe_shared_expert_gate", False)})
    except UsageError as e:
        raise UsageError(f"{source}: {e}") from None
    for ours, key in FIELDS.items():
        if ours not in ("num_query_groups", "head_dim") and not (moe and ours == "ffn_hidden_size"):
            require(_get(cfg, key) is not None, f"{source}: {key} is missing")
    heads = _number(cfg["num_attention_heads"], "num_attention_heads", source, int)
    hidden = _number(cfg["hidden_size"], "hidden_size", source, int)
    values = {ours: _get(cfg, key) for ours, key in FIELDS.items()}
    values["num_query_groups"] = values["num_query_groups"] or heads
    values["head_dim"] = values["head_dim"] or hidden // heads
    for ours in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
                 "max_position_embeddings") + (() if moe else ("ffn_hidden_size",)):
        values[ours] = _number(values[ours], FIELDS[ours], source, int)
    for ours in ("norm_eps", "rope_theta", "rotary_percent"):
        values[ours] = _number(values[ours], FIELDS[ours], source)
    values["tie_embeddings"] = bool(values["tie_embeddings"])
    if moe:  # no dense MLP: the experts' width is moe_ffn_hidden_size (ffn_hidden_size when unset)
        values["ffn_hidden_size"] = 0
    shapes = heterogeneous_layer_shapes(cfg, heads, hidden, source)
    if shapes:  # the model-wide groups and width are the widest layer's
        values.update(layer_shapes=tuple(shapes), num_query_groups=max(g for g, _ in shapes),
                      ffn_hidden_size=max(f for _, f in shapes))
    return ModelDescription(architecture=fam.model_type, vocab_size=int(vocab_size),
                            rope_scaling=_rope_scaling(cfg, source), name=name, **feats, **values, **moe)


def heterogeneous_layer_shapes(cfg: Mapping[str, Any], heads: int, hidden: int, source: str) -> list | None:
    """Per-layer (query groups, MLP width) of a heterogeneous config
    (``heterogeneous_layers_config_encoded_json``'s ``block_configs``, as megatron-core's
    HeterogeneousTransformerConfig reads them), None for a uniform one."""
    encoded, path = cfg.get("heterogeneous_layers_config_encoded_json"), cfg.get("heterogeneous_layers_config_path")
    if not encoded:
        require(not path, f"{source}: heterogeneous_layers_config_path={path!r} without "
                          "heterogeneous_layers_config_encoded_json is not supported (the layers must be stated in "
                          "the checkpoint)")
        return None
    try:
        blocks = json.loads(encoded)
    except (TypeError, json.JSONDecodeError) as e:
        raise UsageError(f"{source}: heterogeneous_layers_config_encoded_json is not JSON ({e})") from None
    require(isinstance(blocks, dict), f"{source}: heterogeneous_layers_config_encoded_json is not a JSON object")
    try:
        return nemotron_nas.layer_shapes_from_config({**blocks, "num_attention_heads": heads, "hidden_size": hidden})
    except UsageError as e:
        raise UsageError(f"{source}: heterogeneous_layers_config_encoded_json: {e}") from None


# ---------------------------------------------------------------------- mixtures of experts
# Checked against megatron-core 0.16.1's TransformerConfig (``moe_*`` fields and defaults),
# Megatron-LM's arguments (the same names, ``--num-experts`` for num_moe_experts) and
# Megatron-Bridge d9f7643 (``models/nemotronh/nemotron_h_provider.py``: NemotronHModelProvider,
# Nemotron3NanoProvider; the Qwen3-MoE, Qwen2-MoE and Mixtral bridges' provider settings).

#: megatron-core's values of the MoE keys read here when a config omits them
MOE_DEFAULTS: dict[str, Any] = {
    "moe_router_topk": 2, "moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False,
    "moe_router_pre_softmax": False, "moe_router_topk_scaling_factor": None, "moe_aux_loss_coeff": 0.0,
    "moe_shared_expert_intermediate_size": None, "moe_shared_expert_gate": False, "moe_layer_freq": 1,
    "moe_apply_probs_on_input": False, "moe_router_force_load_balancing": False,
}
#: MoE settings no description here can state, for GPT models and hybrid ``E`` layers alike
#: (group-limited routing with one group is plain top-k routing)
_MOE_FIXED: dict[str, tuple[tuple[Any, ...], str]] = {
    "moe_router_num_groups": ((None, 0, 1), "group-limited expert routing"),
    "moe_latent_size": ((None, 0), "a latent mixture of experts"),
    "moe_expert_capacity_factor": ((None,), "an expert capacity (token dropping)"),
    "moe_apply_probs_on_input": ((False,), "routing weights applied to the experts' input"),
    "moe_router_force_load_balancing": ((False,), "forced load balancing (a benchmark mode)"),
}
#: GPT mixtures of experts (Mixtral, Qwen3-MoE, Qwen2-MoE): softmax routing in every layer
MOE_FIXED_GPT = {
    **_MOE_FIXED,
    "moe_router_score_function": (("softmax",), "the router's score function"),
    "moe_router_enable_expert_bias": ((False,), "an expert bias in a softmax router"),
    "moe_router_topk_scaling_factor": ((None, 1.0), "scaled routing weights"),
    "moe_layer_freq": ((1,), "dense MLP layers among the mixture-of-experts layers"),
}
#: hybrid E layers (Nemotron 3, as transformers' NemotronH computes them): sigmoid routing
#: with an expert bias, an ungated shared expert
MOE_FIXED_HYBRID = {
    **_MOE_FIXED,
    "moe_router_score_function": (("sigmoid",), "the router's score function"),
    "moe_router_enable_expert_bias": ((True,), "a sigmoid router without an expert bias"),
    "moe_shared_expert_gate": ((False,), "a gated shared expert"),
}


def _moe_normalized(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Forms megatron accepts for one value: a layer frequency list of all ones (every layer),
    a one-element list of load-balancing coefficients."""
    cfg = dict(cfg)
    freq = cfg.get("moe_layer_freq")
    if isinstance(freq, (list, tuple)) and freq and all(f == 1 for f in freq):
        cfg["moe_layer_freq"] = 1
    coeff = cfg.get("moe_aux_loss_coeff")
    if isinstance(coeff, (list, tuple)):
        require(len(coeff) == 1, f"{source}: moe_aux_loss_coeff={list(coeff)!r} (several load-balancing losses) "
                                 "is not supported (one coefficient)")
        cfg["moe_aux_loss_coeff"] = coeff[0]
    return cfg


def moe_fields(cfg: Mapping[str, Any], source: str, fixed: Mapping[str, tuple]) -> dict[str, Any]:
    """The ModelDescription fields of a config's experts; a one-line error naming the key
    for what ``fixed`` refuses."""
    cfg = _moe_normalized(cfg, source)
    check_supported(cfg, source, fixed, MOE_DEFAULTS)

    def get(key: str, kind=int):
        value = _get(cfg, key, MOE_DEFAULTS)
        return None if value is None else _number(value, key, source, kind)

    sigmoid = _get(cfg, "moe_router_score_function", MOE_DEFAULTS) == "sigmoid"
    top_k = get("moe_router_topk")
    width = get("moe_ffn_hidden_size") or get("ffn_hidden_size")
    require(width, f"{source}: moe_ffn_hidden_size is missing")
    return {
        "num_experts": get("num_moe_experts"), "moe_top_k": top_k, "moe_ffn_hidden_size": width,
        "moe_shared_ffn_hidden_size": get("moe_shared_expert_intermediate_size") or 0,
        "moe_shared_expert_gate": bool(_get(cfg, "moe_shared_expert_gate", MOE_DEFAULTS)),
        # megatron's sigmoid router renormalises the top-k weights exactly when k > 1; its softmax
        # router renormalises unless it takes the top-k of the softmax (moe_router_pre_softmax)
        "moe_normalize_top_k": top_k > 1 if sigmoid else not _get(cfg, "moe_router_pre_softmax", MOE_DEFAULTS),
        "moe_aux_loss_coeff": get("moe_aux_loss_coeff", float),
        "moe_routed_scaling_factor": get("moe_router_topk_scaling_factor", float) or 1.0,
    }


def moe_settings(desc: ModelDescription) -> dict[str, Any]:
    """A mixture of experts under TransformerConfig / provider names (also Megatron-LM's
    argument names), as megatron-core builds it here (``model.builder.moe_config``); the
    experts as SequentialMLP (``moe_grouped_gemm`` false), whose checkpoint keys TEGroupedMLP
    reads too. Empty for a dense model."""
    if not desc.is_moe:
        return {}
    settings = moe_config(desc)
    if not desc.is_hybrid:
        settings["moe_layer_freq"] = 1
    return settings


# ---------------------------------------------------------------------- hybrid models
#: megatron-core's values for hybrid models when a config omits them (TransformerConfig,
#: MambaMixer, Megatron-Bridge's HybridModelProvider: no position embedding, RMSNorm)
HYBRID_DEFAULTS: dict[str, Any] = {
    **DEFAULTS, "position_embedding_type": "none", "normalization": "RMSNorm", "mamba_head_dim": 64,
    "mamba_num_groups": 8, "mamba_state_dim": 128, "mamba_chunk_size": 128,
}
#: what a hybrid config may state: the GPT rules, without RoPE (Nemotron-H's attention has
#: no position embedding) and with the pattern read rather than refused
HYBRID_FIXED = {**{k: v for k, v in FIXED.items() if k != "hybrid_layer_pattern"},
                "position_embedding_type": (("none",), "a position embedding in a hybrid model")}
#: megatron-core's MambaMixer builds its conv with d_conv=4; no Megatron-LM argument or Bridge
#: provider field changes it
MEGATRON_CONV_KERNEL = 4
#: Megatron-LM's builder for hybrid models (--spec)
MAMBA_SPEC = ["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"]


def is_hybrid_config(cfg: Mapping[str, Any]) -> bool:
    return bool(cfg.get("hybrid_layer_pattern") or cfg.get("hybrid_override_pattern") or cfg.get("is_hybrid_model"))


def hybrid_pattern(cfg: Mapping[str, Any], source: str) -> str:
    """The layer pattern of a hybrid config (pipeline-stage bars ``|`` removed), or a
    one-line error: multi-token prediction after ``/``, a symbol nothing here builds, a
    pattern megatron would derive from layer ratios. ``E`` layers are megatron's MoE layers."""
    key = "hybrid_layer_pattern" if cfg.get("hybrid_layer_pattern") else "hybrid_override_pattern"
    pattern = cfg.get(key)
    if not pattern:
        ratios = {k: cfg.get(k) or 0.0 for k in ("hybrid_attention_ratio", "hybrid_mlp_ratio")}
        require(not any(ratios.values()), f"{source}: a hybrid model whose layers megatron allocates from "
                                          f"{', '.join(f'{k}={v}' for k, v in ratios.items())} is not supported "
                                          "(state hybrid_override_pattern)")
        layers = cfg.get("num_layers")
        require(layers, f"{source}: num_layers is missing")
        return hybrid.MAMBA * _number(layers, "num_layers", source, int)  # megatron's default: every layer Mamba
    require(isinstance(pattern, str), f"{source}: {key}={pattern!r} is not a string of layer symbols")
    main, _, mtp = pattern.partition("/")
    require(not mtp.strip("/"), f"{source}: {key}={pattern!r} has multi-token prediction layers (after '/'), "
                                "which are not supported")
    return hybrid.check_pattern(main.replace("|", ""), f"{source}: {key}")


def hybrid_hf_config(cfg: Mapping[str, Any], *, vocab_size: int, source: str) -> dict[str, Any]:
    """A hybrid Megatron config as the Hugging Face NemotronHConfig keys (Megatron-Bridge's
    ``NemotronHBridge.CONFIG_MAPPING``); one-line errors for what Nemotron-H cannot be."""
    pattern = hybrid_pattern(cfg, source)
    check_supported(cfg, source, HYBRID_FIXED, HYBRID_DEFAULTS)
    feats = features(cfg, source, HYBRID_DEFAULTS)
    expected = family("nemotron_h").feature_values()
    for key, value in feats.items():
        require(expected[key] == value, f"{source}: a hybrid model with {key}={value!r} is not supported "
                                           f"(Nemotron-H: {expected[key]!r})")

    def get(key: str, kind=int):
        value = _get(cfg, key, HYBRID_DEFAULTS)
        return None if value is None else _number(value, key, source, kind)

    if cfg.get("num_layers") is not None:
        require(get("num_layers") == len(pattern), f"{source}: num_layers={cfg['num_layers']} but the hybrid "
                                                   f"pattern {pattern!r} has {len(pattern)} layers")
    for key in ("hidden_size", "num_attention_heads"):
        require(cfg.get(key) is not None, f"{source}: {key} is missing")
    hidden, heads, head_dim = get("hidden_size"), get("num_attention_heads"), get("mamba_head_dim")
    return {
        "model_type": "nemotron_h", "vocab_size": int(vocab_size), "hidden_size": hidden,
        "intermediate_size": get("ffn_hidden_size") or 4 * hidden, "hybrid_override_pattern": pattern,
        "num_hidden_layers": len(pattern), "num_attention_heads": heads,
        "num_key_value_heads": get("num_query_groups") or heads, "head_dim": get("kv_channels") or hidden // heads,
        # megatron-core's MambaMixer: heads = 2 x hidden / head_dim unless stated (expand 2)
        "mamba_num_heads": get("mamba_num_heads") or 2 * hidden // head_dim, "mamba_head_dim": head_dim,
        "n_groups": get("mamba_num_groups"), "ssm_state_size": get("mamba_state_dim"),
        "conv_kernel": MEGATRON_CONV_KERNEL, "chunk_size": get("mamba_chunk_size"),
        "layer_norm_epsilon": get("layernorm_epsilon", float), "max_position_embeddings": get("seq_length"),
        "tie_word_embeddings": bool(_get(cfg, "share_embeddings_and_output_weights")),
        **(_hybrid_moe_hf_config(cfg, source) if hybrid.MOE in pattern else {}),
    }


def _hybrid_moe_hf_config(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The E layers' settings as NemotronHConfig keys (NemotronHBridge's CONFIG_MAPPING)."""
    require(cfg.get("num_moe_experts"), f"{source}: num_moe_experts is missing (the pattern has MoE layers 'E')")
    moe = moe_fields(cfg, source, MOE_FIXED_HYBRID)
    # transformers' NemotronH always adds its shared expert
    require(moe["moe_shared_ffn_hidden_size"], f"{source}: MoE layers without a shared expert "
                                               "(moe_shared_expert_intermediate_size) are not supported")
    return {"n_routed_experts": moe["num_experts"], "num_experts_per_tok": moe["moe_top_k"],
            "moe_intermediate_size": moe["moe_ffn_hidden_size"],
            "moe_shared_expert_intermediate_size": moe["moe_shared_ffn_hidden_size"],
            "norm_topk_prob": moe["moe_normalize_top_k"], "routed_scaling_factor": moe["moe_routed_scaling_factor"],
            "router_aux_loss_coef": moe["moe_aux_loss_coeff"], "n_group": 1, "topk_group": 1}


def hybrid_description(cfg: Mapping[str, Any], *, vocab_size: int, source: str, name: str = "") -> ModelDescription:
    hf = hybrid_hf_config(cfg, vocab_size=vocab_size, source=source)
    try:
        return description_from_hf_config(hf, name=name)
    except UsageError as e:
        raise UsageError(f"{source}: {e}") from None


# ---------------------------------------------------------------------- writing
def _rope_fields(desc: ModelDescription) -> dict[str, Any]:
    """The rope keys of a provider; an error when Megatron cannot express the scaling."""
    sc = desc.rope_scaling
    if sc is None:
        return {"rope_scaling": False, "rope_scaling_factor": 1.0, "seq_len_interpolation_factor": None}
    if sc["rope_type"] == "linear":
        return {"rope_scaling": False, "rope_scaling_factor": 1.0, "seq_len_interpolation_factor": float(sc["factor"])}
    params = {k: float(sc.get(k, v)) for k, v in _MCORE_LLAMA3.items()}
    require(params == {k: float(v) for k, v in _MCORE_LLAMA3.items()},
            f"rope_scaling {dict(sc)}: megatron-core applies Llama 3 scaling only with "
            f"{_MCORE_LLAMA3}; this model cannot be written as a Megatron checkpoint")
    return {"rope_scaling": True, "rope_scaling_factor": float(sc["factor"]), "seq_len_interpolation_factor": None}


def _int_if_whole(x: float):
    """Megatron declares rotary_base an int (it may be a float in our description)."""
    return int(x) if float(x).is_integer() else float(x)


#: where an export writes a heterogeneous model's block_configs (also stated inline, encoded)
HETEROGENEOUS_CONFIG_FILE = "heterogeneous_layers_config.json"
#: Megatron-Bridge's provider of heterogeneous Llama-Nemotron models
_HETEROGENEOUS_PROVIDER = "megatron.bridge.models.llama_nemotron.llama_nemotron_provider.LlamaNemotronHeterogeneousProvider"


def heterogeneous_fields(desc: ModelDescription, config_path: str | None) -> dict[str, Any]:
    """The heterogeneous config keys of a Megatron checkpoint (None and "" for a uniform model)."""
    if not desc.is_heterogeneous:
        return {"heterogeneous_layers_config_path": None, "heterogeneous_layers_config_encoded_json": None}
    return {"heterogeneous_layers_config_path": config_path,
            "heterogeneous_layers_config_encoded_json": json.dumps(nemotron_nas.megatron_block_configs(desc))}


def check_writable(desc: ModelDescription) -> None:
    """What a Megatron checkpoint cannot state about ``desc`` (before any work)."""
    if desc.is_hybrid:
        require(desc.mamba_conv_kernel == MEGATRON_CONV_KERNEL,
                f"a Mamba conv of width {desc.mamba_conv_kernel} cannot be written as a Megatron checkpoint "
                f"(megatron-core's MambaMixer has width {MEGATRON_CONV_KERNEL}, and neither Megatron-LM's "
                "arguments nor Bridge's provider change it)")
        return
    _rope_fields(desc)


def _hybrid_settings(desc: ModelDescription) -> dict[str, Any]:
    """The Mamba settings of a hybrid model, under TransformerConfig / provider names (the
    pattern under its older name, which every Megatron-LM and Bridge version reads)."""
    return {"hybrid_override_pattern": desc.hybrid_pattern, "is_hybrid_model": True,
            "mamba_num_heads": desc.mamba_num_heads, "mamba_head_dim": desc.mamba_head_dim,
            "mamba_num_groups": desc.mamba_num_groups, "mamba_state_dim": desc.mamba_state_dim,
            "mamba_chunk_size": desc.mamba_chunk_size}


def _ffn(desc: ModelDescription) -> int:
    """ffn_hidden_size as megatron states it: a GPT mixture of experts has no dense MLP, its
    experts' width (as Bridge's MoE providers write it); a model without dense MLP layers the
    hidden size (read by nothing)."""
    return desc.ffn_hidden_size or desc.moe_ffn_hidden_size or desc.hidden_size


_ACTIVATION_TARGETS = {"swiglu": "torch.nn.functional.silu", "squared_relu": "megatron.core.activations.squared_relu"}


def bridge_model_section(desc: ModelDescription, *, tp: int, pp: int, dtype: torch.dtype,
                         make_vocab_size_divisible_by: int, should_pad_vocab: bool) -> dict[str, Any]:
    """run_config.yaml ``model:`` as Megatron-Bridge's GPTModelProvider writes it (YAML
    representers of megatron/training/config/yaml_utils.py: functions and dtypes as
    ``{_target_, _call_: false}``)."""
    check_writable(desc)
    # a per-layer model's ffn_hidden_size is read only by no-op MLPs: never 0
    ffn = (desc.ffn_hidden_size or desc.hidden_size) if desc.is_heterogeneous else _ffn(desc)
    shape = {"num_layers": desc.num_layers, "hidden_size": desc.hidden_size, "ffn_hidden_size": ffn,
             "num_attention_heads": desc.num_attention_heads, "num_query_groups": desc.num_query_groups,
             "kv_channels": desc.head_dim}
    if desc.is_hybrid:  # Bridge's MambaModelProvider (newer Bridge: a HybridModelProvider) as NemotronHBridge sets it
        target = "megatron.bridge.models.mamba.mamba_provider.MambaModelProvider"
        layers = {**_hybrid_settings(desc), "normalization": "RMSNorm", "layernorm_epsilon": desc.norm_eps,
                  "gated_linear_unit": False,
                  "activation_func": {"_target_": _ACTIVATION_TARGETS["squared_relu"], "_call_": False},
                  "add_bias_linear": False, "add_qkv_bias": False, "qk_layernorm": False,
                  "position_embedding_type": "none"}
    else:
        target = _HETEROGENEOUS_PROVIDER if desc.is_heterogeneous else "megatron.bridge.models.gpt_provider.GPTModelProvider"
        layers = {
            "normalization": desc.normalization,
            "layernorm_epsilon": desc.norm_eps,
            "layernorm_zero_centered_gamma": desc.zero_centered_gamma,
            "gated_linear_unit": desc.gated,
            "activation_func": {"_target_": _ACTIVATION_TARGETS[desc.activation], "_call_": False},
            "add_bias_linear": False,
            "add_qkv_bias": desc.qkv_bias,
            "qk_layernorm": desc.qk_norm,
            "position_embedding_type": "rope",
            "rotary_base": _int_if_whole(desc.rope_theta),
            "rotary_percent": desc.rotary_percent,
            **_rope_fields(desc),
        }
    return {
        "_target_": target, **shape, **layers, **moe_settings(desc),
        "seq_length": desc.max_position_embeddings,
        "share_embeddings_and_output_weights": desc.tie_embeddings,
        "vocab_size": desc.vocab_size,
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "should_pad_vocab": should_pad_vocab,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "params_dtype": {"_target_": str(dtype), "_call_": False},
        "pipeline_dtype": {"_target_": str(dtype), "_call_": False},
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        **({**heterogeneous_fields(desc, None), "heterogeneous_layers_config_path": None}
           if desc.is_heterogeneous else {}),
    }


def megatron_lm_args(desc: ModelDescription, *, tp: int, pp: int, dtype: torch.dtype, padded_vocab_size: int,
                     make_vocab_size_divisible_by: int, tokenizer_model: str | None,
                     iteration: int, heterogeneous_config_path: str | None = None) -> argparse.Namespace:
    """The ``args`` Namespace Megatron-LM saves in ``common.pt``, with every field its
    loader and model builder read: the model list of load_args_from_checkpoint, the
    renamed arguments of core_transformer_config_from_args (both the pre-2026 names
    and the TransformerConfig names), and what gpt_builder reads."""
    check_writable(desc)
    rope = _rope_fields(desc)
    args = argparse.Namespace(
        # model shape (load_args_from_checkpoint: "Model args")
        num_layers=desc.num_layers, hidden_size=desc.hidden_size, ffn_hidden_size=_ffn(desc),
        seq_length=desc.max_position_embeddings, num_attention_heads=desc.num_attention_heads,
        num_query_groups=desc.num_query_groups, group_query_attention=True, kv_channels=desc.head_dim,
        max_position_embeddings=desc.max_position_embeddings, position_embedding_type="rope",
        add_position_embedding=False, use_rotary_position_embeddings=True, rotary_base=_int_if_whole(desc.rope_theta),
        rotary_percent=desc.rotary_percent, rotary_interleaved=False,
        add_bias_linear=False, add_qkv_bias=desc.qkv_bias, squared_relu=desc.activation == "squared_relu",
        swiglu=desc.gated, quick_geglu=False, untie_embeddings_and_output_weights=not desc.tie_embeddings,
        apply_layernorm_1p=desc.zero_centered_gamma, layernorm_zero_centered_gamma=desc.zero_centered_gamma,
        normalization=desc.normalization, apply_query_key_layer_scaling=False,
        attention_dropout=0.0, hidden_dropout=0.0, mtp_num_layers=None, spec=None, num_experts=desc.num_experts or None,
        moe_layer_freq=1, moe_ffn_hidden_size=None, hybrid_layer_pattern=None,
        # Megatron-LM builds a heterogeneous model when the path is set; the layers are in the JSON
        **heterogeneous_fields(desc, heterogeneous_config_path), multi_latent_attention=False, qk_layernorm=desc.qk_norm,
        experimental_attention_variant=None, window_size=None,
        # renamed in core_transformer_config_from_args; written under both names
        norm_epsilon=desc.norm_eps, layernorm_epsilon=desc.norm_eps,
        use_rope_scaling=rope["rope_scaling"], rope_scaling_factor=rope["rope_scaling_factor"],
        rotary_seq_len_interpolation_factor=rope["seq_len_interpolation_factor"],
        # vocabulary and tokenizer
        vocab_size=desc.vocab_size, padded_vocab_size=padded_vocab_size,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tokenizer_type="HuggingFaceTokenizer" if tokenizer_model else None, tokenizer_model=tokenizer_model,
        # precision, parallel layout and format at save time
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1, decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
        transformer_impl="local", ckpt_format="torch_dist", use_dist_ckpt=True, iteration=iteration,
        fp16_lm_cross_entropy=False,
    )
    vars(args).update(moe_settings(desc))  # under their argument names (num_experts above)
    if desc.is_hybrid:  # Megatron-LM's hybrid builder (--spec) with Nemotron-H's settings
        vars(args).update(position_embedding_type="none", use_rotary_position_embeddings=False,
                          squared_relu=True, swiglu=False, spec=MAMBA_SPEC, hybrid_attention_ratio=0.0,
                          hybrid_mlp_ratio=0.0, **_hybrid_settings(desc))
    return args
