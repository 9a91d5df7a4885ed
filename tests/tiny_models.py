"""Tiny random Hugging Face models of each supported architecture, saved as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VOCAB = 1000  # not a multiple of 128: exercises vocabulary padding

# name -> (config class, config kwargs)
TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    # the shapes pruning produces: head_dim != hidden/heads, 2 query groups, odd depth
    "llama_pruned_shape": ("LlamaConfig", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=5,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                               tie_word_embeddings=False)),
    "llama3_rope": ("LlamaConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                        max_position_embeddings=256,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # pruned shapes with Llama 3.1 RoPE scaling as megatron-core applies it (original length 8192)
    "llama31_pruned_shape": ("LlamaConfig", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=5,
                                                 num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                                 rope_theta=500000.0, max_position_embeddings=256,
                                                 tie_word_embeddings=False,
                                                 rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                               "original_max_position_embeddings": 8192})),
    # a smaller model of the `llama` family: a student for the `llama` teacher
    "llama_small": ("LlamaConfig", dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        tie_word_embeddings=False)),
    # an MLP width that splits over 2 TP ranks into 38 columns each: not 2:4-sparsifiable there
    "llama_ffn76": ("LlamaConfig", dict(hidden_size=64, intermediate_size=76, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    # MLP widths the Llama-Nemotron export states (multiples of 256): a parent for per-layer pruning
    "llama_wide_mlp": ("LlamaConfig", dict(hidden_size=64, intermediate_size=768, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    # the same shapes with a different vocabulary size: not a student for the others
    "mistral_vocab": ("MistralConfig", dict(vocab_size=1100, hidden_size=48, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=16, sliding_window=None, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None,
                                      tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False)),
    # QK-norm, explicit head_dim with heads x head_dim > hidden (as Qwen3 has), tied
    "qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                                  use_sliding_window=False)),
    # squared-ReLU MLP, LayerNorm1P with bias, RoPE on half of each head, head_dim != hidden/heads
    "nemotron": ("NemotronConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                        partial_rotary_factor=0.5, tie_word_embeddings=False)),
    # mixtures of experts: 4 experts, top-2. Mixtral renormalises the top-k probabilities
    # (megatron: softmax over the top-k logits); this Qwen3-MoE too (norm_topk_prob), with
    # QK-norm; Qwen2-MoE does not (megatron: top-k of the softmax) and adds a gated shared expert
    "mixtral": ("MixtralConfig", dict(hidden_size=64, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2, router_aux_loss_coef=0.02, sliding_window=None,
                                      tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=64, moe_intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                                         num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.02,
                                         tie_word_embeddings=False, use_sliding_window=False)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(hidden_size=64, moe_intermediate_size=48, shared_expert_intermediate_size=64,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                         tie_word_embeddings=False, use_sliding_window=False)),
    # a smaller mixture of experts: a student for the `mixtral` teacher
    "mixtral_small": ("MixtralConfig", dict(hidden_size=48, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                            num_local_experts=3, num_experts_per_tok=2, router_aux_loss_coef=0.02,
                                            sliding_window=None, tie_word_embeddings=False)),
    # hybrid Mamba-2 / attention / MLP (Nemotron-H): 8 Mamba heads in 2 groups (a TP=2 rank
    # holds one group), 6 layers (3 per PP=2 stage, each with a Mamba layer); transformers'
    # scan runs in chunks of 16 (megatron-core's mixer: 128)
    "nemotron_h": ("NemotronHConfig", dict(hidden_size=64, intermediate_size=96, hybrid_override_pattern="M*-M-M",
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16,
                                           conv_kernel=4, chunk_size=16, tie_word_embeddings=False)),
    # hybrid with MoE layers (Nemotron 3): the same mixers, a dense MLP layer and two MoE layers
    # (one per PP=2 stage) of 4 squared-ReLU experts (top-2, renormalised, scaled by 2.5) and a
    # shared expert; the router's expert bias is random (make_tiny_hf_model), so it changes choices
    "nemotron_h_moe": ("NemotronHConfig", dict(hidden_size=64, intermediate_size=96, hybrid_override_pattern="ME*M-E",
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                               mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16,
                                               conv_kernel=4, chunk_size=16, n_routed_experts=4,
                                               num_experts_per_tok=2, moe_intermediate_size=32,
                                               moe_shared_expert_intermediate_size=48, routed_scaling_factor=2.5,
                                               n_group=1, topk_group=1, norm_topk_prob=True,
                                               tie_word_embeddings=False)),
}
MOE_KINDS = ("mixtral", "qwen3_moe", "qwen2_moe")


def make_tiny_hf_model(kind: str, directory: Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny model (and a tokenizer) to ``directory``."""
    import transformers

    cls_name, kwargs = TINY_CONFIGS[kind]
    kwargs = {"vocab_size": TINY_VOCAB, **kwargs}
    zero_centered = cls_name == "NemotronConfig"  # its norms store gamma - 1 (and name epsilon norm_eps)
    epsilon_key = {"NemotronConfig": "norm_eps", "NemotronHConfig": "layer_norm_epsilon"}.get(cls_name, "rms_norm_eps")
    kwargs[epsilon_key] = 1e-5
    config = getattr(transformers, cls_name)(bos_token_id=1, eos_token_id=2, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms and biases, so that a mix-up of them cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((0 if zero_centered else 1) + 0.2 * torch.randn_like(p))
            elif name.endswith(".D"):  # Mamba heads' skip: distinct per head
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith(".A_log"):  # slow decays (A in -0.2..-0.02) and time steps near 0.3
                p.copy_(torch.empty_like(p).uniform_(0.02, 0.2).log())  # (HF: 0.001..0.1): the SSM
            elif name.endswith(".dt_bias"):  # state remembers tens of tokens and weighs in the output
                p.copy_(torch.randn_like(p) * 0.5 - 1)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif cls_name == "NemotronHConfig" and p.dim() >= 2 and "embeddings" not in name and "lm_head" not in name:
                # unit-gain projections (and experts, [experts, out, in]): at HF's init (std 0.02,
                # out_proj scaled down) the layers barely move the residual stream and the model is
                # nearly a bigram model
                p.normal_(0.0, p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # the router's expert bias: it moves choices
                b.copy_(0.3 * torch.randn_like(b))
    model.save_pretrained(str(directory), safe_serialization=True)
    byte_tokenizer().save_pretrained(str(directory))
    return directory


def byte_tokenizer():
    """A byte-level tokenizer (any text, 3 special + 256 byte tokens), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_tokenizer():
    """A word-level tokenizer over TINY_VOCAB ids ("w0".."w996"), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    words = [f"w{i}" for i in range(TINY_VOCAB - len(vocab))]
    vocab.update({w: i + 3 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    from nemo_minitron.checkpoint.verify import load_hf_model

    with torch.no_grad():
        return load_hf_model(directory)(tokens).logits.float()


def hf_greedy(model, prompts, max_new_tokens: int, eos_token_id) -> list[list[int]]:
    """transformers' greedy ``generate``, one prompt at a time (no padding), new tokens only,
    cut before the first end-of-sequence token."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([list(p)]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos) or None,
                                 pad_token_id=0)[0, len(p):].tolist()
            cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
            out.append(ids[:cut])
    return out


def hf_continuation_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log P(continuation | context) and whether every continuation token is the argmax,
    from transformers' logits (fp64 log-softmax)."""
    tokens = torch.tensor([list(context) + list(continuation)])
    with torch.no_grad():
        logits = model(tokens).logits[0, len(context) - 1:-1].double()
    logprobs = torch.log_softmax(logits, -1)
    target = torch.tensor(continuation)
    return float(logprobs[torch.arange(len(target)), target].sum()), bool((logits.argmax(-1) == target).all())


# ---------------------------------------------------------------------- heterogeneous (per-layer) models
#: (key/value heads, MLP width) of each layer of the tiny Llama-Nemotron model (0: that part
#: removed); widths are multiples of 256 (the only ones its ffn_mult states), every one
#: divisible by 2 (TP=2), each PP=2 stage holds a removed part
TINY_HETEROGENEOUS = ((2, 512), (0, 256), (4, 0), (2, 768))
HETERO_HIDDEN, HETERO_HEADS, HETERO_HEAD_DIM = 64, 4, 16


class _Removed(torch.nn.Module):
    """A removed attention or MLP in the reference: adds nothing to the residual stream."""

    def __init__(self, attention: bool):
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states, *args, **kwargs):
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.attention else zeros


def heterogeneous_reference(shapes=TINY_HETEROGENEOUS, seed: int = 0, tied: bool = False):
    """The independent reference of a per-layer model: transformers' LlamaForCausalLM whose
    layers' attention is rebuilt with that layer's key/value heads, its MLP with that layer's
    width, and a removed part replaced by a module that adds zero; random weights and norms."""
    import copy

    import transformers

    config = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=HETERO_HIDDEN, num_attention_heads=HETERO_HEADS,
        num_key_value_heads=HETERO_HEADS, head_dim=HETERO_HEAD_DIM, intermediate_size=max(f for _, f in shapes),
        num_hidden_layers=len(shapes), rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    llama = transformers.models.llama.modeling_llama

    def resized(**changes):  # the model's config (its attention implementation too) with these changes
        changed = copy.deepcopy(model.config)
        for key, value in changes.items():
            setattr(changed, key, value)
        return changed

    for i, (kv_heads, width) in enumerate(shapes):
        layer = model.model.layers[i]
        layer.self_attn = (llama.LlamaAttention(resized(num_key_value_heads=kv_heads), layer_idx=i) if kv_heads
                           else _Removed(attention=True))
        layer.mlp = llama.LlamaMLP(resized(intermediate_size=width)) if width else _Removed(attention=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def heterogeneous_used_weights(model, shapes=TINY_HETEROGENEOUS) -> dict[str, torch.Tensor]:
    """The reference's weights a per-layer model has: those of removed parts (and their norms) left out."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # the embedding
        if name.startswith("model.layers."):
            i, rest = int(name.split(".")[2]), name.split(".", 3)[3]
            kv_heads, width = shapes[i]
            if rest.startswith(("self_attn.", "input_layernorm.")) and not kv_heads:
                continue
            if rest.startswith(("mlp.", "post_attention_layernorm.")) and not width:
                continue
        out[name] = t.detach().clone().contiguous()
    return out


def make_tiny_heterogeneous(directory: Path, shapes=TINY_HETEROGENEOUS, seed: int = 0, tied: bool = False):
    """Write the reference's weights as a Llama-Nemotron (nemotron-nas) directory, its
    config.json written here from the format's definition (block_configs: n_heads_in_group,
    ffn_mult = 1.5 x width / hidden); returns (directory, reference model)."""
    import json

    from safetensors.torch import save_file

    model = heterogeneous_reference(shapes, seed, tied)
    directory.mkdir(parents=True)
    blocks = [{"attention": {"n_heads_in_group": HETERO_HEADS // g if g else None, "no_op": not g,
                             "replace_with_linear": False},
               "ffn": {"ffn_mult": 1.5 * f / HETERO_HIDDEN if f else None, "no_op": not f,
                       "replace_with_linear": False}} for g, f in shapes]
    config = {"architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "vocab_size": TINY_VOCAB,
              "hidden_size": HETERO_HIDDEN, "num_attention_heads": HETERO_HEADS, "head_dim": HETERO_HEAD_DIM,
              "num_hidden_layers": len(shapes), "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 4096, "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": "float32", "block_configs": blocks}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(heterogeneous_used_weights(model, shapes), str(directory / "model.safetensors"), metadata={"format": "pt"})
    byte_tokenizer().save_pretrained(str(directory))
    return directory, model
