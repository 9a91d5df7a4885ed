"""Build a megatron-core ``GPTModel`` from a ``ModelDescription``.

Transformer Engine's layer spec is used when TE imports (GPUs), megatron-core's local
spec otherwise. Layers are spread over pipeline stages as evenly as possible, or as
given by ``layers_per_stage`` (depth pruning keeps each kept layer on its stage).

Mixtures of experts are megatron-core's ``MoELayer``: top-k softmax router, the
all-gather token dispatcher, experts as ``SequentialMLP`` (local spec; grouped GEMM with
TE), each expert's MLP split over the tensor-parallel ranks (no expert parallelism).
megatron-core trains a MoE layer under tensor parallelism only with sequence parallelism
(without it every TP rank would feed the experts the same tokens), so training builds
such models with ``sequence_parallel=True`` at TP > 1; inference needs no such thing.

Heterogeneous models (``desc.layer_shapes``) are megatron-core's
``HeterogeneousTransformerConfig`` and heterogeneous layer spec: each layer's query groups
and MLP width are stated in ``block_configs`` (``families.nemotron_nas.megatron_block_configs``), a removed
attention or MLP is an identity with no norm; the spec's layers are built per pipeline
stage like any other's.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Literal, Mapping, Sequence

import megatron.core.transformer.moe.moe_utils as moe_utils
import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.activations import squared_relu
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs import get_gpt_heterogeneous_layer_spec
from megatron.core.transformer.heterogeneous.heterogeneous_config import HeterogeneousTransformerConfig
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_minitron.errors import require
from nemo_minitron.families.nemotron_nas import megatron_block_configs
from nemo_minitron.model import hybrid
from nemo_minitron.model.attention import local_cpu_spec
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.norms import local_norm_spec

Spec = Literal["auto", "local", "te"]


def _not_gpt_deprecation(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("GPTModel IS DEPRECATED")


# megatron-core 0.19 logs GPTModel's deprecation (in favour of HybridModel) at every build; a
# dense GPTModel is what Megatron-LM and Megatron-Bridge checkpoints hold and what we export, so
# the notice is nothing our users can act on, and it would sit in every stage's log
logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(_not_gpt_deprecation)


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _  # noqa: F401
    except Exception:  # TE missing or built for another CUDA: the local spec still works.
        return False
    return torch.cuda.is_available()


def resolve_spec(spec: Spec = "auto") -> Literal["local", "te"]:
    require(spec in ("auto", "local", "te"), f"--spec must be one of auto, local, te (got '{spec}')")
    if spec == "auto":
        return "te" if have_transformer_engine() else "local"
    require(spec == "local" or have_transformer_engine(), "--spec te needs Transformer Engine and a GPU")
    return spec


def balanced_stages(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage, as even as possible (earlier stages take the remainder)."""
    return [num_layers // pp + (1 if s < num_layers % pp else 0) for s in range(pp)]


def _pipeline_layout(layers_per_stage: Sequence[int]) -> list[list[str]]:
    stages = []
    for s, n in enumerate(layers_per_stage):
        row = (["embedding"] if s == 0 else []) + ["decoder"] * n
        if s == len(layers_per_stage) - 1:
            row.append("loss")
        stages.append(row)
    return stages


def moe_config(desc: ModelDescription, *, grouped_gemm: bool = False) -> dict:
    """megatron-core's TransformerConfig settings of a mixture of experts (empty for a dense model)."""
    if not desc.is_moe:
        return {}
    sigmoid = desc.sigmoid_router
    return dict(
        num_moe_experts=desc.num_experts,
        moe_router_topk=desc.moe_top_k,
        moe_ffn_hidden_size=desc.moe_ffn_hidden_size,
        # softmax over the top-k logits (= renormalised top-k probabilities), or top-k of the
        # softmax over all experts without renormalising; sigmoid: top-k of the scores plus the
        # expert bias, weights the unbiased scores renormalised (k > 1), times the scaling factor
        moe_router_pre_softmax=not desc.moe_normalize_top_k and not sigmoid,
        moe_router_score_function="sigmoid" if sigmoid else "softmax",
        moe_router_enable_expert_bias=sigmoid,
        moe_router_topk_scaling_factor=desc.moe_routed_scaling_factor if desc.moe_routed_scaling_factor != 1 else None,
        # Nemotron 3 as Megatron-Bridge trains it: float32 router (as transformers computes it), the
        # load-balancing loss per sequence
        moe_router_dtype="fp32" if sigmoid else None,
        moe_router_load_balancing_type="seq_aux_loss" if sigmoid else "aux_loss",
        moe_aux_loss_coeff=desc.moe_aux_loss_coeff,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=grouped_gemm,
        moe_shared_expert_intermediate_size=desc.moe_shared_ffn_hidden_size or None,
        moe_shared_expert_gate=desc.moe_shared_expert_gate,
    )


def transformer_config(desc: ModelDescription, *, tp: int, pp: int, dtype: torch.dtype = torch.float32,
                       layers_per_stage: Sequence[int] | None = None, recompute: bool = False,
                       sequence_parallel: bool = False, grouped_gemm: bool = False,
                       overrides: Mapping[str, Any] | None = None):
    """The TransformerConfig of ``desc``; ``overrides`` replace fields (e.g. a trainer's
    sequence_parallel or precision settings, so a teacher matches the student it runs beside)."""
    layers_per_stage = list(layers_per_stage or balanced_stages(desc.num_layers, pp))
    require(len(layers_per_stage) == pp and sum(layers_per_stage) == desc.num_layers,
            f"layers per stage {layers_per_stage} do not add up to {desc.num_layers} layers on {pp} stages")
    extra = {}
    if desc.is_hybrid:
        hybrid.check_stages(desc, layers_per_stage)
        extra.update(hybrid.mamba_config(desc))
    if pp > 1 and len(set(layers_per_stage)) > 1:
        extra["pipeline_model_parallel_layout"] = _pipeline_layout(layers_per_stage)
    if recompute:
        extra.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    extra.update(moe_config(desc, grouped_gemm=grouped_gemm))
    require(not sequence_parallel or tp > 1, "sequence parallelism needs --tp > 1")
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=desc.num_layers,
        hidden_size=desc.hidden_size,
        # a mixture of experts has no dense MLP; megatron sizes its experts by moe_ffn_hidden_size
        ffn_hidden_size=desc.ffn_hidden_size or desc.moe_ffn_hidden_size,
        num_attention_heads=desc.num_attention_heads,
        num_query_groups=desc.num_query_groups,
        kv_channels=desc.head_dim,
        normalization=desc.normalization,
        layernorm_epsilon=desc.norm_eps,
        layernorm_zero_centered_gamma=desc.zero_centered_gamma,
        gated_linear_unit=desc.gated,
        activation_func=F.silu if desc.gated else squared_relu,
        add_bias_linear=False,
        add_qkv_bias=desc.qkv_bias,
        qk_layernorm=desc.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # HF computes attention with softmax scale 1/sqrt(head_dim), as megatron does by default.
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        # Fused kernels need CUDA; the plain PyTorch paths are numerically the reference.
        # (megatron fuses bias + SwiGLU or GeLU only)
        bias_activation_fusion=on_gpu and have_transformer_engine() and desc.gated,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        init_method_std=0.02,
        **extra,
    )
    kwargs.update(overrides or {})
    if desc.is_heterogeneous:
        kwargs["ffn_hidden_size"] = desc.ffn_hidden_size or desc.hidden_size  # only no-op MLPs read it
        kwargs["heterogeneous_layers_config_encoded_json"] = json.dumps(megatron_block_configs(desc))
        return HeterogeneousTransformerConfig(**kwargs)
    return TransformerConfig(**kwargs)


