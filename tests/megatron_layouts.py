"""Megatron-LM, Megatron-Bridge and NeMo 2 checkpoints written the way those projects write
them, with megatron-core alone (no nemo_minitron code writes or builds them), and the
models those projects would build from a checkpoint's config. Test-side references for
``nemo_minitron.checkpoint.megatron_*``.

Which code each piece follows (read at Megatron-LM d98e8a6, Megatron-Bridge 067f987,
NeMo 8cfedd7):
- Megatron-LM ``megatron/training/checkpointing.py``: ``save_checkpoint`` /
  ``generate_state_dict`` (``{"args", "checkpoint_version": 3.0, "iteration", "model",
  "optimizer", "rng_state"}`` saved with ``dist_checkpointing.save(...,
  content_metadata=_build_sharded_state_dict_metadata(args))`` into ``iter_%07d``, then
  ``latest_checkpointed_iteration.txt``); the args as ``arguments.py`` parses them (names
  before and after the Jan 2026 switch to TransformerConfig field names, both present);
  ``argument_utils.core_transformer_config_from_args`` and ``gpt_builders.gpt_builder``
  for the model built from them (``gpt_from_args``).
- Megatron-Bridge ``src/megatron/bridge/training/checkpointing.py``: ``save_checkpoint``
  (no args; ``run_config.yaml`` from the ConfigContainer, ``train_state.pt``,
  ``latest_train_state.pt``, the Megatron-LM tracker, ``tokenizer/``);
  ``models/gpt_provider.py: GPTModelProvider.provide`` for the model (``gpt_from_provider``;
  ``should_pad_vocab`` false keeps the vocabulary unpadded).
- NeMo 2 ``nemo/lightning/io/mixin.py: IOMixin.io_dump`` (``context/model.yaml`` with
  ``_target_`` entries, ``context/io.json``), ``nemo/lightning/io/connector.py``
  (``nemo_tokenizer``), and weights under ``module.`` in ``weights/`` (MegatronParallel).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

MEGATRON_LM_CONTENT = {"singleton_local_shards": False, "distrib_optim_sharding_type": "dp_reshardable"}
BRIDGE_CONTENT = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def hf_config(hf_dir: Path) -> dict:
    """config.json, with rope_theta at the top (transformers 5 nests it in rope_parameters)."""
    c = json.loads((Path(hf_dir) / "config.json").read_text())
    c.setdefault("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return c


def padded(vocab: int, multiple: int) -> int:
    return -(-vocab // multiple) * multiple


# ---------------------------------------------------------------------- Megatron-LM
def megatron_lm_args(hf_dir: Path, *, tp: int, pp: int, divisible_by: int, tokenizer_model: str) -> argparse.Namespace:
    """The args Megatron-LM would save for a Llama-style model given as a HF config."""
    from megatron.core.transformer.enums import AttnBackend, AttnMaskType

    c = hf_config(hf_dir)
    scaling = c.get("rope_scaling") or c.get("rope_parameters") or {}
    heads = c["num_attention_heads"]
    vocab = c["vocab_size"]
    return argparse.Namespace(
        num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"],
        num_attention_heads=heads, group_query_attention=True, num_query_groups=c["num_key_value_heads"],
        kv_channels=c.get("head_dim") or c["hidden_size"] // heads, seq_length=64,
        max_position_embeddings=c["max_position_embeddings"], position_embedding_type="rope",
        rotary_base=int(c.get("rope_theta", 10000)), rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=scaling.get("rope_type") == "llama3", rope_scaling_factor=float(scaling.get("factor", 8.0)),
        rotary_seq_len_interpolation_factor=None, swiglu=True, squared_relu=False, quick_geglu=False,
        normalization="RMSNorm", norm_epsilon=c["rms_norm_eps"], apply_layernorm_1p=False,
        disable_bias_linear=True, add_bias_linear=False, add_qkv_bias=False,
        untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", False),
        hidden_dropout=0.0, attention_dropout=0.0, num_experts=None, multi_latent_attention=False,
        qk_layernorm=False, mtp_num_layers=None, heterogeneous_layers_config_path=None, hybrid_override_pattern=None,
        spec=None, transformer_impl="transformer_engine", attention_backend=AttnBackend.auto,
        # a megatron enum this megatron-core does not register as safe (newer ones add more)
        attn_mask_type=AttnMaskType.causal,
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_model, vocab_size=None,
        make_vocab_size_divisible_by=divisible_by, padded_vocab_size=padded(vocab, divisible_by * tp),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, params_dtype=torch.float32, bf16=False,
        fp16=False, ckpt_format="torch_dist", use_distributed_optimizer=True, iteration=0)


def transformer_config_from_args(args: argparse.Namespace):
    """core_transformer_config_from_args: every TransformerConfig field found in args, and
    its renames (norm_epsilon, swiglu, group_query_attention, num_experts)."""
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    a = vars(args)
    kw = {f.name: a[f.name] for f in dataclasses.fields(TransformerConfig) if f.name in a and f.init}
    kw.pop("attention_backend", None)  # the default (auto) here
    kw["layernorm_epsilon"] = a.get("layernorm_epsilon", a.get("norm_epsilon"))
    kw["layernorm_zero_centered_gamma"] = a.get("layernorm_zero_centered_gamma", a.get("apply_layernorm_1p", False))
    kw["num_moe_experts"] = a.get("num_experts")
    if a.get("swiglu"):
        kw.update(activation_func=F.silu, gated_linear_unit=True)
    elif a.get("squared_relu"):
        from megatron.core.activations import squared_relu

        kw.update(activation_func=squared_relu, gated_linear_unit=False)
    kw["num_query_groups"] = a["num_query_groups"] if a.get("group_query_attention") else None
    kw["pipeline_dtype"] = a["params_dtype"]
    if kw.get("num_moe_experts"):  # TEGroupedMLP on a GPU; SequentialMLP here (the same checkpoint keys)
        kw["moe_grouped_gemm"] = False
    kw.update(use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
              persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False)
    return TransformerConfig(**kw)


def _local_spec(config):
    """megatron-core's local layer spec for ``config`` (gpt_builder's choice without Transformer
    Engine); zero-centred norms, which Transformer Engine computes on a GPU, by the project's
    torch stand-in (nemo_minitron.model.norms) on a CPU. Experts are SequentialMLPs (the TE
    spec's TEGroupedMLP stores the same keys: megatron/core/transformer/moe/experts.py)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if config.num_moe_experts:  # megatron-core 0.16's router without Transformer Engine (a CPU shim)
        from nemo_minitron.model.builder import _router_without_transformer_engine

        _router_without_transformer_engine()
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False,
                                    normalization=config.normalization, qk_layernorm=config.qk_layernorm)
    if config.layernorm_zero_centered_gamma:
        from nemo_minitron.model.norms import local_norm_spec

        spec = local_norm_spec(spec, config)
    return spec


