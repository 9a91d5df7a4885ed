"""Megatron-LM and Megatron-Bridge checkpoints of mixtures of experts: a GPT mixture of
experts (Qwen2-MoE: softmax top-k of all experts, gated shared expert) and a hybrid with MoE
layers (Nemotron 3: sigmoid router with expert bias, ungated shared expert), read in place
and written by ``export --megatron-out``, at TP=1, TP=2 and PP=2.

One 2-rank run (tests/workers/megatron_hybrid.py, the ``hybrid_megatron`` fixture, shared with
tests/test_megatron_hybrid.py) writes a Megatron-LM checkpoint of the GPT
model at TP=2 (built from its args by megatron-core) and a Bridge one of the hybrid at PP=2
(Nemotron3NanoProvider settings), reads each at the other layout and exports each at
PP=2 / TP=2; the tests here read the checkpoints at TP=1 and load the exports strictly into
freshly built megatron-core models, and compare with transformers.
"""

from __future__ import annotations

import argparse

import pytest

from conftest import cli_in_process
from megatron_layouts import changed_copy, saved_args
from tiny_models import TINY_VOCAB, hf_logits
from tolerances import transformer_logits

GPT, HYBRID = "qwen2_moe", "nemotron_h_moe"
SEQ = 24
# what a description states about experts and routing (and the family)
MOE_FIELDS = ("num_experts", "moe_top_k", "moe_ffn_hidden_size", "moe_shared_ffn_hidden_size", "moe_shared_expert_gate",
              "moe_normalize_top_k", "moe_routed_scaling_factor", "hybrid_pattern", "architecture", "qkv_bias")


@pytest.fixture(scope="session")
def moe_megatron(hybrid_megatron):
    return {**hybrid_megatron, "out": hybrid_megatron["out"] / "moe",
            "ranks": {k[len("moe/"):]: v for k, v in hybrid_megatron["ranks"].items() if k.startswith("moe/")}}


def _tolerance(desc, reference):
    from test_conversion import widest

    return transformer_logits(widest(desc, SEQ), desc.num_layers, reference)


@pytest.mark.multirank
def test_moe_checkpoints_read_in_place_with_the_reference_logits(moe_megatron):
    """The Megatron-LM GPT MoE (TP=2, stacked) and the Bridge hybrid MoE (PP=2, per layer),
    read at TP=1 here and at the other layout in the worker: the description is the HF
    model's (experts, top-k, widths, routing) and the logits are transformers'."""
    from nemo_minitron.checkpoint.api import describe_model, open_model
    from nemo_minitron.model.forward import full_logits

    out, tokens = moe_megatron["out"], moe_megatron["tokens"]
    for name, kind, other in (("megatron_lm", GPT, "megatron_lm@pp2"), ("bridge", HYBRID, "bridge@tp2")):
        hf = moe_megatron["hf"][kind]
        reference = hf_logits(hf, tokens)
        opened = open_model(str(out / name))
        desc, expected = opened.description, describe_model(str(hf))
        for field in MOE_FIELDS:
            assert getattr(desc, field) == getattr(expected, field), (name, field)
        tol = _tolerance(desc, reference)
        assert (full_logits(opened.model, tokens, desc.vocab_size) - reference).abs().max().item() <= tol, name
        assert (moe_megatron["ranks"][other] - reference).abs().max().item() <= tol, other


@pytest.mark.multirank
def test_moe_exports_state_the_model_in_both_vocabularies(moe_megatron):
    """Each export's common.pt args (Megatron-LM) and run_config.yaml provider (Bridge) each
    describe the HF model's experts and routing (the reader takes run_config.yaml when both
    are there: the args are read here on their own)."""
    import yaml

    from nemo_minitron.checkpoint.api import describe_model
    from nemo_minitron.checkpoint.megatron_config import description_from_config, normalize_args

    for name, kind in (("export_pp2", GPT), ("export_tp2", HYBRID)):
        written = moe_megatron["out"] / name / "iter_0000000"
        expected = describe_model(str(moe_megatron["hf"][kind]))
        configs = {"args": normalize_args(saved_args(written)),
                   "provider": yaml.safe_load((written / "run_config.yaml").read_text())["model"]}
        for source, cfg in configs.items():
            desc = description_from_config(cfg, vocab_size=TINY_VOCAB, source=source)
            for field in MOE_FIELDS + ("moe_aux_loss_coeff",):
                assert getattr(desc, field) == getattr(expected, field), (name, source, field)


