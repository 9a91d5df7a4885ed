"""High-level checkpoint flows used by the CLI and the pipeline: convert, export, open a model.

Each validates all of its input before the first collective or the first tensor, then
initialises the runtime at the requested layout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from nemo_minitron.checkpoint.config import ExportConfig
from nemo_minitron.checkpoint.hf_export import export_hf, hf_config
from nemo_minitron.checkpoint.hf_format import description_from_hf_config
from nemo_minitron.checkpoint.hf_import import Source, build_from_source, resolve_source
from nemo_minitron.checkpoint.megatron_export import check_export, export_megatron, padded_vocab
from nemo_minitron.checkpoint.store import (
    DTYPES,
    CheckpointInfo,
    dtype_name,
    is_checkpoint,
    load_checkpoint,
    load_tokenizer,
    megatron_checkpoint,
    read_info,
    require_tokenizer,
    save_checkpoint,
    tokenizer_dir,
)
from nemo_minitron.checkpoint.verify import verify_export
from nemo_minitron.errors import UsageError, require
from nemo_minitron.files import check_new_output, name_the_checkpoint_inside
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.runtime.config import stage_configs
from nemo_minitron.runtime.distributed import check_world_size, init_distributed

log = logging.getLogger("nemo_minitron")


def convert(src: "str | Source", out: str, *, dtype: torch.dtype | None = None, spec: str = "auto",
            **options: Any) -> Path:
    """Hugging Face directory / .gguf / alias, or a Megatron-LM / Megatron-Bridge / NeMo 2
    checkpoint -> project checkpoint at ``out`` (``dtype``: of the stored weights, default
    the source's). ``options``: ``tp``, ``pp``, ``seed``."""
    configs = stage_configs(None, None, options, data=False)
    tp, pp, seed = configs.parallel.tp, configs.parallel.pp, configs.run.seed
    if not isinstance(src, Source) and megatron_checkpoint(src) is not None:
        return _convert_megatron(src, out, tp=tp, pp=pp, dtype=dtype, spec=spec, seed=seed)
    source = src if isinstance(src, Source) else resolve_source(src)
    src = source.label
    out_path = check_new_output(out)
    desc = source.description
    source.tokenizer()  # the checkpoint carries it: refused now, not after the weights are converted
    desc.check_layout(tp, pp)
    check_world_size(tp, pp)
    init_distributed(tp, pp, seed)
    dtype = dtype or source.dtype
    log.info("converting %s: %s", src, desc.summary())
    model = build_from_source(source, dtype=dtype, spec=spec)
    info = CheckpointInfo(desc, dtype_name(dtype), {"converted_from": src, "source_kind": source.kind})
    return save_checkpoint(model, info, out_path, tokenizer=source.tokenizer())


def _convert_megatron(src: str, out: str, *, tp: int, pp: int, dtype: torch.dtype | None, spec: str,
                      seed: int) -> Path:
    info = read_info(src)
    require_tokenizer(src, "a converted checkpoint carries its tokenizer")
    out_path = check_new_output(out)
    info.description.check_layout(tp, pp)
    check_world_size(tp, pp)
    init_distributed(tp, pp, seed)
    log.info("converting %s: %s", src, info.description.summary())
    model, info = load_checkpoint(src, dtype=dtype, spec=spec)
    saved = CheckpointInfo(info.description, dtype_name(dtype) if dtype else info.dtype, info.provenance)
    return save_checkpoint(model, saved, out_path, tokenizer=load_tokenizer(src))


class OpenedModel:
    """A model at the current layout, from a checkpoint or any convertible source."""

    def __init__(self, model, description: ModelDescription, tokenizer, label: str,
                 checkpoint: Path | None, info: CheckpointInfo | None = None):
        self.model, self.description, self.tokenizer = model, description, tokenizer
        self.label, self.checkpoint, self.info = label, checkpoint, info


def describe_model(path: str, flag: str = "MODEL") -> ModelDescription:
    """The description of a checkpoint or source, validated, without loading weights."""
    if is_checkpoint(path) or megatron_checkpoint(path) is not None:
        return read_info(path).description
    return _source_or_error(path, flag).description


def describe_shapes(path: str, flag: str = "MODEL") -> ModelDescription:
    """``describe_model``, and also for a plain Hugging Face ``config.json`` (or a directory
    holding one and no weights): planning needs the shapes only."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and not is_checkpoint(p):
        p = p / "config.json"
    if p.is_file() and p.suffix == ".json":
        try:
            return description_from_hf_config(json.loads(p.read_text()), name=p.parent.name)
        except json.JSONDecodeError as e:
            raise UsageError(f"{flag} '{path}': not JSON ({e.msg})") from None
    return describe_model(path, flag)


def _source_or_error(path: str, flag: str) -> Source:
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists():
        if (p / "weights").exists():
            read_info(p)  # raises a clear error about the broken checkpoint
        name_the_checkpoint_inside(p, flag)
    return resolve_source(path, flag)


def model_tokenizer(path: str, flag: str = "MODEL"):
    """The tokenizer of a checkpoint or source, without loading any weights."""
    if is_checkpoint(path) or megatron_checkpoint(path) is not None:
        return load_tokenizer(path)
    return _source_or_error(path, flag).tokenizer()


def open_model(path: str, *, dtype: torch.dtype | None = None, spec: str = "auto", flag: str = "MODEL") -> OpenedModel:
    """Load a project checkpoint, or convert a source in memory (runtime must be initialised)."""
    if is_checkpoint(path) or megatron_checkpoint(path) is not None:
        model, info = load_checkpoint(path, dtype=dtype, spec=spec)
        return OpenedModel(model, info.description, load_tokenizer(path), path, Path(path), info)
    source = _source_or_error(path, flag)
    model = build_from_source(source, dtype=dtype, spec=spec)
    return OpenedModel(model, source.description, source.tokenizer(), path, None)


def export(ckpt: str, hf_out: str | None = None, config: ExportConfig | None = None, *,
           megatron_out: str | None = None, dtype: torch.dtype | None = None, **options: Any) -> Path:
    """Checkpoint (project, Megatron-LM, Megatron-Bridge or NeMo 2) -> a Hugging Face model
    directory at ``hf_out`` and/or a Megatron-LM / Megatron-Bridge checkpoint at
    ``megatron_out`` (vocabulary padded as ``vocab_padding`` says: see
    ``megatron_export.padded_vocab``); ``dtype``: of the exported weights, default as
    stored. ``config``: an ExportConfig (defaults if None); ``options``: any of its fields
    (``verify``, ``vocab_padding``), or ``tp``, ``pp``, ``seed``. Returns the last path written."""
    configs = stage_configs(ExportConfig, config, options, data=False)
    tp, pp, seed = configs.parallel.tp, configs.parallel.pp, configs.run.seed
    verify, vocab_padding = configs.stage.verify, configs.stage.vocab_padding
    require(hf_out or megatron_out, "export: give --hf-out DIR and/or --megatron-out DIR")
    info = read_info(ckpt)
    if hf_out:
        hf_config(info.description, dtype or DTYPES[info.dtype])  # transformers can hold this model
    hf_path = check_new_output(hf_out, "--hf-out") if hf_out else None
    mg_path = check_new_output(megatron_out, "--megatron-out") if megatron_out else None
    require(not (hf_path and mg_path and hf_path.resolve() == mg_path.resolve()),
            "--hf-out and --megatron-out must differ")
    info.description.check_layout(tp, pp)
    if mg_path is not None:
        check_export(info.description, padded_vocab(info.description.vocab_size, vocab_padding, tp))
        require_tokenizer(ckpt, "--megatron-out writes it into the checkpoint")
    check_world_size(tp, pp)
    init_distributed(tp, pp, seed)
    model, info = load_checkpoint(ckpt, dtype=dtype)
    out_dtype = dtype or DTYPES[info.dtype]
    path = None
    if hf_path is not None:
        path = export_hf(model, info.description, hf_path, tokenizer_dir=tokenizer_dir(ckpt), dtype=out_dtype,
                         sparsity=info.provenance.get("sparsity"))
        if verify:
            verify_export(model, info.description, path)
    if mg_path is not None:
        path = export_megatron(model, info, mg_path, tokenizer_dir=tokenizer_dir(ckpt), vocab_padding=vocab_padding,
                               dtype=out_dtype)
    return path
