"""Read the checkpoints Megatron users hold, in place: Megatron-LM, Megatron-Bridge, NeMo 2.

    Megatron-LM / Megatron-Bridge            NeMo 2
    DIR/latest_checkpointed_iteration.txt    CKPT/context/model.yaml   (config:, tokenizer:)
    DIR/latest_train_state.pt   (Bridge)     CKPT/context/nemo_tokenizer/
    DIR/iter_0000010/                        CKPT/weights/             (torch_dist, keys
      metadata.json .metadata *.distcp                                  under ``module.``)
      common.pt        (Megatron-LM: the ``args`` Namespace)
      run_config.yaml  (Bridge: ``model:`` provider section)
      train_state.pt tokenizer/  (Bridge)

The layouts follow Megatron-LM ``megatron/training/checkpointing.py``
(``get_checkpoint_name``, ``read_metadata``, ``save_checkpoint``), Megatron-Bridge
``megatron/bridge/training/checkpointing.py`` (``save_checkpoint``) and
``utils/checkpoint_utils.py``, and NeMo 2 ``nemo/lightning/io/mixin.py`` (``io_dump``:
``context/model.yaml``) with ``nemo/lightning/io/connector.py`` (``nemo_tokenizer``).

Weights are read directly, not converted: a GPTModel is built from the description
(``megatron_config``) at the current layout and filled by megatron-core's
``dist_checkpointing.load`` from the stored keys, stacked (one key per weight kind,
leading layer axis) or per layer (``decoder.layers.{i}.``), whatever TP/PP saved them.
The embedding and output layer are loaded with megatron's ``allow_shape_mismatch``, so
any vocabulary padding reads into the project's; rows past the true vocabulary are
zeroed. Optimizer, RNG and Transformer Engine ``_extra_state`` entries are never read.

Nothing executes code from the files: YAML is read with ``safe_load``; ``common.pt`` (from
megatron-core 0.17 on: the common-state object inside the shards) with torch's
``weights_only`` loader, every class it names (Megatron's enums and configs,
a trainer's callbacks) standing in as an inert object; the ``.metadata`` index through
the project's allow-list unpickler. Checkpoints in the legacy ``mp_rank_XX`` format, ``torch_dcp`` /
``fsdp_dtensor`` and ``zarr`` are refused with a one-line error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from transformers import AutoTokenizer

from nemo_minitron.checkpoint import megatron_config
from nemo_minitron.checkpoint.dcp_index import common_state, load_sharded, read_index
from nemo_minitron.checkpoint.megatron_layout import ITERATION_DIR, RUN_CONFIG, is_nemo2, resolve_iteration
from nemo_minitron.errors import UsageError, require
from nemo_minitron.files import COMMON_STATE_FILE, check_complete
from nemo_minitron.model import hybrid
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.params import unwrap

log = logging.getLogger("nemo_minitron")

SUPPORTED = ("torch_dist checkpoints of Megatron-LM and Megatron-Bridge (DIR with "
             "latest_checkpointed_iteration.txt and iter_NNNNNNN/), and NeMo 2 checkpoints (context/ + weights/)")


def _check_format(weights: Path, label: str) -> None:
    """torch_dist only; a one-line error naming what was found otherwise."""
    if any(weights.glob("mp_rank_*")):
        raise UsageError(f"'{label}' is a legacy Megatron-LM checkpoint (mp_rank_XX/model_optim_rng.pt); "
                         f"nemo-minitron reads {SUPPORTED}. Re-save it with Megatron-LM's "
                         "--ckpt-convert-format torch_dist --ckpt-convert-save DIR")
    meta = weights / "metadata.json"
    if not meta.is_file():
        kind = "torch_dcp / fsdp_dtensor" if (weights / ".metadata").is_file() else "no"
        raise UsageError(f"'{label}' holds a {kind} checkpoint (no metadata.json), not megatron-core's "
                         f"torch_dist; nemo-minitron reads {SUPPORTED}. Save with --ckpt-format torch_dist")
    try:
        backend = json.loads(meta.read_text()).get("sharded_backend")
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"'{label}': unreadable metadata.json: {e}") from None
    require(backend == "torch_dist", f"'{label}' is a '{backend}' checkpoint; nemo-minitron reads {SUPPORTED}")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"'{path}' is unreadable: {str(e).splitlines()[0]}") from None
    require(isinstance(data, dict), f"'{path}' is not a YAML mapping")
    return data


# ---------------------------------------------------------------------- the checkpoint
def _layer_shapes(d: ModelDescription, layer: int = 0) -> dict[str, tuple[int, ...]]:
    """Stored key suffix -> shape of layer ``layer``'s tensor (norms under Transformer Engine's
    names, which megatron-core's local spec also uses in checkpoints); a heterogeneous model's
    removed attention or MLP has none."""
    shape = d.layer_shape(layer)
    qkv_rows = (d.num_attention_heads + 2 * shape.num_query_groups) * d.head_dim
    shapes = {
        "self_attention.linear_qkv.layer_norm_weight": (d.hidden_size,),
        "self_attention.linear_qkv.weight": (qkv_rows, d.hidden_size),
        "self_attention.linear_proj.weight": (d.hidden_size, d.num_attention_heads * d.head_dim),
        "mlp.linear_fc1.layer_norm_weight": (d.hidden_size,),
        "mlp.linear_fc1.weight": ((2 if d.gated else 1) * shape.ffn_hidden_size, d.hidden_size),
        "mlp.linear_fc2.weight": (d.hidden_size, shape.ffn_hidden_size),
    }
    if d.qkv_bias:
        shapes["self_attention.linear_qkv.bias"] = (qkv_rows,)
    if d.normalization == "LayerNorm":
        shapes.update({"self_attention.linear_qkv.layer_norm_bias": (d.hidden_size,),
                       "mlp.linear_fc1.layer_norm_bias": (d.hidden_size,)})
    if d.qk_norm:
        for which in ("q", "k"):
            shapes[f"self_attention.{which}_layernorm.weight"] = (d.head_dim,)
            if d.normalization == "LayerNorm":
                shapes[f"self_attention.{which}_layernorm.bias"] = (d.head_dim,)
    if d.is_moe:  # every layer's MLP is a mixture of experts
        shapes = {k: v for k, v in shapes.items() if not k.startswith("mlp.")}
    shapes = {(k,): v for k, v in shapes.items() if (shape.has_attention or not k.startswith("self_attention."))
              and (shape.has_mlp or not k.startswith("mlp."))}
    return {**shapes, **(_moe_layer_shapes(d) if d.is_moe else {})}


#: a MoE layer's norm: the Transformer Engine spec keeps it as a module of its own, megatron's
#: local GPT spec keys it as if fused into a dense linear_fc1
MOE_NORM = ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")


def _moe_layer_shapes(d: ModelDescription) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Stored key suffixes -> shape of a MoE layer's norm, router and experts: SequentialMLP and
    TEGroupedMLP store each expert weight as one key with a leading global expert axis, under
    ``experts.`` inside the ``mlp.experts.`` module (megatron-core 0.16: ``mlp.experts.experts.``)."""
    h, e, width, shared = d.hidden_size, d.num_experts, d.moe_ffn_hidden_size, d.moe_shared_ffn_hidden_size
    up = 2 if d.gated else 1
    shapes = {MOE_NORM: (h,), ("mlp.router.weight",): (e, h), ("mlp.experts.experts.linear_fc1.weight",): (e, up * width, h),
              ("mlp.experts.experts.linear_fc2.weight",): (e, h, width)}
    if d.sigmoid_router:
        shapes[("mlp.router.expert_bias",)] = (e,)
    if shared:
        shapes.update({("mlp.shared_experts.linear_fc1.weight",): (up * shared, h),
                       ("mlp.shared_experts.linear_fc2.weight",): (h, shared)})
    if d.moe_shared_expert_gate:
        shapes[("mlp.shared_experts.gate_weight",)] = (1, h)
    return shapes