def _apply_rope_scaling(model, desc: ModelDescription) -> None:
    """Set inverse RoPE frequencies exactly as HF computes them for llama3/linear scaling."""
    if desc.rope_scaling is None or not hasattr(model, "rotary_pos_emb"):
        return
    rope = model.rotary_pos_emb
    dim = desc.rotary_dim
    base = 1.0 / (desc.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim))
    kind = desc.rope_scaling["rope_type"]
    if kind == "linear":
        inv_freq = base / float(desc.rope_scaling["factor"])
    else:  # llama3
        sc = desc.rope_scaling
        factor, low, high = float(sc["factor"]), float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        old_len = float(sc.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / base
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * base / factor + smooth * base
        inv_freq = torch.where(wavelen > old_len / low, base / factor, base)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, inv_freq)
    rope.inv_freq = inv_freq


def _router_without_transformer_engine() -> None:
    """megatron-core 0.16's router GEMM tests ``te_general_gemm is not None``, a name its
    module defines only when Transformer Engine imports: without TE, define it as None so
    the router takes its plain torch.mm path."""
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def training_needs_sequence_parallel(desc: ModelDescription, tp: int) -> bool:
    """megatron-core refuses to train a MoE layer at TP > 1 without sequence parallelism."""
    return desc.is_moe and tp > 1


