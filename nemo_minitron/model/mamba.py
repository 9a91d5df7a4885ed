"""Build megatron-core's ``MambaModel`` (a hybrid Mamba-Transformer, Nemotron-H) for a
hybrid ``ModelDescription``; ``model.builder.build_model`` calls this for such models.

megatron-core 0.16 ships only a Transformer Engine stack spec for it (``mamba_stack_spec``),
and its ``MambaStack`` builds the final norm with TE's ``TENorm`` whatever the spec says.
Without TE this module builds the equivalent local spec: Mamba layers of ``LocalNorm`` +
``MambaMixer`` (plain column/row-parallel in/out projections), attention and MLP layers
from megatron's own local GPT layer spec (each layer one kind, so a ``TransformerLayer``
with only its attention half, and an ``MLPLayer`` with only its MLP half), and a
``MambaStack`` whose final norm is a ``LocalNorm``. Canonical weight names are then the
local spec's (``decoder.layers.{i}.norm.weight``, ``.mixer.in_proj.weight``, ...,
``decoder.final_norm.weight``); TE's fused names are translated in ``model/params.py``.

On a CPU the mixer's CUDA kernels are replaced by ``model/ssm_kernels.py`` (switched on
with the rest of ``runtime.cpu_fallback``).
"""

from __future__ import annotations

import dataclasses
import inspect

from megatron.core import parallel_state as ps
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.models.mamba import MambaModel
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from nemo_minitron.model.attention import local_cpu_spec
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.norms import LocalNorm
from nemo_minitron.runtime.cpu_fallback import import_mamba_mixer

try:  # megatron-core 0.17+ names the class HybridModel (MambaModel: a deprecated subclass, warning per build)
    from megatron.core.models.hybrid.hybrid_model import HybridModel
except ImportError:  # 0.16
    HybridModel = None

_mamba_mixer = import_mamba_mixer()  # (its module needs a stand-in for Triton where Triton is missing)
MambaMixer, MambaMixerSubmodules = _mamba_mixer.MambaMixer, _mamba_mixer.MambaMixerSubmodules


#: megatron-core 0.19's decode step takes [batch, tokens, channels] (its dynamic engine's
#: layout, several tokens with speculative decoding); its static-batch ``_decode`` still
#: hands it [1, batch, channels] (0.16's layout), a batch of one being the only size that
#: works. The signature tells the two apart (0.19 added the speculative-decoding buffers).
_DECODE_TAKES_BATCH_FIRST = "intermediate_ssm_state" in inspect.signature(MambaMixer._ssm_decode).parameters


class StaticBatchMambaMixer(MambaMixer):
    """megatron-core's ``MambaMixer`` whose one-token decode step serves a static batch of
    any size (``generate``) on every megatron-core version."""

    def _ssm_decode(self, zxBCdt, conv_state, ssm_state, batch_indices=None, **kwargs):
        if batch_indices is None and _DECODE_TAKES_BATCH_FIRST:  # static batching: [1, b, d] <-> [b, 1, d]
            return super()._ssm_decode(zxBCdt.transpose(0, 1), conv_state, ssm_state, **kwargs).transpose(0, 1)
        return super()._ssm_decode(zxBCdt, conv_state, ssm_state, batch_indices, **kwargs)


def mixer_params(desc: ModelDescription) -> dict:
    """MambaMixer's constructor settings that the config does not carry."""
    return {"d_conv": desc.mamba_conv_kernel, "chunk_size": desc.mamba_chunk_size}


class LocalNormMambaStack(MambaStack):
    """``MambaStack`` whose final norm is a ``LocalNorm`` (the config's RMSNorm) instead of TE's."""

    def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs) -> None:
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = LocalNorm(config, config.hidden_size, eps=config.layernorm_epsilon)


def local_stack_spec(desc: ModelDescription) -> ModuleSpec:
    """The local-spec MambaStack for ``desc`` (its norms: ``LocalNorm``; the Mamba layer's norm
    takes LocalNorm's default epsilon 1e-5, which hybrid descriptions require)."""
    gpt = get_gpt_layer_local_spec(normalization="RMSNorm").submodules
    moe_layer = {}
    if desc.is_moe:  # megatron's MoE layer (router, SequentialMLP experts, shared expert), as in its TE spec
        moe = get_moe_module_spec(use_te=False, num_experts=desc.num_experts, moe_grouped_gemm=False)
        moe_layer["moe_layer"] = ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=LocalNorm, mlp=moe, mlp_bda=gpt.mlp_bda))
    mixer = ModuleSpec(module=StaticBatchMambaMixer, params=mixer_params(desc),
                       submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear))
    return ModuleSpec(module=LocalNormMambaStack, submodules=MambaStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            norm=LocalNorm, mixer=mixer, mamba_bda=get_bias_dropout_add)),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=LocalNorm, self_attention=gpt.self_attention, self_attn_bda=gpt.self_attn_bda)),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=LocalNorm, mlp=gpt.mlp, mlp_bda=gpt.mlp_bda)),
        **moe_layer,
    ))


def te_stack_spec(desc: ModelDescription) -> ModuleSpec:
    """megatron-core's Transformer Engine stack spec, with the description's conv width and chunk length."""
    # deferred: this spec imports Transformer Engine, an optional dependency
    from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec

    layer = mamba_stack_spec.submodules.mamba_layer
    mixer = dataclasses.replace(layer.submodules.mixer, module=StaticBatchMambaMixer, params=mixer_params(desc))
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, mixer=mixer))
    return dataclasses.replace(mamba_stack_spec,
                               submodules=dataclasses.replace(mamba_stack_spec.submodules, mamba_layer=layer))


def build_mamba_model(desc: ModelDescription, config, *, vocab_size: int, te: bool) -> MambaModel:
    """This rank's part of the MambaModel (``config``: model.builder.transformer_config's)."""
    spec = te_stack_spec(desc) if te else local_cpu_spec(local_stack_spec(desc), te)
    common = dict(
        config=config,
        vocab_size=vocab_size,
        max_sequence_length=desc.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=desc.tie_embeddings,
        position_embedding_type="none",  # Nemotron-H's attention has no position embeddings
    )
    if HybridModel is not None:
        return HybridModel(hybrid_stack_spec=spec, hybrid_layer_pattern=desc.hybrid_pattern, **common)
    return MambaModel(mamba_stack_spec=spec, hybrid_override_pattern=desc.hybrid_pattern, **common)
