"""The CPU fallback switch and the model description (no weights involved)."""

from __future__ import annotations

import pytest
import torch

from nemo_minitron.checkpoint.hf_format import description_from_hf_config
from nemo_minitron.errors import UsageError
from nemo_minitron.model.description import ModelDescription


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is only used without a GPU")
def test_cpu_fallback_switches_on_and_off(runtime):
    from nemo_minitron.runtime import cpu_fallback

    assert cpu_fallback.is_enabled()  # the runtime turned it on
    assert torch.empty(2, device="cuda").device.type == "cpu"
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"  # what megatron's optimizer checks
    cpu_fallback.disable()
    try:
        assert not cpu_fallback.is_enabled()
        assert torch.ones(1).type() == "torch.FloatTensor"
        with pytest.raises((RuntimeError, AssertionError)):
            torch.empty(2, device="cuda")
        assert torch.cuda.current_device is not None and torch.Tensor.cuda is not None
    finally:
        cpu_fallback.enable()
    assert torch.cuda.current_device() == torch.device("cpu")


LLAMA_31_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
               "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


def test_llama31_8b_description():
    desc = description_from_hf_config(LLAMA_31_8B)
    assert desc.head_dim == 128 and desc.heads_per_group == 4 and not desc.tie_embeddings
    assert desc.rope_scaling["rope_type"] == "llama3"
    assert desc.num_parameters() == 8_030_261_248  # Meta's published count for Llama-3.1-8B
    assert desc.kv_cache_bytes_per_token() == 2 * 32 * 8 * 128 * 2
    assert ModelDescription.from_dict(desc.to_dict()) == desc


def test_qwen_bias_and_transformers5_rope_keys():
    qwen = description_from_hf_config({"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
                                       "intermediate_size": 4864, "num_hidden_layers": 24,
                                       "num_attention_heads": 14, "num_key_value_heads": 2,
                                       "tie_word_embeddings": True, "use_sliding_window": False,
                                       "sliding_window": 32768,
                                       "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}})
    assert qwen.qkv_bias and qwen.rope_theta == 1e6  # sliding_window is inactive (use_sliding_window false)
    assert qwen.num_parameters() == 494_032_768  # Qwen2.5-0.5B


def test_layout_errors_name_the_flag():
    desc = description_from_hf_config(LLAMA_31_8B)
    desc.check_layout(8, 4)
    with pytest.raises(UsageError, match=r"--tp 3 does not divide .* allowed --tp values: 1, 2, 4, 8"):
        desc.check_layout(3, 1)
    with pytest.raises(UsageError, match="--pp 64"):
        desc.check_layout(1, 64)
    with pytest.raises(UsageError, match="unsupported architecture 'gpt2'"):
        description_from_hf_config({**LLAMA_31_8B, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UsageError, match="multiple of query groups"):
        desc.replace(num_attention_heads=30)
