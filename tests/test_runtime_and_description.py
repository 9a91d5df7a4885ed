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


# ---------------------------------------------------------------------- --dtype auto
def _facts(capability="AVX512", flags=("avx2", "avx512f"), gpu=None, gpu_bf16=False, onednn=None):
    from nemo_minitron.runtime.precision import MachineFacts

    return MachineFacts(gpu=gpu, gpu_bf16=gpu_bf16, cpu_capability=capability, cpu_flags=frozenset(flags),
                        onednn_isa=onednn)


@pytest.mark.parametrize("facts, dtype, words", [
    # a CPU with bf16 instructions whose kernels torch uses: bf16
    (_facts(flags=("avx512f", "avx512_bf16")), "bfloat16", ["natively", "AVX512", "avx512_bf16"]),
    (_facts(flags=("avx512f", "amx_bf16", "amx_tile")), "bfloat16", ["natively", "amx_bf16"]),
    (_facts(flags=("avx512_bf16",), onednn="AVX512_CORE_BF16"), "bfloat16", ["natively"]),
    # AVX2 kernels (an AVX2-only CPU, or ATEN_CPU_CAPABILITY=avx2 on any CPU: /proc/cpuinfo
    # still lists avx512_bf16 then): bf16 products are emulated, float32
    (_facts(capability="AVX2", flags=("avx2",)), "float32", ["no native bf16 matrix products (AVX2)"]),
    (_facts(capability="AVX2", flags=("avx2", "avx512_bf16")), "float32", ["(AVX2)"]),
    # AVX-512 without bf16 instructions (Skylake, Cascade Lake), or kernels other than x86's
    (_facts(), "float32", ["AVX512 without avx512_bf16 or amx_bf16"]),
    (_facts(capability="DEFAULT", flags=("fp", "asimd", "bf16")), "float32", ["(DEFAULT)"]),
    # oneDNN, which computes the bf16 products, held below its bf16 kernels
    (_facts(flags=("avx512_bf16",), onednn="AVX2"), "float32", ["ONEDNN_MAX_CPU_ISA", "AVX2"]),
    # a GPU decides whatever the CPU is
    (_facts(capability="AVX2", gpu="NVIDIA H100", gpu_bf16=True), "bfloat16", ["GPU (NVIDIA H100)"]),
    (_facts(flags=("avx512_bf16",), gpu="Tesla V100", gpu_bf16=False), "float32", ["no bf16 support"]),
])
def test_auto_dtype_is_bf16_only_where_it_is_native(facts, dtype, words):
    from nemo_minitron.runtime.precision import choose_auto_dtype

    choice = choose_auto_dtype(facts)
    assert choice.dtype == dtype and all(w in choice.reason for w in words), choice


def test_auto_dtype_pin_and_explicit_dtypes(monkeypatch):
    """``auto`` follows the machine unless pinned; an explicit dtype is what it says."""
    from nemo_minitron.runtime import precision

    monkeypatch.setattr(precision, "probe", lambda: precision.AutoChoice("bfloat16", "a native bf16 CPU"))
    monkeypatch.delenv(precision.PIN_ENV, raising=False)
    auto = precision.resolve_dtype("auto")
    assert (auto.name, auto.torch) == ("bfloat16", torch.bfloat16)
    assert auto.describe() == "dtype auto -> bfloat16: a native bf16 CPU"
    monkeypatch.setenv(precision.PIN_ENV, "float32")
    assert precision.resolve_dtype("auto").describe() == "dtype auto -> float32: pinned by $NEMO_MINITRON_AUTO_DTYPE"
    for name in ("float32", "bfloat16", "float16"):
        explicit = precision.resolve_dtype(name, "--dtype")
        assert explicit.torch == getattr(torch, name) and explicit.describe() == f"dtype {name} (set by --dtype)"
        assert precision.stored_dtype(name) == getattr(torch, name)
    assert precision.stored_dtype("auto") is None  # convert, export, prune: keep the stored dtype
    monkeypatch.setenv(precision.PIN_ENV, "fp8")
    with pytest.raises(UsageError, match="NEMO_MINITRON_AUTO_DTYPE must be one of"):
        precision.resolve_dtype("auto")


def test_dtype_auto_is_the_default_resolved_and_logged(tiny_checkpoint, tmp_path):
    """``eval`` with no --dtype on a CPU whose torch kernels are AVX2 (emulated here, as on an
    AVX2-only machine; the pin of the test suite removed): float32, and the log says why."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != "NEMO_MINITRON_AUTO_DTYPE"}
    # a kernel cache of its own: inductor kernels compiled for AVX-512 would be served otherwise
    env.update(PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "nemo_minitron", "eval", str(tiny_checkpoint("llama")), "--data",
                           "builtin:heldout", "--seq-len", "16", "--max-tokens", "32", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dtype auto -> float32: this CPU has no native bf16 matrix products (AVX2)" in proc.stderr, proc.stderr
    assert json.loads(out.read_text())["dtype"] == "float32"