def gpt_from_args(args: argparse.Namespace):
    """gpt_builder with the local layer spec (no Transformer Engine on a CPU)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = transformer_config_from_args(args)
    return GPTModel(config=config, transformer_layer_spec=_local_spec(config),
                    vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                    pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                    share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                    position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
                    rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling,
                    rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0))


# ---------------------------------------------------------------------- Megatron-Bridge
def bridge_model_section(hf_dir: Path, *, tp: int, pp: int, should_pad_vocab: bool) -> dict:
    """run_config.yaml ``model:`` as GPTModelProvider serializes (LlamaBridge's settings)."""
    c = hf_config(hf_dir)
    return {
        "_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider",
        "num_layers": c["num_hidden_layers"], "hidden_size": c["hidden_size"],
        "ffn_hidden_size": c["intermediate_size"], "num_attention_heads": c["num_attention_heads"],
        "num_query_groups": c["num_key_value_heads"], "kv_channels": c.get("head_dim"),
        "normalization": "RMSNorm", "layernorm_epsilon": c["rms_norm_eps"], "gated_linear_unit": True,
        "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
        "add_bias_linear": False, "add_qkv_bias": False, "position_embedding_type": "rope",
        "rotary_base": int(c.get("rope_theta", 10000)), "rotary_percent": 1.0, "rope_scaling": False,
        "rope_scaling_factor": 1.0, "seq_length": c["max_position_embeddings"],
        "share_embeddings_and_output_weights": c.get("tie_word_embeddings", False), "vocab_size": c["vocab_size"],
        "make_vocab_size_divisible_by": 128, "should_pad_vocab": should_pad_vocab, "hidden_dropout": 0.0,
        "attention_dropout": 0.0, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "params_dtype": {"_target_": "torch.float32", "_call_": False}, "bf16": False, "fp16": False,
        "attention_backend": {"_target_": "megatron.core.transformer.enums.AttnBackend", "_call_": True,
                              "_args_": [5], "_name_": "auto"},
        "hf_model_id": None,
    }


def gpt_from_provider(model: dict):
    """GPTModelProvider.provide: TransformerConfig fields from the section, padded vocabulary
    only with should_pad_vocab (calculate_padded_vocab_size)."""
    import dataclasses

    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = {f.name: model[f.name] for f in dataclasses.fields(TransformerConfig) if f.name in model and f.init}
    for key in ("activation_func", "params_dtype", "pipeline_dtype", "attention_backend"):
        kw.pop(key, None)
    from megatron.core.activations import squared_relu

    activation = {"torch.nn.functional.silu": F.silu,
                  "megatron.core.activations.squared_relu": squared_relu}[model["activation_func"]["_target_"]]
    dtype = getattr(torch, model["params_dtype"]["_target_"].split(".")[-1])
    kw.update(activation_func=activation, params_dtype=dtype, pipeline_dtype=dtype, use_cpu_initialization=True,
              bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
              apply_rope_fusion=False, gradient_accumulation_fusion=False)
    config = TransformerConfig(**kw)
    tp = ps.get_tensor_model_parallel_world_size()
    vocab = model["vocab_size"]
    if model["should_pad_vocab"]:
        vocab = padded(vocab, model["make_vocab_size_divisible_by"] * tp)
    return GPTModel(config=config, transformer_layer_spec=_local_spec(config),
                    vocab_size=vocab, max_sequence_length=model["seq_length"],
                    pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                    share_embeddings_and_output_weights=model["share_embeddings_and_output_weights"],
                    position_embedding_type=model["position_embedding_type"], rotary_percent=model["rotary_percent"],
                    rotary_base=model["rotary_base"], rope_scaling=model["rope_scaling"],
                    rope_scaling_factor=model["rope_scaling_factor"],
                    seq_len_interpolation_factor=model.get("seq_len_interpolation_factor"))


# ---------------------------------------------------------------------- NeMo 2
def nemo2_model_yaml(hf_dir: Path) -> dict:
    """context/model.yaml of a NeMo 2 Qwen2Model (Qwen2Config fields, io_dump's _target_ form)."""
    c = hf_config(hf_dir)
    return {
        "_target_": "nemo.collections.llm.gpt.model.qwen2.Qwen2Model",
        "config": {
            "_target_": "nemo.collections.llm.gpt.model.qwen2.Qwen2Config",
            "num_layers": c["num_hidden_layers"], "hidden_size": c["hidden_size"],
            "ffn_hidden_size": c["intermediate_size"], "num_attention_heads": c["num_attention_heads"],
            "num_query_groups": c["num_key_value_heads"], "kv_channels": None, "normalization": "RMSNorm",
            "layernorm_epsilon": c["rms_norm_eps"], "gated_linear_unit": True,
            "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
            "add_bias_linear": False, "add_qkv_bias": True, "position_embedding_type": "rope",
            "rotary_base": int(c.get("rope_theta", 10000)), "rotary_percent": 1.0,
            "seq_length": c["max_position_embeddings"],
            "share_embeddings_and_output_weights": c.get("tie_word_embeddings", False),
            "make_vocab_size_divisible_by": 128, "vocab_size": None, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        },
        "tokenizer": {"_target_": "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer",
                      "pretrained_model_name": "nemo_tokenizer"},
        "optim": None, "model_transform": None,
    }


def nemo2_config_as_args(model_yaml: dict, *, tp: int, vocab: int) -> argparse.Namespace:
    """The same model in Megatron-LM argument form, to build it with ``gpt_from_args``."""
    c = model_yaml["config"]
    return argparse.Namespace(
        num_layers=c["num_layers"], hidden_size=c["hidden_size"], ffn_hidden_size=c["ffn_hidden_size"],
        num_attention_heads=c["num_attention_heads"], group_query_attention=True,
        num_query_groups=c["num_query_groups"], kv_channels=c["kv_channels"], add_qkv_bias=c["add_qkv_bias"],
        add_bias_linear=False, swiglu=True, normalization="RMSNorm", norm_epsilon=c["layernorm_epsilon"],
        untie_embeddings_and_output_weights=not c["share_embeddings_and_output_weights"],
        max_position_embeddings=c["seq_length"], position_embedding_type="rope", rotary_base=c["rotary_base"],
        rotary_percent=1.0, use_rope_scaling=False, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.float32, padded_vocab_size=padded(vocab, c["make_vocab_size_divisible_by"] * tp))


# ---------------------------------------------------------------------- weights
def fill_from_hf(model, hf_dir: Path, seed: int) -> None:
    """Copy a HF model's weights into a megatron-core GPTModel at this rank's layout; the
    vocabulary padding rows get random values, as a trained Megatron model's have."""
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from nemo_minitron.checkpoint.hf_format import hf_to_canonical
    from nemo_minitron.checkpoint.hf_format import description_from_hf_config
    from nemo_minitron.model.params import named_weights, shard

    desc = description_from_hf_config(hf_config(hf_dir))
    state = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    g = torch.Generator().manual_seed(seed)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, param in named_weights(model):
            full = hf_to_canonical(desc, name, lambda n: state[n].float())
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                rows = param.shape[0] * tp_size
                garbage = torch.randn(rows, full.shape[1], generator=g)
                garbage[:desc.vocab_size] = full[:desc.vocab_size]
                full = garbage
            param.copy_(shard(name, full, tp_rank, tp_size, gated=desc.gated))


def _extras():
    """Optimizer and RNG entries as Megatron-LM saves them next to the model (ignored on a
    model-only load)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    rng = ShardedObject("rng_state", [{"random_rng_state": 1}], (ps.get_pipeline_model_parallel_world_size(),
                        ps.get_tensor_model_parallel_world_size()), (pp, tp), replica_id=0)
    moment = ShardedTensor.from_rank_offsets("optimizer.state.exp_avg.stage_marker", torch.ones(3) * pp,
                                             (0, pp, ps.get_pipeline_model_parallel_world_size()),
                                             replica_id=(0, tp, 0))
    return {"rng_state": rng, "optimizer": {"state": {"marker": moment}, "param_groups": [{"lr": 1e-4}]}}


def _save(state: dict, directory: Path, content: dict) -> None:
    from megatron.core import dist_checkpointing

    from nemo_minitron.runtime.distributed import barrier, is_rank0

    if is_rank0():
        directory.mkdir(parents=True, exist_ok=True)
    barrier()
    dist_checkpointing.save(state, str(directory), content_metadata=content)
    barrier()


def save_megatron_lm(model, args: argparse.Namespace, root: Path, iteration: int, *, latest: bool,
                     keys=lambda sharded: sharded, content: dict | None = None) -> Path:
    """Megatron-LM's save_checkpoint (torch_dist), stacked layer keys (``keys``: the sharded
    state dict as the model's spec would key it; ``content``: content metadata other than
    Megatron-LM's default)."""
    from nemo_minitron.runtime.distributed import is_rank0

    it_dir = root / f"iter_{iteration:07d}"
    args = argparse.Namespace(**{**vars(args), "iteration": iteration})
    content = {**MEGATRON_LM_CONTENT, **(content or {})}
    state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration,
             "model": keys(model.sharded_state_dict(metadata=dict(content))),
             "opt_param_scheduler": {"num_steps": iteration * 8}, "num_floating_point_operations_so_far": 1.0,
             **_extras()}
    _save(state, it_dir, content)
    if is_rank0() and latest:
        (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return it_dir


def save_bridge(model, model_section: dict, root: Path, iteration: int, tokenizer_dir: Path,
                keys=lambda sharded: sharded) -> Path:
    """Megatron-Bridge's save_checkpoint, per-layer keys (as for heterogeneous layers)."""
    import yaml

    from nemo_minitron.runtime.distributed import barrier, is_rank0

    it_dir = root / f"iter_{iteration:07d}"
    content = {**BRIDGE_CONTENT, "non_homogeneous_layers": True}
    state = {"checkpoint_version": 3.0, "iteration": iteration,
             "model": keys(model.sharded_state_dict(metadata=dict(content))), **_extras()}
    _save(state, it_dir, content)
    if is_rank0():
        run_config = {"model": model_section,
                      "checkpoint": {"save": str(root), "ckpt_format": "torch_dist", "save_optim": True,
                                     "save_rng": True, "fully_parallel_save": True},
                      "train": {"train_iters": 100, "global_batch_size": 8, "micro_batch_size": 1}}
        (it_dir / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        train_state = {"step": torch.tensor(iteration), "consumed_train_samples": torch.tensor(iteration * 8),
                       "skipped_train_samples": torch.tensor(0), "consumed_valid_samples": torch.tensor(0),
                       "floating_point_operations_so_far": torch.tensor(1.0, dtype=torch.float64),
                       "do_train": torch.tensor(True), "do_valid": torch.tensor(False), "do_test": torch.tensor(False)}
        torch.save(train_state, it_dir / "train_state.pt")
        shutil.copy(it_dir / "train_state.pt", root / "latest_train_state.pt")
        (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
        shutil.copytree(tokenizer_dir, it_dir / "tokenizer")
    barrier()
    return it_dir


def save_nemo2(model, model_yaml: dict, root: Path, tokenizer_dir: Path) -> Path:
    """A NeMo 2 checkpoint: weights/ under the ``module.`` prefix, context/ with model.yaml."""
    import yaml

    from nemo_minitron.runtime.distributed import barrier, is_rank0

    content = {"singleton_local_shards": False}
    state = {"state_dict": model.sharded_state_dict(prefix="module.", metadata=dict(content)),
             "global_step": 20, "pytorch-lightning_version": "2.5.0"}
    _save(state, root / "weights", content)
    if is_rank0():
        (root / "context").mkdir()
        (root / "context" / "model.yaml").write_text(yaml.safe_dump(model_yaml, sort_keys=False))
        (root / "context" / "io.json").write_text(json.dumps({"root": {"type": "ref", "key": "trainer_context_1"}}))
        shutil.copytree(tokenizer_dir, root / "context" / "nemo_tokenizer")
    barrier()
    return root


# ---------------------------------------------------------------------- hybrid (MambaModel)
# megatron-core ships only a Transformer Engine spec for MambaModel (mamba_layer_specs), which
# fuses each layer's norm into its first linear; on a CPU the model is the project's local
# spec (nemo_minitron.model.mamba), re-keyed here as the TE spec keys its norms. A MoE layer
# (hybrid E, or every layer of a GPT mixture of experts) keeps its pre-MLP norm as a module of
# its own in the TE specs (TENorm: ``pre_mlp_layernorm.weight``), which megatron's local GPT
# spec keys as if fused (``mlp.linear_fc1.layer_norm_weight``).
TE_NORM_NAMES = {"norm.weight": "mixer.in_proj.layer_norm_weight",
                 "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                 "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def te_keyed(sharded: dict) -> dict:
    """A MambaModel's or MoE GPTModel's sharded state dict with its layers' norms under the TE
    spec's keys."""
    import re

    def layer_key(sh):
        return re.match(r"^(decoder\.layers\.(?:\d+\.)?)(.+)$", getattr(sh, "key", ""))

    moe_layers = {m.group(1) for sh in sharded.values() if (m := layer_key(sh)) and m.group(2) == "mlp.router.weight"}
    for sh in sharded.values():
        if not (m := layer_key(sh)):
            continue
        if m.group(1) in moe_layers:
            if m.group(2) == "mlp.linear_fc1.layer_norm_weight":
                sh.key = m.group(1) + "pre_mlp_layernorm.weight"
        elif m.group(2) in TE_NORM_NAMES:
            sh.key = m.group(1) + TE_NORM_NAMES[m.group(2)]
    return sharded


def _pattern(c: dict) -> str:
    """The layer pattern of a NemotronH config.json (transformers 5 writes ``layers_block_type``)."""
    symbols = {"linear_attention": "M", "full_attention": "*", "mlp": "-", "moe": "E"}
    return c.get("hybrid_override_pattern") or "".join(symbols[t] for t in c["layers_block_type"])


def hybrid_megatron_lm_args(hf_dir: Path, *, tp: int, pp: int, tokenizer_model: str) -> argparse.Namespace:
    """The args Megatron-LM saves for a Nemotron-H model given as a HF config, in the argument
    names before the 2026 renames (``--hybrid-override-pattern``, ``--mamba-*``, ``--spec
    megatron.core.models.mamba.mamba_layer_specs mamba_stack_spec``, ``--squared-relu``,
    ``--position-embedding-type none``, as Megatron-LM's examples/mamba scripts pass them;
    no chunk-length argument exists: the mixer's 128)."""
    c = hf_config(hf_dir)
    return argparse.Namespace(
        num_layers=len(_pattern(c)), hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"],
        num_attention_heads=c["num_attention_heads"], group_query_attention=True,
        num_query_groups=c["num_key_value_heads"], kv_channels=c["head_dim"], seq_length=64,
        max_position_embeddings=c["max_position_embeddings"], position_embedding_type="none",
        hybrid_override_pattern=_pattern(c), hybrid_attention_ratio=0.0, hybrid_mlp_ratio=0.0,
        is_hybrid_model=True, mamba_state_dim=c["ssm_state_size"], mamba_head_dim=c["mamba_head_dim"],
        mamba_num_groups=c["n_groups"], mamba_num_heads=c["mamba_num_heads"],
        spec=["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"], squared_relu=True, swiglu=False,
        normalization="RMSNorm", norm_epsilon=c["layer_norm_epsilon"], disable_bias_linear=True, add_bias_linear=False,
        add_qkv_bias=False, untie_embeddings_and_output_weights=not c["tie_word_embeddings"], hidden_dropout=0.0,
        attention_dropout=0.0, num_experts=None, mtp_num_layers=None, transformer_impl="transformer_engine",
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_model, vocab_size=None,
        make_vocab_size_divisible_by=128, padded_vocab_size=padded(c["vocab_size"], 128 * tp),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, params_dtype=torch.float32, bf16=False,
        fp16=False, ckpt_format="torch_dist", iteration=0)


def hybrid_bridge_model_section(hf_dir: Path, *, tp: int, pp: int) -> dict:
    """run_config.yaml ``model:`` as Megatron-Bridge's HybridModelProvider serializes a
    Nemotron-H model (NemotronHBridge.provider_bridge; after ``finalize`` the pattern is
    ``hybrid_layer_pattern`` and ``hybrid_override_pattern`` is null)."""
    c = hf_config(hf_dir)
    return {
        "_target_": "megatron.bridge.models.hybrid.hybrid_provider.HybridModelProvider",
        "num_layers": len(_pattern(c)), "hidden_size": c["hidden_size"],
        "ffn_hidden_size": c["intermediate_size"], "num_attention_heads": c["num_attention_heads"],
        "num_query_groups": c["num_key_value_heads"], "kv_channels": c["head_dim"],
        "hybrid_layer_pattern": _pattern(c), "hybrid_override_pattern": None,
        "hybrid_attention_ratio": 0.0, "hybrid_mlp_ratio": 0.0, "is_hybrid_model": True,
        "mamba_num_heads": c["mamba_num_heads"], "mamba_head_dim": c["mamba_head_dim"],
        "mamba_num_groups": c["n_groups"], "mamba_state_dim": c["ssm_state_size"], "mamba_chunk_size": c["chunk_size"],
        "normalization": "RMSNorm", "layernorm_epsilon": c["layer_norm_epsilon"], "gated_linear_unit": False,
        "activation_func": {"_target_": "megatron.core.activations.squared_relu", "_call_": False},
        "add_bias_linear": False, "position_embedding_type": "none", "seq_length": c["max_position_embeddings"],
        "share_embeddings_and_output_weights": c["tie_word_embeddings"], "vocab_size": c["vocab_size"],
        "make_vocab_size_divisible_by": 128, "should_pad_vocab": True, "mtp_num_layers": 0,
        "mtp_hybrid_override_pattern": None, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "params_dtype": {"_target_": "torch.float32", "_call_": False}, "bf16": False, "fp16": False,
    }


def changed_copy(src: Path, dst: Path, **changes) -> Path:
    """A copy ``dst`` of the Megatron-LM / Bridge checkpoint directory ``src`` whose latest
    iteration states its model with ``changes`` (Bridge: run_config.yaml's ``model:``;
    Megatron-LM: its common state's args, written to common.pt)."""
    import yaml

    shutil.copytree(src, dst)
    it_dir = dst / f"iter_{int((dst / 'latest_checkpointed_iteration.txt').read_text()):07d}"
    if (it_dir / "run_config.yaml").is_file():
        data = yaml.safe_load((it_dir / "run_config.yaml").read_text())
        data["model"].update(changes)
        (it_dir / "run_config.yaml").write_text(yaml.safe_dump(data))
    else:
        state = saved_common(it_dir)
        vars(state["args"]).update(changes)
        torch.save(state, it_dir / "common.pt")
    return dst


def saved_common(iteration_dir: Path) -> dict:
    """The common state Megatron-LM reads back from an iteration directory (written by the
    tests themselves, so a full unpickle is safe): its common.pt (megatron-core up to 0.16),
    else through megatron-core's reader of the state that 0.17+ keeps inside the shards. Both
    read a common.pt in its place when there is one: an edited state is written there."""
    if (iteration_dir / "common.pt").is_file():
        return torch.load(iteration_dir / "common.pt", weights_only=False)
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    return load_common_state_dict(str(iteration_dir))


def saved_args(iteration_dir: Path) -> argparse.Namespace:
    return saved_common(iteration_dir)["args"]


def strict_load(model, directory: Path, keys=lambda sharded: sharded):
    """As Megatron-LM's load_checkpoint: the sharded state dict of the model built from the
    checkpoint's config (``keys``: as the model's spec would key it), with the checkpoint's
    content metadata; nothing may be missing or unexpected (StrictHandling.RAISE_ALL); then
    the module's own strict load_state_dict."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    metadata = dist_checkpointing.load_content_metadata(str(directory))
    state = dist_checkpointing.load({"model": keys(model.sharded_state_dict(metadata=metadata))}, str(directory),
                                    strict=StrictHandling.RAISE_ALL)
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    return model


# ---------------------------------------------------------------------- mixtures of experts
# Settings as Megatron-Bridge d9f7643 states them (models/nemotronh/nemotron_h_provider.py:
# NemotronHModelProvider's MoE block and Nemotron3NanoProvider; the Qwen2-MoE bridge's
# provider settings), and Megatron-LM's arguments of the same names (``--num-experts``).
def moe_megatron_lm_args(hf_dir: Path, *, tp: int, pp: int, tokenizer_model: str) -> argparse.Namespace:
    """The args Megatron-LM saves for a Qwen2-MoE model (softmax router over the top-k of all
    experts' probabilities: ``--moe-router-pre-softmax``; a gated shared expert; QKV biases)."""
    c = hf_config(hf_dir)
    args = megatron_lm_args(hf_dir, tp=tp, pp=pp, divisible_by=128, tokenizer_model=tokenizer_model)
    vars(args).update(
        add_qkv_bias=True, num_experts=c["num_experts"], moe_router_topk=c["num_experts_per_tok"],
        moe_ffn_hidden_size=c["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=c["shared_expert_intermediate_size"], moe_shared_expert_gate=True,
        moe_router_pre_softmax=not c["norm_topk_prob"], moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=[c["router_aux_loss_coef"]],
        moe_layer_freq=[1] * c["num_hidden_layers"], moe_grouped_gemm=True, moe_router_dtype=None,
        moe_token_dispatcher_type="allgather", expert_model_parallel_size=1)
    return args


def hybrid_moe_bridge_model_section(hf_dir: Path, *, tp: int, pp: int) -> dict:
    """run_config.yaml ``model:`` of a Nemotron 3 (hybrid MoE) model as Bridge's
    Nemotron3NanoProvider serializes it."""
    c = hf_config(hf_dir)
    return {
        **hybrid_bridge_model_section(hf_dir, tp=tp, pp=pp),
        "_target_": "megatron.bridge.models.nemotronh.nemotron_h_provider.Nemotron3NanoProvider",
        "num_moe_experts": c["n_routed_experts"], "moe_ffn_hidden_size": c["moe_intermediate_size"],
        "moe_shared_expert_intermediate_size": c["moe_shared_expert_intermediate_size"],
        "moe_router_topk": c["num_experts_per_tok"], "moe_router_topk_scaling_factor": c["routed_scaling_factor"],
        "moe_router_num_groups": 1, "moe_router_group_topk": 1, "moe_aux_loss_coeff": 0.0001,
        "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
        "moe_router_load_balancing_type": "seq_aux_loss", "moe_router_dtype": "fp32", "moe_grouped_gemm": True,
        "moe_token_dispatcher_type": "alltoall", "moe_permute_fusion": True, "moe_shared_expert_overlap": True,
    }