def build_model(desc: ModelDescription, *, dtype: torch.dtype = torch.float32,
                layers_per_stage: Sequence[int] | None = None, spec: Spec = "auto", recompute: bool = False,
                sequence_parallel: bool = False, padded_vocab_size: int | None = None,
                config_overrides: Mapping[str, Any] | None = None):
    """Build the local part (this rank's TP shard and PP stage) of a GPTModel, on this rank's device.

    ``sequence_parallel``: activations between the tensor-parallel regions are split along the
    sequence (training a mixture of experts at TP > 1 needs it). ``padded_vocab_size``: rows
    of the embedding and output layer, when they must equal another model's (a teacher beside
    a student built elsewhere); default the project's padding (``desc.padded_vocab_size``)."""
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("megatron-core's parallel state is not initialised: call "
                           "nemo_minitron.runtime.distributed.init_distributed(tp, pp) first")
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    desc.check_layout(tp, pp)
    te = resolve_spec(spec) == "te"
    if desc.is_moe:
        _router_without_transformer_engine()
    config = transformer_config(desc, tp=tp, pp=pp, dtype=dtype, layers_per_stage=layers_per_stage,
                                recompute=recompute, sequence_parallel=sequence_parallel, grouped_gemm=te,
                                overrides=config_overrides)
    vocab = padded_vocab_size or desc.padded_vocab_size
    require(vocab >= desc.vocab_size and vocab % tp == 0,
            f"padded vocabulary {vocab} must hold the {desc.vocab_size} tokens and be divisible by --tp {tp}")
    if desc.is_hybrid:  # megatron-core's MambaModel (model/mamba.py)
        # deferred: megatron-core's SSM modules load for hybrid models only
        from nemo_minitron.model.mamba import build_mamba_model

        model = build_mamba_model(desc, config, vocab_size=vocab, te=te)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        return model
    experts = desc.num_experts or None
    if desc.is_heterogeneous:  # this stage's layers, each of its own shape
        layer_spec = get_gpt_heterogeneous_layer_spec(config, use_te=te)
        if not te and (desc.zero_centered_gamma or config.sequence_parallel):
            layer_spec = local_norm_spec(layer_spec, config)
    elif te:  # TE's norms read normalization and zero-centred gamma from the config
        layer_spec = get_gpt_layer_with_transformer_engine_spec(num_experts=experts, moe_grouped_gemm=desc.is_moe,
                                                                qk_layernorm=desc.qk_norm)
    else:
        layer_spec = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False,
                                              normalization=desc.normalization, qk_layernorm=desc.qk_norm)
        if desc.zero_centered_gamma or config.sequence_parallel:  # norms the local spec's torch norm refuses
            layer_spec = local_norm_spec(layer_spec, config)
    layer_spec = local_cpu_spec(layer_spec, te)  # CPU: SDPA for the local spec's unfused attention
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=vocab,
        max_sequence_length=desc.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=desc.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=desc.rope_theta,
        rotary_percent=desc.rotary_percent,
    )
    _apply_rope_scaling(model, desc)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