@pytest.mark.multirank
def test_moe_exports_load_into_megatron_core_models(moe_megatron):
    """``export --megatron-out`` of the GPT MoE (PP=2) loads strictly into the GPTModel
    Megatron-LM builds from its common.pt args, and of the hybrid MoE (TP=2) into a
    MambaModel, both keyed as the Transformer Engine spec keys them (a MoE layer's own
    pre_mlp_layernorm); the logits are transformers'."""
    import yaml
    from megatron.core import dist_checkpointing
    from megatron_layouts import gpt_from_args, strict_load, te_keyed

    from nemo_minitron.checkpoint.api import describe_model
    from nemo_minitron.model.builder import build_model
    from nemo_minitron.model.forward import full_logits

    out, tokens = moe_megatron["out"], moe_megatron["tokens"]
    gpt_dir = out / "export_pp2" / "iter_0000000"
    args = saved_args(gpt_dir)
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == (4, 2, 48)
    assert args.moe_router_pre_softmax and args.moe_shared_expert_gate and args.moe_shared_expert_intermediate_size == 64
    keys = set(dist_checkpointing.load_tensors_metadata(str(gpt_dir)))
    assert {"decoder.layers.pre_mlp_layernorm.weight", "decoder.layers.mlp.experts.experts.linear_fc1.weight",
            "decoder.layers.mlp.shared_experts.gate_weight"} <= keys
    reference = hf_logits(moe_megatron["hf"][GPT], tokens)
    here = argparse.Namespace(**{**vars(args), "pipeline_model_parallel_size": 1})  # loaded at this run's layout
    model = strict_load(gpt_from_args(here), gpt_dir, keys=te_keyed)
    assert (full_logits(model, tokens, TINY_VOCAB) - reference).abs().max().item() <= _tolerance(
        describe_model(str(moe_megatron["hf"][GPT])), reference)

    hybrid_dir = out / "export_tp2" / "iter_0000000"
    section = yaml.safe_load((hybrid_dir / "run_config.yaml").read_text())["model"]
    assert (section["num_moe_experts"], section["moe_router_topk"], section["moe_router_score_function"],
            section["moe_router_enable_expert_bias"], section["moe_router_topk_scaling_factor"]) == (4, 2, "sigmoid",
                                                                                                     True, 2.5)
    assert section["hybrid_override_pattern"] == "ME*M-E" and section["moe_shared_expert_intermediate_size"] == 48
    keys = set(dist_checkpointing.load_tensors_metadata(str(hybrid_dir)))
    assert {"decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.1.mlp.router.expert_bias",
            "decoder.layers.4.mlp.linear_fc1.layer_norm_weight"} <= keys
    desc = describe_model(str(moe_megatron["hf"][HYBRID]))
    reference = hf_logits(moe_megatron["hf"][HYBRID], tokens)
    model = strict_load(build_model(desc), hybrid_dir, keys=te_keyed)
    assert (full_logits(model, tokens, desc.vocab_size) - reference).abs().max().item() <= _tolerance(desc, reference)


@pytest.mark.multirank
@pytest.mark.parametrize("layout, changes, words", [
    ("bridge", {"moe_router_num_groups": 2, "moe_router_group_topk": 1}, ["moe_router_num_groups=2", "group-limited"]),
    ("bridge", {"moe_latent_size": 16}, ["moe_latent_size=16", "latent"]),
    ("bridge", {"moe_router_score_function": "softmax"}, ["moe_router_score_function='softmax'", "must be 'sigmoid'"]),
    ("bridge", {"moe_router_enable_expert_bias": False}, ["moe_router_enable_expert_bias=False"]),
    ("bridge", {"moe_shared_expert_intermediate_size": None}, ["moe_shared_expert_intermediate_size"]),
    ("bridge", {"num_moe_experts": None}, ["num_moe_experts is missing"]),
    ("megatron_lm", {"moe_layer_freq": [1, 0, 1]}, ["moe_layer_freq=[1, 0, 1]", "dense MLP layers"]),
    ("megatron_lm", {"moe_router_score_function": "sigmoid"}, ["moe_router_score_function='sigmoid'"]),
    ("megatron_lm", {"moe_router_topk_scaling_factor": 2.0}, ["moe_router_topk_scaling_factor=2.0"]),
    ("megatron_lm", {"moe_expert_capacity_factor": 1.0}, ["moe_expert_capacity_factor=1.0", "token dropping"]),
    ("megatron_lm", {"moe_aux_loss_coeff": [0.01, 0.001]}, ["moe_aux_loss_coeff", "one coefficient"]),
    ("megatron_lm", {"moe_shared_expert_gate": False}, ["moe_shared_expert_intermediate_size=64",
                                                         "moe_shared_expert_gate=False"]),
    ("singleton", {}, ["singleton_local_shards", "experts.0."]),
])
def test_unmapped_moe_settings_are_one_line(moe_megatron, tmp_path, capsys, layout, changes, words):
    ckpt = changed_copy(moe_megatron["out"] / layout, tmp_path / "ckpt", **changes)
    code, err = cli_in_process(capsys, "eval", ckpt, "--data", "builtin:heldout", "--seq-len", "16", "--max-tokens", "32")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err
