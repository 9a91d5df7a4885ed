"""Canonical names for a GPTModel's weights, and how each is split over tensor parallel ranks.

Conversion, pruning and export all address a weight by one *canonical* name: the name
megatron-core's local spec gives it at TP=1, PP=1 (``decoder.layers.7.mlp.linear_fc1.weight``,
global layer number). Transformer Engine fuses the norms into the next linear
(``linear_qkv.layer_norm_weight``) and pipeline stages number their layers from zero;
both are translated here, so nothing else in the project needs to know.

Tensor-parallel layout of the fused tensors (global, TP=1 form):
- ``linear_qkv``: rows grouped by query group, each group ``[q heads..., k, v]`` of
  ``head_dim`` rows; TP ranks hold contiguous runs of whole groups.
- ``linear_fc1``: ``[gate; up]`` (gated MLPs, SwiGLU); each TP rank holds
  ``[gate_shard; up_shard]``. Without a gate (squared ReLU) it is one plain column-parallel
  matrix: ``shard``/``gather`` take ``gated`` (the description's ``gated``).
- Norms, including the per-head-dim QK-norms (``q_layernorm``/``k_layernorm``), are
  replicated over TP ranks.
- Mixtures of experts: ``mlp.router.weight`` (experts x hidden) and the shared expert's
  ``gate_weight`` are replicated; every expert
  (``mlp.experts.local_experts.{e}.linear_fc1/2.weight``, ``e`` the global expert index:
  no expert parallelism) and the shared expert (``mlp.shared_experts.linear_fc1/2``) are
  split like the dense MLP. TE's grouped GEMM names (``mlp.experts.linear_fc1.weight{e}``)
  are translated to these.
- Hybrid models' Mamba mixers (``model/hybrid.py``): ``in_proj`` rows ``[z, x, B, C, dt]`` and
  ``conv1d`` channels ``[x, B, C]`` are split section by section (``shard``/``gather`` take
  the ``sections``, from ``hybrid.tp_sections``), ``A_log``/``D``/``dt_bias`` and the gated
  norm's weight by heads/channels, ``out_proj`` by columns; the layer's input norm is
  replicated.
"""

from __future__ import annotations

import re
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

# module names -> canonical: Transformer Engine's fused norms, and megatron-core >= 0.17's Mamba
# mixer, which holds its depthwise conv as two parameters of its own (checkpoints keep the
# old keys)
_RENAMES = {
    "mixer.conv1d_weight": "mixer.conv1d.weight",
    "mixer.conv1d_bias": "mixer.conv1d.bias",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
    "mixer.in_proj.layer_norm_weight": "norm.weight",  # a hybrid model's Mamba layer
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_TE_GROUPED = re.compile(r"mlp\.experts\.(linear_fc[12])\.weight(\d+)$")
_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..+)$")

# canonical suffix -> dimension split over TP (None: replicated); experts' and the shared
# expert's MLPs end the same way as the dense MLP's
_COLUMN_PARALLEL = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "linear_fc1.weight",
                    "mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.A_log", "mixer.D",
                    "mixer.dt_bias", "mixer.norm.weight")
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "linear_fc2.weight", "mixer.out_proj.weight")
_VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")


def tp_split_dim(name: str) -> int | None:
    if name in _VOCAB_PARALLEL or name.endswith(_COLUMN_PARALLEL):
        return 0
    if name.endswith(_ROW_PARALLEL):
        return 1
    return None


def is_gated(name: str, gated: bool = True) -> bool:
    """Whether ``name`` is a stacked [gate; up] tensor (in a model whose MLP is ``gated``)."""
    return gated and name.endswith("linear_fc1.weight")


def unwrap(model):
    """The GPTModel inside DDP / Float16Module / distillation wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def layer_offset(model) -> int:
    layers = unwrap(model).decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def canonical_name(model, local_name: str) -> str:
    for module_suffix, canonical_suffix in _RENAMES.items():
        if local_name.endswith(module_suffix):
            local_name = local_name[: -len(module_suffix)] + canonical_suffix
    local_name = _TE_GROUPED.sub(r"mlp.experts.local_experts.\2.\1.weight", local_name)
    m = _LAYER.match(local_name)
    if m:
        local_name = f"decoder.layers.{int(m.group(1)) + layer_offset(model)}.{m.group(2)}"
    return local_name


#: buffers that are weights of the model (stored, converted, pruned; never trained by the
#: optimizer): a sigmoid router's per-expert bias (Nemotron 3's e_score_correction_bias)
_WEIGHT_BUFFERS = (".router.expert_bias",)


def named_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, local parameter) for every weight this rank holds, and the buffers
    that are weights (``_WEIGHT_BUFFERS``; tensors, not parameters: no gradient)."""
    inner = unwrap(model)
    for local_name, param in inner.named_parameters():
        yield canonical_name(inner, local_name), param
    for local_name, buffer in inner.named_buffers():
        if local_name.endswith(_WEIGHT_BUFFERS):
            yield canonical_name(inner, local_name), buffer


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def rename_layer(name: str, new_index: int) -> str:
    m = _LAYER.match(name)
    assert m, name
    return f"decoder.layers.{new_index}.{m.group(2)}"


def expert_of(name: str) -> int | None:
    """The routed expert a canonical weight belongs to (None: not an expert's)."""
    m = _EXPERT.match(name)
    return int(m.group(2)) if m else None


def rename_expert(name: str, new_index: int) -> str:
    m = _EXPERT.match(name)
    assert m, name
    return f"{m.group(1)}{new_index}{m.group(3)}"


# ---------------------------------------------------------------------- TP split / gather
def shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int, *, gated: bool,
          sections: Sequence[int] | None = None) -> torch.Tensor:
    """This TP rank's slice of a canonical (TP=1) tensor (``gated``: the model's MLP has a gate;
    ``sections``: the row blocks split one by one, e.g. a Mamba in_proj's)."""
    dim = tp_split_dim(name)
    if dim is None or tp_size == 1:
        return full
    if sections:
        return torch.cat([part.chunk(tp_size, 0)[tp_rank] for part in full.split(list(sections), dim=0)], dim=0)
    if is_gated(name, gated):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def gather(name: str, local: torch.Tensor, group=None, *, gated: bool,
           sections: Sequence[int] | None = None) -> torch.Tensor:
    """The canonical (TP=1) tensor from every TP rank's slice (a collective over ``group``;
    ``gated``: the model's MLP has a gate; ``sections``: the full tensor's row blocks, split one by one)."""
    dim = tp_split_dim(name)
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    if dim is None or size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if sections:
        per_rank = [s // size for s in sections]
        blocks = [p.split(per_rank, dim=0) for p in parts]  # [rank][section]
        return torch.cat([blocks[r][i] for i in range(len(sections)) for r in range(size)], dim=0)
    if is_gated(name, gated):
        gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
        return torch.cat([*gates, *ups], dim=0)
    return torch.cat(parts, dim=dim)