#: a hybrid model's layer norm as megatron-core's local spec keys it -> as its Transformer Engine
#: spec (Megatron-LM's and Bridge's checkpoints) keys it, fused into the layer's first linear
TE_NORMS = {"norm.weight": "mixer.in_proj.layer_norm_weight",
            "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
_HYBRID_NORM = re.compile(r"^(.*decoder\.layers\.(\d+)\.)(norm\.weight|input_layernorm\.weight|pre_mlp_layernorm\.weight)$")


def _te_key(key: str, desc: ModelDescription) -> str | None:
    """The Transformer Engine spec's key of a local-spec norm key, None where they agree."""
    if desc.is_hybrid:  # norms fused into the next linear, but a MoE layer's (E) keeps its own
        m = _HYBRID_NORM.match(key)
        return m.group(1) + TE_NORMS[m.group(3)] if m and desc.hybrid_pattern[int(m.group(2))] != hybrid.MOE else None
    if desc.is_moe and key.endswith(MOE_NORM[1]):
        return key[: -len(MOE_NORM[1])] + MOE_NORM[0]
    return None


def te_norm_keys(sharded: dict, desc: ModelDescription, stored: dict | None = None) -> None:
    """Key the layer norms of ``sharded`` (a local-spec sharded state dict) by their Transformer
    Engine names, in place; with ``stored`` (a checkpoint's index), only those the checkpoint
    holds under that name (Bridge's ModelOpt spec stores the local names)."""
    for sh in sharded.values():
        if isinstance(sh, ShardedTensor) and (te := _te_key(sh.key, desc)):
            if stored is None or (sh.key not in stored and te in stored):
                sh.key = te


def _hybrid_layer_shapes(d: ModelDescription, symbol: str) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Stored key suffixes (alternatives: the norm's two names) -> shape, for one layer of a kind;
    the mixer's fused tensors as megatron-core stores them, one key per section."""
    h = d.hidden_size
    if symbol == hybrid.MOE:
        return _moe_layer_shapes(d)
    norm = {"M": "norm.weight", "*": "input_layernorm.weight", "-": "pre_mlp_layernorm.weight"}[symbol]
    shapes = {(norm, TE_NORMS[norm]): (h,)}
    if symbol == hybrid.MAMBA:
        inner, bc, heads, k = hybrid.d_inner(d), hybrid.bc_channels(d), d.mamba_num_heads, d.mamba_conv_kernel
        for section, rows in zip("z x B C dt".split(), (inner, inner, bc, bc, heads)):
            shapes[(f"mixer.in_proj.weight.{section}",)] = (rows, h)
        for section, rows in zip("x B C".split(), (inner, bc, bc)):
            shapes[(f"mixer.conv1d.weight.{section}",)] = (rows, 1, k)
            shapes[(f"mixer.conv1d.bias.{section}",)] = (rows,)
        shapes.update({("mixer.A_log",): (heads,), ("mixer.D",): (heads,), ("mixer.dt_bias",): (heads,),
                       ("mixer.norm.weight",): (inner,), ("mixer.out_proj.weight",): (h, inner)})
    elif symbol == hybrid.ATTENTION:
        shapes.update({("self_attention.linear_qkv.weight",): (d.qkv_rows, h),
                       ("self_attention.linear_proj.weight",): (h, d.num_attention_heads * d.head_dim)})
    else:
        shapes.update({("mlp.linear_fc1.weight",): (d.ffn_hidden_size, h), ("mlp.linear_fc2.weight",): (h, d.ffn_hidden_size)})
    return shapes


@dataclasses.dataclass
class MegatronCheckpoint:
    """One step of a Megatron-LM / Megatron-Bridge / NeMo 2 checkpoint, validated."""

    kind: str                   # megatron-lm | megatron-bridge | nemo2
    path: Path                  # the iteration directory (NeMo 2: the checkpoint directory)
    weights: Path               # the torch_dist directory
    config: dict[str, Any]      # the model config in TransformerConfig / provider vocabulary
    config_source: str          # where ``config`` was read, for messages
    index: dict[str, tuple[tuple[int, ...], torch.dtype | None]]
    tokenizer_dir: Path | None
    declared_vocab: int | None  # the true vocabulary the config states, if it does

    @property
    def iteration(self) -> int | None:
        m = ITERATION_DIR.match(self.path.name)
        return int(m.group(1)) if m else None

    @cached_property
    def prefix(self) -> str:
        """'module.' for NeMo 2; '' for Megatron-LM and Bridge (read from the keys)."""
        for key in self.index:
            if key.endswith("embedding.word_embeddings.weight"):
                return key[: -len("embedding.word_embeddings.weight")]
        raise UsageError(f"'{self.weights}' holds no embedding.word_embeddings.weight: not a GPT checkpoint")

    @cached_property
    def per_layer(self) -> bool:
        """Per-layer keys (decoder.layers.{i}.*) rather than stacked ones (decoder.layers.*)."""
        return any(re.match(rf"^{re.escape(self.prefix)}decoder\.layers\.\d+\.", k) for k in self.index)

    @property
    def stored_vocab(self) -> int:
        return self.index[self.prefix + "embedding.word_embeddings.weight"][0][0]

    @property
    def dtype(self) -> torch.dtype:
        return self.index[self.prefix + "embedding.word_embeddings.weight"][1] or torch.float32

    @cached_property
    def description(self) -> ModelDescription:
        tokenizer = self._tokenizer()
        # Megatron-LM and NeMo size the vocabulary by the tokenizer (len(tokenizer)) unless the config says
        vocab = self.declared_vocab or (len(tokenizer) if tokenizer is not None else None)
        require(vocab is not None, f"'{self.path}': cannot tell the vocabulary size: {self.config_source} states "
                                   "none and the checkpoint holds no tokenizer")
        require(vocab <= self.stored_vocab, f"'{self.path}': the vocabulary ({vocab}) is larger than the stored "
                                            f"embedding ({self.stored_vocab} rows)")
        desc = megatron_config.description_from_config(self.config, vocab_size=vocab, source=self.config_source,
                                                       name=str(self.path))
        if tokenizer is not None:  # special tokens for a later Hugging Face export
            desc = desc.replace(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        self._check_shapes(desc)
        return desc

    def _tokenizer(self):
        if self.tokenizer_dir is None:
            return None

        try:
            return AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        except Exception as e:  # broken or partial tokenizer files
            raise UsageError(f"'{self.tokenizer_dir}': unreadable tokenizer: {str(e).splitlines()[0]}") from None

    def _check_shapes(self, desc: ModelDescription) -> None:
        """Config and weights agree (a one-line error naming the tensor otherwise)."""
        def expect(key: str, shape: tuple[int, ...]) -> None:
            stored = self.index.get(self.prefix + key)
            require(stored is not None, f"'{self.weights}' has no tensor '{self.prefix}{key}' "
                                        f"that {self.config_source} implies")
            require(stored[0] == shape, f"'{self.weights}': tensor '{self.prefix}{key}' has shape "
                                        f"{list(stored[0])}, but {self.config_source} implies {list(shape)}")

        def expect_any(layer: str, names: tuple[str, ...], shape: tuple[int, ...]) -> None:
            """The first of a tensor's names the checkpoint holds (the last named if none)."""
            expect(next((layer + n for n in names if self.prefix + layer + n in self.index), layer + names[-1]), shape)

        h, L = desc.hidden_size, desc.num_layers
        # megatron's singleton_local_shards variant stores one key per expert (experts.{e}.),
        # Megatron-LM and Bridge save without it (one key per expert weight, an expert axis)
        singleton = next((k for k in self.index if re.search(r"\.experts\.\d+\.", k)), None)
        require(singleton is None, f"'{self.weights}' stores each expert under its own key ('{singleton}': "
                                   "saved with singleton_local_shards), which is not supported; re-save it with "
                                   "megatron-core's default (one key per expert weight)")
        if not desc.tie_embeddings:
            expect("output_layer.weight", (self.stored_vocab, h))
        require(self.index[self.prefix + "embedding.word_embeddings.weight"][0][1] == h,
                f"'{self.weights}': the embedding width differs from {self.config_source}'s hidden_size {h}")
        if desc.is_hybrid:  # megatron-core's MambaStack: per-layer keys, decoder.final_norm
            expect("decoder.final_norm.weight", (h,))
            for i, symbol in enumerate(desc.hybrid_pattern):
                for names, shape in _hybrid_layer_shapes(desc, symbol).items():
                    expect_any(f"decoder.layers.{i}.", names, shape)
            return
        expect("decoder.final_layernorm.weight", (h,))
        if desc.normalization == "LayerNorm":
            expect("decoder.final_layernorm.bias", (h,))
        require(self.per_layer or not desc.is_heterogeneous,
                f"'{self.weights}': a heterogeneous model's layers are stored per layer (decoder.layers.N.*), "
                "these are stacked")
        if self.per_layer:
            for i in range(L):
                for names, shape in _layer_shapes(desc, i).items():
                    expect_any(f"decoder.layers.{i}.", names, shape)
        else:
            for names, shape in _layer_shapes(desc).items():
                expect_any("decoder.layers.", names, (L, *shape))

    @property
    def provenance(self) -> dict[str, Any]:
        return {"converted_from": str(self.path), "source_kind": self.kind, "iteration": self.iteration}

    # -------------------------------------------------------------- weights
    def load_into(self, model) -> None:
        """Fill ``model`` (built from ``description`` at the current layout) from the stored weights."""
        inner = unwrap(model)
        metadata = {"non_homogeneous_layers": self.per_layer, "singleton_local_shards": False}
        request = inner.sharded_state_dict(prefix=self.prefix, metadata=metadata)
        request = {k: v for k, v in request.items() if not isinstance(v, ShardedObject)}  # _extra_state
        te_norm_keys(request, self.description, self.index)
        check_complete(self.weights, "checkpoint", self.path)
        state = load_sharded(request, self.weights)
        n = len(self.prefix)
        inner.load_state_dict({k[n:] if k.startswith(self.prefix) else k: v for k, v in state.items()}, strict=False)
        zero_vocab_padding(inner, self.description.vocab_size)


def zero_vocab_padding(model, vocab_size: int) -> None:
    """Zero the embedding/output rows of ids >= vocab_size on this rank (the project's
    convention; another trainer's padding rows hold whatever it trained into them)."""
    tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    with torch.no_grad():
        for module in (getattr(model, "embedding", None), getattr(model, "output_layer", None)):
            if module is None:
                continue
            weight = module.word_embeddings.weight if hasattr(module, "word_embeddings") else module.weight
            if weight is None:
                continue
            start = tp_rank * weight.shape[0]
            first_pad = max(0, vocab_size - start)
            if first_pad < weight.shape[0]:
                weight[first_pad:].zero_()


# ---------------------------------------------------------------------- opening
def _bridge_config(path: Path) -> tuple[dict, str, int | None]:
    run_config = _read_yaml(path / RUN_CONFIG)
    model = run_config.get("model")
    source = f"'{path / RUN_CONFIG}' model"
    require(isinstance(model, dict), f"'{path / RUN_CONFIG}' has no model: section")
    vocab = model.get("vocab_size")
    return dict(model), source, int(vocab) if vocab is not None else None


def _megatron_lm_config(path: Path) -> tuple[dict, str, int | None]:
    common = common_state(path)
    args = common.get("args") if isinstance(common, dict) else None
    common_pt = path / COMMON_STATE_FILE
    source = f"'{common_pt}' args" if common_pt.is_file() else f"'{path}' common state args"
    require(isinstance(args, argparse.Namespace), f"'{path}' has neither {RUN_CONFIG} (Megatron-Bridge) nor an "
                                                  "args Namespace in its common state (Megatron-LM): no model config")
    vocab = getattr(args, "vocab_size", None)
    return megatron_config.normalize_args(args), source, int(vocab) if vocab is not None else None


def _nemo2_config(path: Path) -> tuple[dict, str, int | None, Path | None]:
    model_yaml = _read_yaml(path / "context" / "model.yaml")
    config = model_yaml.get("config")
    source = f"'{path / 'context' / 'model.yaml'}' config"
    require(isinstance(config, dict), f"'{path / 'context' / 'model.yaml'}' has no config: section")
    tokenizer = None
    name = (model_yaml.get("tokenizer") or {}).get("pretrained_model_name") if isinstance(
        model_yaml.get("tokenizer"), dict) else None
    for candidate in ([path / "context" / str(name)] if isinstance(name, str) else []) + [
            path / "context" / "nemo_tokenizer"]:
        if (candidate / "tokenizer_config.json").is_file() or (candidate / "tokenizer.json").is_file():
            tokenizer = candidate
            break
    vocab = config.get("vocab_size")
    return dict(config), source, int(vocab) if vocab is not None else None, tokenizer


def _hf_tokenizer_dir(p: Path | None) -> Path | None:
    if p is not None and p.is_dir() and ((p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file()):
        return p
    return None


def open_checkpoint(path: str | Path, iteration: int | None = None, flag: str = "MODEL") -> MegatronCheckpoint:
    """Validate a Megatron-LM / Bridge / NeMo 2 checkpoint (no weights are read)."""
    chosen = resolve_iteration(path, iteration, flag)
    if is_nemo2(chosen):
        weights = chosen / "weights"
        _check_format(weights, str(weights))
        config, source, vocab, tokenizer = _nemo2_config(chosen)
        kind = "nemo2"
    else:
        weights = chosen
        _check_format(weights, str(chosen))
        if (chosen / RUN_CONFIG).is_file():
            config, source, vocab = _bridge_config(chosen)
            kind = "megatron-bridge"
        else:
            config, source, vocab = _megatron_lm_config(chosen)
            kind = "megatron-lm"
        tokenizer = _hf_tokenizer_dir(chosen / "tokenizer")
        if tokenizer is None and kind == "megatron-lm":  # Megatron-LM records where its HF tokenizer was
            model_path = config.get("tokenizer_model")
            if config.get("tokenizer_type") == "HuggingFaceTokenizer" and isinstance(model_path, str):
                tokenizer = _hf_tokenizer_dir(Path(model_path))
    ckpt = MegatronCheckpoint(kind, chosen, weights, config, source, read_index(weights), tokenizer, vocab)
    ckpt.description  # noqa: B018  (validates config against weights now, before any work)
    return ckpt
