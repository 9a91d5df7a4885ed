"""Qwen2 (QKV biases) and Qwen3 (QK-norm, no biases, explicit head_dim)."""

from nemo_minitron.families.llama import LLAMA_LAYER
from nemo_minitron.families.spec import EMBEDDINGS, Check, Const, Family, L, M, common_config, full_attention_only

_NO_SLIDING_WINDOW = (
    Const("use_sliding_window", False, "sliding-window attention"),
    Const("sliding_window", None),  # only meaningful with use_sliding_window
    Check("layer_types", full_attention_only, "sliding-window attention layers"),
)

QWEN2 = Family(
    model_type="qwen2", hf_class="Qwen2ForCausalLM", config_class="Qwen2Config",
    config=common_config("rms_norm_eps", "silu") + _NO_SLIDING_WINDOW,
    features={"qkv_bias": True},
    weights={**EMBEDDINGS, **LLAMA_LAYER,
             M + "self_attention.linear_qkv.bias": ("qkv", *(f"{L}self_attn.{p}_proj.bias" for p in "qkv"))},
)

QWEN3 = Family(
    model_type="qwen3", hf_class="Qwen3ForCausalLM", config_class="Qwen3Config",
    config=common_config("rms_norm_eps", "silu") + (
        Const("attention_bias", False, "attention biases"),  # would include an o_proj bias
    ) + _NO_SLIDING_WINDOW,
    features={"qk_norm": True},
    weights={**EMBEDDINGS, **LLAMA_LAYER,
             M + "self_attention.q_layernorm.weight": L + "self_attn.q_norm.weight",
             M + "self_attention.k_layernorm.weight": L + "self_attn.k_norm.weight"},
)
