"""Nemotron-H (Nemotron-H 4B/8B/47B/56B, Nemotron Nano 2): hybrid Mamba-2 / attention / MLP
layers, megatron-core's ``MambaModel`` (see ``model/hybrid.py`` and docs/hybrid.md).

Every layer is a pre-norm residual block of one kind, given by the layer pattern
(``hybrid_override_pattern`` in NVIDIA's configs, ``layers_block_type`` in those
transformers 5 writes): a Mamba-2 mixer, attention without position embeddings, or a
squared-ReLU MLP without a gate; RMSNorm everywhere. HF names each layer's norm
``backbone.layers.{i}.norm``, megatron-core after the layer kind (``norm`` in a Mamba
layer, ``input_layernorm`` in attention, ``pre_mlp_layernorm`` in an MLP layer).
Mixture-of-experts layers (``E``, Nemotron 3): a router of sigmoid scores whose top-k
choice adds a per-expert bias (``e_score_correction_bias``, megatron's ``expert_bias``),
squared-ReLU experts without a gate and one shared expert, as megatron-core's MoE layer
(docs/hybrid.md). Multi-token prediction, latent MoE, group-limited routing and top-k
weights that are not renormalised are refused with the config key that states them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from nemo_minitron.errors import UsageError
from nemo_minitron.families.spec import Check, Const, Family, Field
from nemo_minitron.model.hybrid import MOE, check_pattern, pattern_from_block_types

B, M = "backbone.layers.{i}.", "decoder.layers.{i}."


def _pattern(config: Mapping[str, Any]) -> str:
    """The layer pattern of a config that has no ``hybrid_override_pattern``."""
    if config.get("layers_block_type") is None:
        raise UsageError("nemotron_h config: neither 'hybrid_override_pattern' nor 'layers_block_type' is given")
    return pattern_from_block_types(config["layers_block_type"])


def _has_moe_layers(config: Mapping[str, Any]) -> bool:
    """Whether the pattern has MoE layers: only then are the expert keys (which transformers 5
    writes into every config, dense ones too) read and written."""
    pattern = config.get("hybrid_override_pattern")
    return MOE in (pattern if pattern is not None else _pattern(config))


def _no_time_step_limit(limit: Any) -> bool:
    """(0, inf): no clamp of the Mamba time step (transformers 5 writes inf as {"__float__": "Infinity"})."""
    def number(v: Any) -> float:
        return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)

    try:
        low, high = (number(v) for v in limit)
    except (TypeError, ValueError, KeyError):
        return False
    return low == 0.0 and math.isinf(high) and high > 0


NEMOTRON_H = Family(
    model_type="nemotron_h", hf_class="NemotronHForCausalLM", config_class="NemotronHConfig", hybrid=True, rope=False,
    config=(
        Field("vocab_size", "vocab_size", cast=int),
        Field("hidden_size", "hidden_size", cast=int),
        Field("intermediate_size", "ffn_hidden_size", cast=int),
        Field("hybrid_override_pattern", "hybrid_pattern", default=_pattern, cast=check_pattern),
        Field("num_hidden_layers", "num_layers", default=lambda c: len(_pattern(c)), cast=int),
        Field("num_attention_heads", "num_attention_heads", cast=int),
        Field("num_key_value_heads", "num_query_groups", default=lambda c: c["num_attention_heads"], cast=int),
        # transformers' NemotronHConfig: head_dim (older configs: attention_head_dim), else 128
        Field("head_dim", "head_dim", default=lambda c: c.get("attention_head_dim") or 128, cast=int),
        Field("mamba_num_heads", "mamba_num_heads", default=128, cast=int),
        Field("mamba_head_dim", "mamba_head_dim", default=64, cast=int),
        Field("n_groups", "mamba_num_groups", default=lambda c: c.get("mamba_n_groups", 8), cast=int),
        Field("ssm_state_size", "mamba_state_dim", default=128, cast=int),
        Field("conv_kernel", "mamba_conv_kernel", default=lambda c: c.get("mamba_d_conv", 4), cast=int),
        Field("chunk_size", "mamba_chunk_size", default=lambda c: c.get("mamba_chunk_size", 128), cast=int),
        Field("layer_norm_epsilon", "norm_eps", default=1e-5, cast=float),
        Field("max_position_embeddings", "max_position_embeddings", default=4096, cast=int),
        # transformers 5's NemotronH never ties (no _tied_weights_keys): it loads and saves its
        # own lm_head.weight whatever the flag says, so a tied flag would misdescribe the model
        Const("tie_word_embeddings", False, "tied embeddings (transformers' NemotronH uses its own lm_head.weight: "
                                            "set tie_word_embeddings to false)"),
        Field("bos_token_id", "bos_token_id", default=None),
        Field("eos_token_id", "eos_token_id", default=None),
        Field("pad_token_id", "pad_token_id", default=None),
        # mixture-of-experts layers (E)
        Field("n_routed_experts", "num_experts", default=lambda c: c.get("num_local_experts"), cast=int,
              when=_has_moe_layers),
        Field("num_experts_per_tok", "moe_top_k", cast=int, when=_has_moe_layers),
        Field("moe_intermediate_size", "moe_ffn_hidden_size", cast=int, when=_has_moe_layers),
        Field("moe_shared_expert_intermediate_size", "moe_shared_ffn_hidden_size", cast=int, when=_has_moe_layers),
        Field("norm_topk_prob", "moe_normalize_top_k", default=True, cast=bool, when=_has_moe_layers),
        Field("routed_scaling_factor", "moe_routed_scaling_factor", default=1.0, cast=float, when=_has_moe_layers),
        # transformers computes no load-balancing loss; Megatron-Bridge trains Nemotron 3 with 1e-4
        Field("router_aux_loss_coef", "moe_aux_loss_coeff", default=1e-4, cast=float, when=_has_moe_layers),
        # megatron's group score sums a group's top topk/group_topk experts, HF's its top 2
        Check("n_group", lambda n: n == 1, "group-limited expert routing"),
        Const("mlp_hidden_act", "relu2", "the MLP activation"),
        Const("mamba_hidden_act", "silu", "the Mamba conv activation"),
        Const("use_conv_bias", True, "a Mamba conv without bias"),
        Const("mamba_proj_bias", False, "Mamba projection biases"),
        Const("use_bias", False, "linear-layer biases"),
        Const("mlp_bias", False, "MLP biases"),
        Const("attention_bias", False, "attention biases"),
        Const("sliding_window", None, "sliding-window attention"),
        Check("time_step_limit", _no_time_step_limit, "a clamp of the Mamba time step; megatron-core's mixer has none"),
        Check("num_nextn_predict_layers", lambda n: n == 0, "multi-token prediction (MTP) layers"),
        Check("moe_latent_size", lambda size: False, "a latent mixture of experts"),
    ),
    # transformers builds the one shared expert whatever n_shared_experts says (and writes
    # num_local_experts, n_routed_experts' alias, into every config)
    ignored_keys=("n_shared_experts", "num_local_experts"),
    features={"activation": "squared_relu"}, moe_router="sigmoid",
    weights={
        "embedding.word_embeddings.weight": ("vocab", "backbone.embeddings.weight"),
        "decoder.final_norm.weight": "backbone.norm_f.weight",
        "output_layer.weight": ("vocab", "lm_head.weight"),
        # Mamba layers (M)
        M + "norm.weight": B + "norm.weight",
        **{M + f"mixer.{p}": B + f"mixer.{p}" for p in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "A_log",
                                                        "D", "dt_bias", "norm.weight", "out_proj.weight")},
        # attention layers (*)
        M + "input_layernorm.weight": B + "norm.weight",
        M + "self_attention.linear_qkv.weight": ("qkv", *(f"{B}mixer.{p}_proj.weight" for p in "qkv")),
        M + "self_attention.linear_proj.weight": B + "mixer.o_proj.weight",
        # MLP layers (-)
        M + "pre_mlp_layernorm.weight": B + "norm.weight",
        M + "mlp.linear_fc1.weight": B + "mixer.up_proj.weight",
        M + "mlp.linear_fc2.weight": B + "mixer.down_proj.weight",
        # MoE layers (E): router, its expert bias (a float32 buffer on both sides), routed and shared experts
        M + "mlp.router.weight": B + "mixer.gate.weight",
        M + "mlp.router.expert_bias": B + "mixer.gate.e_score_correction_bias",
        M + "mlp.experts.local_experts.{e}.linear_fc1.weight": B + "mixer.experts.{e}.up_proj.weight",
        M + "mlp.experts.local_experts.{e}.linear_fc2.weight": B + "mixer.experts.{e}.down_proj.weight",
        M + "mlp.shared_experts.linear_fc1.weight": B + "mixer.shared_experts.up_proj.weight",
        M + "mlp.shared_experts.linear_fc2.weight": B + "mixer.shared_experts.down_proj.weight",
    },
)
