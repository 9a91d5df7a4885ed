"""Write a Hugging Face model directory from a megatron-core model: config.json,
safetensors shards with their index, generation config and tokenizer files, loadable
by ``transformers.AutoModelForCausalLM`` with no custom code.

Every pipeline stage writes the shards of its own layers (tensor-parallel slices are
gathered per tensor), so no rank ever holds the whole model. The directory appears
only when complete. Pruned shapes are handled: explicit ``head_dim``, any number of
query groups and layers; if the installed transformers rejects a Llama config whose
hidden size is not a multiple of the head count, the model is written as the
numerically identical ``MistralForCausalLM`` (no sliding window) and the log says so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_minitron.checkpoint.hf_format import canonical_to_hf
from nemo_minitron.checkpoint.store import atomic_directory, dtype_name
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.params import gather, named_weights
from nemo_minitron.runtime.distributed import is_rank0

log = logging.getLogger("nemo_minitron")

_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
MAX_SHARD_BYTES = 4 * 1024**3


def hf_config(desc: ModelDescription, dtype: torch.dtype) -> dict[str, Any]:
    """config.json contents, validated by the installed transformers' own config class."""
    import transformers

    arch = desc.architecture
    candidate = _config_dict(desc, arch, dtype)
    try:
        getattr(transformers, type_name(arch))(**candidate)
    except Exception as e:
        if arch != "llama":
            raise
        log.warning("transformers %s rejects this Llama shape (%s); writing it as MistralForCausalLM, "
                    "which computes the same function", transformers.__version__, str(e).strip().splitlines()[-1])
        arch = "mistral"
        candidate = _config_dict(desc, arch, dtype)
        getattr(transformers, type_name(arch))(**candidate)
    return candidate


def type_name(arch: str) -> str:
    return {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}[arch]


def _config_dict(desc: ModelDescription, arch: str, dtype: torch.dtype) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": [_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": desc.vocab_size,
        "hidden_size": desc.hidden_size,
        "intermediate_size": desc.ffn_hidden_size,
        "num_hidden_layers": desc.num_layers,
        "num_attention_heads": desc.num_attention_heads,
        "num_key_value_heads": desc.num_query_groups,
        "head_dim": desc.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": desc.norm_eps,
        "max_position_embeddings": desc.max_position_embeddings,
        "tie_word_embeddings": desc.tie_embeddings,
        "rope_theta": desc.rope_theta,
        "rope_scaling": dict(desc.rope_scaling) if desc.rope_scaling else None,
        "bos_token_id": desc.bos_token_id,
        "eos_token_id": desc.eos_token_id,
        "pad_token_id": desc.pad_token_id,
        "torch_dtype": dtype_name(dtype),
    }
    if arch == "llama":
        cfg.update(attention_bias=desc.qkv_bias, mlp_bias=False)
    elif arch == "mistral":
        cfg["sliding_window"] = desc.sliding_window
    else:  # qwen2 always has q/k/v biases
        cfg.update(use_sliding_window=desc.sliding_window is not None, sliding_window=desc.sliding_window)
    return cfg


def _write_stage_shards(model, desc: ModelDescription, directory: Path, stage: int) -> dict[str, str]:
    """Gather this stage's tensors over TP and write them (TP rank 0 writes); returns name -> file."""
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    writer = ps.get_tensor_model_parallel_rank() == 0
    tp_group = ps.get_tensor_model_parallel_group()
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shard_no = 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, shard_no
        if shard and writer:
            file = f"model-stage{stage:03d}-{shard_no:05d}.safetensors"
            save_file(shard, str(directory / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
        shard, shard_bytes, shard_no = {}, 0, shard_no + 1

    tied_copy = desc.tie_embeddings and not ps.is_pipeline_first_stage()
    for name, param in named_weights(model):
        if name == "output_layer.weight" and tied_copy:
            continue  # the last stage's copy of tied embeddings; the first stage writes them
        full = gather(name, param.detach(), group=tp_group)
        if not writer:
            continue
        for hf_name, tensor in canonical_to_hf(desc, name, full):
            shard[hf_name] = tensor.contiguous().clone()
            shard_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes >= MAX_SHARD_BYTES:
            flush()
    flush()
    return weight_map


def export_hf(model, desc: ModelDescription, out: str | os.PathLike, *, tokenizer_dir: Path | None,
              dtype: torch.dtype) -> Path:
    """Collective over all ranks: write ``out`` as a Hugging Face model directory."""
    from megatron.core import parallel_state as ps

    out = Path(out)
    config = hf_config(desc, dtype)
    with atomic_directory(out) as tmp:
        local_map: dict[str, str] = {}
        if ps.get_data_parallel_rank() == 0:
            local_map = _write_stage_shards(model, desc, tmp, ps.get_pipeline_model_parallel_rank())
        maps = [None] * dist.get_world_size() if dist.is_initialized() else [local_map]
        if dist.is_initialized():
            dist.all_gather_object(maps, local_map)
        if is_rank0():
            weight_map = {k: v for m in maps for k, v in (m or {}).items()}
            files = sorted(set(weight_map.values()))
            total = sum((tmp / f).stat().st_size for f in files)
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
            if tokenizer_dir is not None and tokenizer_dir.is_dir():
                for f in tokenizer_dir.iterdir():
                    shutil.copy2(f, tmp / f.name)
    log.info("exported %s as %s to %s", desc.summary(), config["architectures"][0], out)
    return out
