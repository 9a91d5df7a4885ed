"""Nemotron (Nemotron-3/4, Minitron): squared-ReLU MLP without a gate, LayerNorm with bias
and zero-centred gamma (HF's ``NemotronLayerNorm1P`` computes with weight + 1, as
megatron-core's ``layernorm_zero_centered_gamma``: the stored tensors are the same),
partial rotary embeddings, untied output layer."""

from nemo_minitron.families.spec import ATTENTION, EMBEDDINGS, Const, Family, L, M, common_config

NEMOTRON = Family(
    model_type="nemotron", hf_class="NemotronForCausalLM", config_class="NemotronConfig",
    config=common_config("norm_eps", "relu2") + (
        Const("attention_bias", False, "attention biases"),
        Const("mlp_bias", False, "MLP biases"),
    ),
    features={"activation": "squared_relu", "normalization": "LayerNorm", "zero_centered_gamma": True},
    partial_rotary=0.5,  # NemotronConfig's default
    weights={
        **EMBEDDINGS,
        "decoder.final_layernorm.bias": "model.norm.bias",
        M + "input_layernorm.weight": L + "input_layernorm.weight",
        M + "input_layernorm.bias": L + "input_layernorm.bias",
        **ATTENTION,
        M + "pre_mlp_layernorm.weight": L + "post_attention_layernorm.weight",
        M + "pre_mlp_layernorm.bias": L + "post_attention_layernorm.bias",
        M + "mlp.linear_fc1.weight": L + "mlp.up_proj.weight",
        M + "mlp.linear_fc2.weight": L + "mlp.down_proj.weight",
    },
)
