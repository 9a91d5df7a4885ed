"""Write a Hugging Face model directory from a megatron-core model: config.json,
safetensors shards with their index, generation config and tokenizer files, loadable
by ``transformers.AutoModelForCausalLM`` with no custom code.

Every pipeline stage writes the shards of its own layers (tensor-parallel slices are
gathered per tensor), so no rank ever holds the whole model. The directory appears
only when complete. Names and config keys come from the family's table
(``checkpoint/hf_format.py``). Pruned shapes are handled: explicit ``head_dim``, any
number of query groups and layers; if the installed transformers rejects a family's
config for its shape, a family with a ``fallback`` (Llama -> Mistral) is written as
that numerically identical family and the log says so. A sparse model (``sparsify``)
is written with its zeros in the weights, plus its masks by HF name in
``sparsity_masks-stageNNN.safetensors`` and its record in ``sparsity.json``.

A heterogeneous model (per-layer shapes) is written in the Llama-Nemotron format
(``nemotron-nas``, ``block_configs``) with the modeling code of ``checkpoint/decilm/``
beside it (``auto_map``): load it with ``trust_remote_code=True``.
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
import transformers
from megatron.core import parallel_state as ps
from safetensors.torch import save_file

from nemo_minitron.checkpoint import decilm
from nemo_minitron.checkpoint.hf_format import canonical_to_hf, hf_config_dict
from nemo_minitron.checkpoint.store import atomic_directory, dtype_name
from nemo_minitron.errors import require
from nemo_minitron.families import family
from nemo_minitron.families.nemotron_nas import NEMOTRON_NAS
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.hybrid import tp_sections
from nemo_minitron.model.params import gather, named_weights
from nemo_minitron.runtime.distributed import is_rank0
from nemo_minitron.sparsity.masks import mask_of

log = logging.getLogger("nemo_minitron")

MAX_SHARD_BYTES = 4 * 1024**3
MASKS_FILE = "sparsity_masks"     # a sparse model's masks by HF name (True: the weight may be non-zero)
SPARSITY_FILE = "sparsity.json"   # its sparsity record, and which file holds each mask


def hf_config(desc: ModelDescription, dtype: torch.dtype, flag: str = "CKPT") -> dict[str, Any]:
    """config.json contents, validated by the installed transformers' own config class.

    The shapes a model may have are those megatron-core builds (``prune.targets``) and a
    transformers class of its family holds: its own, or the numerically identical family
    its table names as ``fallback`` (a Llama whose hidden size is not a multiple of its
    heads, which LlamaConfig refuses, is written as Mistral: ``fallback_note``). Any other
    shape is a one-line error."""
    if desc.is_heterogeneous:  # transformers has no class for it: the export ships its own code
        return heterogeneous_hf_config(desc, dtype)
    fam = family(desc.architecture)
    require(hasattr(transformers, fam.config_class), f"transformers {transformers.__version__} has no "
                                                     f"{fam.config_class}: upgrade it to export a {fam.model_type} model")
    candidate = {**hf_config_dict(desc), "torch_dtype": dtype_name(dtype)}
    reason = _refusal(fam.config_class, candidate)
    if reason is None:
        return candidate
    shape = f"{desc.architecture} shape ({desc.summary()})"
    require(fam.fallback is not None, f"{flag}: transformers {transformers.__version__}'s {fam.config_class} "
                                      f"refuses this {shape}: {reason}")
    fallback = family(fam.fallback)
    candidate = {**hf_config_dict(desc, fam.fallback), "torch_dtype": dtype_name(dtype)}
    second = _refusal(fallback.config_class, candidate)
    require(second is None, f"{flag}: transformers {transformers.__version__}'s {fam.config_class} and "
                            f"{fallback.config_class} refuse this {shape}: {reason}; {second}")
    return candidate


def fallback_note(desc: ModelDescription, config: dict[str, Any]) -> str | None:
    """What to log when ``config`` (from ``hf_config``) writes ``desc`` as its fallback family."""
    if config["model_type"] == desc.architecture:
        return None
    fam = family(desc.architecture)
    reason = _refusal(fam.config_class, {**hf_config_dict(desc), "torch_dtype": config["torch_dtype"]})
    return (f"transformers {transformers.__version__}'s {fam.config_class} refuses this shape ({reason}): a Hugging "
            f"Face export writes it as {config['architectures'][0]}, which computes the same function")


def heterogeneous_hf_config(desc: ModelDescription, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of a model with per-layer shapes: the nemotron-nas format (a one-line error
    for what it cannot state, e.g. an MLP width its ffn_mult cannot give), naming the
    shipped modeling code in ``auto_map``."""
    config = hf_config_dict(desc, NEMOTRON_NAS.model_type)
    return {**config, "auto_map": dict(decilm.AUTO_MAP), "torch_dtype": dtype_name(dtype)}


