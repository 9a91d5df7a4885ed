"""Configuration of a Llama-Nemotron (``nemotron-nas``) model: a Llama whose layers each have
their own shape, listed in ``block_configs`` (shipped by nemo-minitron with its exports)."""

from transformers import PretrainedConfig

FFN_MULTIPLE = 256


def ffn_mult_to_width(ffn_mult, hidden_size):
    """The MLP width ``ffn_mult`` states: int(2 * ffn_mult * hidden / 3) rounded up to 256."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return -(-width // FFN_MULTIPLE) * FFN_MULTIPLE


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(self, vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 head_dim=None, hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=4096,
                 rope_theta=10000.0, rope_scaling=None, block_configs=None, attention_bias=False, mlp_bias=False,
                 tie_word_embeddings=False, initializer_range=0.02, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.initializer_range = initializer_range
        self.block_configs = list(block_configs or [])
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # set after the base class, which may rewrite RoPE keys of its own
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling

    def layer_shape(self, i):
        """(key/value heads, MLP width) of layer ``i``; 0 where that part is a no-op."""
        block = self.block_configs[i]
        attention, ffn = block["attention"], block.get("ffn") or block.get("mlp")
        for part, what in ((attention, "attention"), (ffn, "ffn")):
            if part.get("replace_with_linear"):
                raise ValueError(f"block_configs[{i}].{what}.replace_with_linear is not supported by this code")
        kv_heads = 0 if attention.get("no_op") else self.num_attention_heads // attention["n_heads_in_group"]
        width = 0 if ffn.get("no_op") else ffn_mult_to_width(ffn["ffn_mult"], self.hidden_size)
        return kv_heads, width
