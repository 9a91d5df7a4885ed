"""SDPA core attention (model/attention.py) against megatron-core's DotProductAttention."""

from __future__ import annotations

import math
from unittest import mock

import torch

from tolerances import fp32, transformer_logits

KIND = "llama_pruned_shape"  # 4 heads in 2 query groups (GQA), head_dim 24 != hidden / heads, 5 layers


def _attention_modules(model):
    return [layer.self_attention.core_attention for layer in model.decoder.layers]


def test_sdpa_logits_and_gradients_equal_dot_product_attention(tiny_checkpoint):
    """On a CPU the builder puts SDPAttention in the local spec; every layer then computes
    with SDPA, and the logits and all gradients equal DotProductAttention's (the same
    modules with the SDPA path switched off) within float32 rounding."""
    import nemo_minitron.model.attention as attention
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.model.forward import position_ids

    opened = open_model(str(tiny_checkpoint(KIND)), dtype=torch.float32)
    model, desc = opened.model, opened.description
    model.train()
    modules = _attention_modules(model)
    assert all(isinstance(m, attention.SDPAttention) for m in modules)
    tokens = torch.randint(0, desc.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    mix = torch.randn(2, 40, desc.padded_vocab_size, generator=torch.Generator().manual_seed(4))

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(tokens, position_ids(tokens), None)
        (logits * mix).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    sdpa = mock.patch.object(attention.F, "scaled_dot_product_attention", wraps=attention.F.scaled_dot_product_attention)
    with sdpa as spy:
        logits, grads = run()
    assert spy.call_count == desc.num_layers  # every layer took the SDPA path
    for m in modules:
        m.sdpa_applies = False
    with mock.patch.object(attention.F, "scaled_dot_product_attention", wraps=attention.F.scaled_dot_product_attention) as spy:
        ref_logits, ref_grads = run()
    assert spy.call_count == 0
    width = max(desc.hidden_size, desc.ffn_hidden_size, desc.num_attention_heads * desc.head_dim)
    assert (logits - ref_logits).abs().max().item() <= transformer_logits(width, desc.num_layers, ref_logits)
    for name, want in ref_grads.items():
        # a gradient sums, over the tokens, products that passed back through at most
        # width x (2 layers + 1) accumulations
        tol = fp32(tokens.numel() * width * (2 * desc.num_layers + 1), want.abs().max().item())
        assert (grads[name] - want).abs().max().item() <= tol, name


def _module(runtime, attention_dropout: float = 0.0):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemo_minitron.model.attention import SDPAttention

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               kv_channels=8, attention_dropout=attention_dropout, use_cpu_initialization=True)
    return SDPAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def _qkv(sq: int, sk: int, b: int = 2):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(sq, b, 4, 8, generator=g), torch.randn(sk, b, 2, 8, generator=g),
            torch.randn(sk, b, 2, 8, generator=g))


def _attend(q, k, v, allowed):
    """softmax(q k / sqrt(d)) v over the keys ``allowed`` [sq, sk] (True: attended), written out."""
    k, v = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,kbhd->qbhd", probs, v).reshape(q.shape[0], q.shape[1], -1)


def test_sdpa_attention_falls_back_where_its_causal_mask_would_differ(runtime):
    """A decode step (one query against a cache of keys) attends to every key, and an explicit
    mask is honoured: DotProductAttention's meaning, where SDPA's causal flag would keep only
    the first key (its mask is aligned to the top left) or ignore the mask."""
    module = _module(runtime).eval()
    q, k, v = _qkv(1, 6)
    out = module(q, k, v, None)
    assert (out - _attend(q, k, v, torch.ones(1, 6, dtype=torch.bool))).abs().max().item() <= fp32(8 * 6, 4.0)

    q, k, v = _qkv(6, 6)
    masked = torch.zeros(6, 6, dtype=torch.bool)
    masked[:, 4:] = True  # the last two keys are padding (True: masked, megatron's convention)
    out = module(q, k, v, masked.view(1, 1, 6, 6))
    assert (out - _attend(q, k, v, ~masked)).abs().max().item() <= fp32(8 * 6, 4.0)
    # without a mask: causal, as the SDPA path computes it
    out = module(q, k, v, None)
    assert (out - _attend(q, k, v, torch.ones(6, 6, dtype=torch.bool).tril())).abs().max().item() <= fp32(8 * 6, 4.0)


def test_sdpa_attention_keeps_attention_dropout_in_training(runtime):
    """With attention dropout, training drops attention probabilities (DotProductAttention's
    path) and evaluation does not: the two outputs differ; without dropout they are equal."""
    q, k, v = _qkv(6, 6)
    module = _module(runtime, attention_dropout=0.5)
    assert not torch.allclose(module.train()(q, k, v, None), module.eval()(q, k, v, None))
    module = _module(runtime)
    assert torch.equal(module.train()(q, k, v, None), module.eval()(q, k, v, None))