def _refusal(config_class: str, values: dict[str, Any]) -> str | None:
    """Why transformers' ``config_class`` refuses ``values`` (None: it accepts them)."""
    try:
        getattr(transformers, config_class)(**values)
    except Exception as e:  # transformers raises ValueError and others: the message is the reason
        return str(e).strip().splitlines()[-1].strip() or type(e).__name__
    return None


def _write_stage_shards(model, desc: ModelDescription, directory: Path, stage: int) -> tuple[dict[str, str],
                                                                                        dict[str, str]]:
    """Gather this stage's tensors over TP and write them (TP rank 0 writes); returns name -> file
    for the weights and for the sparsity masks (a sparse model's, in a file of their own)."""
    writer = ps.get_tensor_model_parallel_rank() == 0
    tp_group = ps.get_tensor_model_parallel_group()
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
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
        full = gather(name, param.detach(), group=tp_group, gated=desc.gated, sections=tp_sections(desc, name))
        mask = mask_of(param)
        if mask is not None:  # uint8 over the wire: gloo gathers no bool tensors
            mask = gather(name, mask.to(torch.uint8), group=tp_group, gated=desc.gated).bool()
        if not writer:
            continue
        for hf_name, tensor in canonical_to_hf(desc, name, full):
            shard[hf_name] = tensor.contiguous().clone()
            shard_bytes += tensor.numel() * tensor.element_size()
        if mask is not None:
            masks.update((hf_name, t.contiguous().clone()) for hf_name, t in canonical_to_hf(desc, name, mask))
        if shard_bytes >= MAX_SHARD_BYTES:
            flush()
    flush()
    mask_map: dict[str, str] = {}
    if masks and writer:
        file = f"{MASKS_FILE}-stage{stage:03d}.safetensors"
        save_file(masks, str(directory / file), metadata={"format": "pt"})
        mask_map = {k: file for k in masks}
    return weight_map, mask_map


def export_hf(model, desc: ModelDescription, out: str | os.PathLike, *, tokenizer_dir: Path | None,
              dtype: torch.dtype, sparsity: dict[str, Any] | None = None) -> Path:
    """Collective over all ranks: write ``out`` as a Hugging Face model directory. A sparse
    model's weights hold their zeros; its masks go to ``sparsity_masks-stageNNN.safetensors``
    and ``sparsity`` (the checkpoint's record) to ``sparsity.json``."""
    out = Path(out)
    config = hf_config(desc, dtype)
    if config["model_type"] != desc.architecture:  # the fallback family: its own table names the weights
        if not desc.is_heterogeneous:
            log.info("%s", fallback_note(desc, config))
        desc = desc.replace(architecture=config["model_type"])
    with atomic_directory(out) as tmp:
        local_maps: tuple[dict[str, str], dict[str, str]] = ({}, {})
        if ps.get_data_parallel_rank() == 0:
            local_maps = _write_stage_shards(model, desc, tmp, ps.get_pipeline_model_parallel_rank())
        maps = [None] * dist.get_world_size() if dist.is_initialized() else [local_maps]
        if dist.is_initialized():
            dist.all_gather_object(maps, local_maps)
        if is_rank0():
            weight_map = {k: v for m in maps for k, v in (m[0] if m else {}).items()}
            mask_map = {k: v for m in maps for k, v in (m[1] if m else {}).items()}
            if mask_map:
                record = {k: v for k, v in (sparsity or {}).items() if k not in ("config", "weights")}
                (tmp / SPARSITY_FILE).write_text(json.dumps({**record, "masks": dict(sorted(mask_map.items()))},
                                                            indent=2))
            files = sorted(set(weight_map.values()))
            total = sum((tmp / f).stat().st_size for f in files)
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
            if "auto_map" in config:  # the format's modeling code, for trust_remote_code
                for name in decilm.CODE_FILES:
                    shutil.copy2(decilm.CODE_DIR / name, tmp / name)
            if tokenizer_dir is not None and tokenizer_dir.is_dir():
                for f in tokenizer_dir.iterdir():
                    shutil.copy2(f, tmp / f.name)
    log.info("exported %s as %s to %s", desc.summary(), config["architectures"][0], out)
    return out
