"""Llama and Mistral: RMSNorm, SwiGLU MLP, no biases."""

from nemo_minitron.families.spec import ATTENTION, EMBEDDINGS, Const, Family, L, M, common_config

LLAMA_LAYER = {
    M + "input_layernorm.weight": L + "input_layernorm.weight",
    **ATTENTION,
    M + "pre_mlp_layernorm.weight": L + "post_attention_layernorm.weight",
    M + "mlp.linear_fc1.weight": ("gate_up", L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
    M + "mlp.linear_fc2.weight": L + "mlp.down_proj.weight",
}

LLAMA = Family(
    model_type="llama", hf_class="LlamaForCausalLM", config_class="LlamaConfig",
    config=common_config("rms_norm_eps", "silu") + (
        # Llama's attention_bias also puts a bias on o_proj, which megatron's QKV bias does not cover
        Const("attention_bias", False, "attention biases"),
        Const("mlp_bias", False, "MLP biases"),
    ),
    weights={**EMBEDDINGS, **LLAMA_LAYER},
    # transformers may refuse a pruned Llama shape (hidden not a multiple of the heads);
    # Mistral computes the same function
    fallback="mistral",
)

MISTRAL = Family(
    model_type="mistral", hf_class="MistralForCausalLM", config_class="MistralConfig",
    config=common_config("rms_norm_eps", "silu") + (Const("sliding_window", None, "sliding-window attention"),),
    weights={**EMBEDDINGS, **LLAMA_LAYER},
)
