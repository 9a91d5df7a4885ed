"""Mixtures of experts: Mixtral, Qwen3-MoE, and Qwen2-MoE (with a gated shared expert).

Every layer's MLP is megatron-core's MoE layer: a router (``mlp.router.weight``,
experts x hidden), the routed experts (SwiGLU MLPs, ``{e}`` in the names) and, for
Qwen2-MoE, a shared expert whose output is scaled by sigmoid(x . w). Routing: softmax
over the router logits, top-k, renormalised to sum to 1 where the model does so (Mixtral
always; Qwen when ``norm_topk_prob``), which is megatron's top-k softmax without and with
``moe_router_pre_softmax``. HF checkpoints store each expert separately (transformers 5
fuses them in memory and writes them back separately); those names are the table's.

HF computes no load-balancing loss in the forward pass; its ``router_aux_loss_coef`` is
the coefficient of megatron's per-layer load-balancing loss when the model is trained.
Dense layers among the MoE layers (``mlp_only_layers``, ``decoder_sparse_step``) are refused.
"""

from nemo_minitron.errors import UsageError
from nemo_minitron.families.qwen import _NO_SLIDING_WINDOW
from nemo_minitron.families.spec import ATTENTION, EMBEDDINGS, Const, Family, Field, L, M, common_config

EXPERT = M + "mlp.experts.local_experts.{e}."


def _layer(hf_mlp: str, hf_router: str, hf_expert: str, gate: str, up: str, down: str) -> dict:
    """A layer's weights: norms, attention, router and the ``{e}`` experts (HF names under ``hf_mlp``)."""
    x = L + hf_mlp + hf_expert
    return {
        M + "input_layernorm.weight": L + "input_layernorm.weight",
        **ATTENTION,
        M + "pre_mlp_layernorm.weight": L + "post_attention_layernorm.weight",
        M + "mlp.router.weight": L + hf_mlp + hf_router,
        EXPERT + "linear_fc1.weight": ("gate_up", x + gate, x + up),
        EXPERT + "linear_fc2.weight": x + down,
    }


def _num_local_experts(config) -> int:
    """transformers 5 writes Qwen's ``num_experts`` as ``num_local_experts``."""
    if config.get("num_local_experts") is None:
        raise UsageError(f"{config.get('model_type')} config: 'num_experts' is missing")
    return config["num_local_experts"]


def _moe_config(experts_key: str, width_key: str) -> tuple:
    return (
        Field(experts_key, "num_experts", default=_num_local_experts, cast=int),
        Field("num_experts_per_tok", "moe_top_k", cast=int),
        Field("router_aux_loss_coef", "moe_aux_loss_coeff", default=0.001, cast=float),
    ) + common_config("rms_norm_eps", "silu", mlp_width=(width_key, "moe_ffn_hidden_size"))


_ONLY_MOE_LAYERS = (
    Const("mlp_only_layers", [], "dense MLP layers among the mixture-of-experts layers"),
    Const("decoder_sparse_step", 1, "dense MLP layers among the mixture-of-experts layers"),
)

MIXTRAL = Family(
    model_type="mixtral", hf_class="MixtralForCausalLM", config_class="MixtralConfig", moe=True,
    config=_moe_config("num_local_experts", "intermediate_size") + (
        Const("sliding_window", None, "sliding-window attention"),
        Const("router_jitter_noise", 0.0, "router jitter noise"),
    ),
    weights={**EMBEDDINGS, **_layer("block_sparse_moe.", "gate.weight", "experts.{e}.", "w1.weight", "w3.weight",
                                    "w2.weight")},
)

_QWEN_EXPERTS = ("mlp.", "gate.weight", "experts.{e}.", "gate_proj.weight", "up_proj.weight", "down_proj.weight")

QWEN3_MOE = Family(
    model_type="qwen3_moe", hf_class="Qwen3MoeForCausalLM", config_class="Qwen3MoeConfig", moe=True,
    config=_moe_config("num_experts", "moe_intermediate_size") + (
        Field("norm_topk_prob", "moe_normalize_top_k", default=False, cast=bool),
        Const("attention_bias", False, "attention biases"),
    ) + _ONLY_MOE_LAYERS + _NO_SLIDING_WINDOW,
    features={"qk_norm": True},
    weights={**EMBEDDINGS, **_layer(*_QWEN_EXPERTS),
             M + "self_attention.q_layernorm.weight": L + "self_attn.q_norm.weight",
             M + "self_attention.k_layernorm.weight": L + "self_attn.k_norm.weight"},
)

QWEN2_MOE = Family(
    model_type="qwen2_moe", hf_class="Qwen2MoeForCausalLM", config_class="Qwen2MoeConfig", moe=True,
    config=_moe_config("num_experts", "moe_intermediate_size") + (
        Field("norm_topk_prob", "moe_normalize_top_k", default=False, cast=bool),
        Field("shared_expert_intermediate_size", "moe_shared_ffn_hidden_size", cast=int),
        Const("qkv_bias", True, "attention without QKV biases"),
    ) + _ONLY_MOE_LAYERS + _NO_SLIDING_WINDOW,
    features={"qkv_bias": True, "moe_shared_expert_gate": True},
    weights={**EMBEDDINGS, **_layer(*_QWEN_EXPERTS),
             M + "self_attention.linear_qkv.bias": ("qkv", *(f"{L}self_attn.{p}_proj.bias" for p in "qkv")),
             M + "mlp.shared_experts.linear_fc1.weight": ("gate_up", L + "mlp.shared_expert.gate_proj.weight",
                                                          L + "mlp.shared_expert.up_proj.weight"),
             M + "mlp.shared_experts.linear_fc2.weight": L + "mlp.shared_expert.down_proj.weight",
             M + "mlp.shared_experts.gate_weight": L + "mlp.shared_expert_gate.weight"},
)
