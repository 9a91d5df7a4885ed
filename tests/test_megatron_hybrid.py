"""Megatron-LM and Megatron-Bridge checkpoints of hybrid (Nemotron-H) models: read in place
by every command, written by ``export --megatron-out``, at TP=1, TP=2 and PP=2.

One 2-rank run (tests/workers/megatron_hybrid.py, the ``hybrid_megatron`` fixture) writes a Megatron-LM checkpoint at TP=2
(common.pt args with ``hybrid_override_pattern``, the TE spec's keys) and a Bridge one at
PP=2 (run_config.yaml's HybridModelProvider with ``hybrid_layer_pattern``), reads each at
the other layout and exports each with ``--megatron-out`` at PP=2 / TP=2; the tests here
read all four at TP=1 and compare with transformers' NemotronH.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import cli_in_process
from megatron_layouts import changed_copy, saved_args
from tiny_models import hf_logits
from tolerances import transformer_logits

KIND = "nemotron_h"
SEQ = 24


def _hf_weights(hf_dir: Path, desc) -> dict[str, torch.Tensor]:
    """Every canonical weight of the HF model (vocabulary rows cut to the true vocabulary)."""
    from safetensors.torch import load_file

    from nemo_minitron.checkpoint.hf_format import canonical_names, hf_to_canonical

    state = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return {name: hf_to_canonical(desc, name, lambda n: state[n].float())[: desc.vocab_size]
            if name.startswith(("embedding", "output_layer")) else hf_to_canonical(desc, name, lambda n: state[n].float())
            for name in canonical_names(desc)}


@pytest.mark.multirank
def test_hybrid_megatron_checkpoints_read_and_write_at_every_layout(hybrid_megatron):
    """Megatron-LM (TP=2) and Bridge (PP=2) checkpoints, and our exports of them at PP=2 and
    TP=2, read at TP=1: every weight is transformers' (bit for bit) and the logits are
    transformers' NemotronH's; read at the other layout in the worker, the logits too."""
    from test_conversion import widest

    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.model.params import named_weights

    out, tokens = hybrid_megatron["out"], hybrid_megatron["tokens"]
    reference = hf_logits(hybrid_megatron["hf"][KIND], tokens)
    for name in ("megatron_lm", "bridge", "export_pp2", "export_tp2"):
        opened = open_model(str(out / name))
        desc = opened.description
        assert desc.hybrid_pattern == "M*-M-M" and (desc.mamba_num_heads, desc.mamba_head_dim) == (8, 8), name
        tol = transformer_logits(widest(desc, SEQ), desc.num_layers, reference)
        logits = full_logits(opened.model, tokens, desc.vocab_size)
        assert (logits - reference).abs().max().item() <= tol, name
        expected = _hf_weights(hybrid_megatron["hf"][KIND], desc)
        mine = dict(named_weights(opened.model))
        assert set(mine) == set(expected), name
        for weight, tensor in mine.items():
            assert torch.equal(tensor.detach()[: expected[weight].shape[0]], expected[weight]), (name, weight)
    for key in ("megatron_lm@pp2", "bridge@tp2"):
        assert (hybrid_megatron["ranks"][key] - reference).abs().max().item() <= tol, key
    # Megatron-LM has no chunk-length argument (the mixer's 128); Bridge states it
    from nemo_minitron.checkpoint.api import describe_model

    assert describe_model(str(out / "megatron_lm")).mamba_chunk_size == 128
    assert describe_model(str(out / "bridge")).mamba_chunk_size == 16


@pytest.mark.multirank
def test_hybrid_export_is_keyed_and_described_as_megatron_builds_it(hybrid_megatron):
    """The export at TP=2: common.pt's args name Megatron-LM's hybrid builder and settings,
    run_config.yaml a MambaModelProvider with Bridge's Nemotron-H fields, and the layer norms
    are stored under the Transformer Engine spec's keys (what Megatron-LM and Bridge build)."""
    import yaml
    from megatron.core import dist_checkpointing

    written = hybrid_megatron["out"] / "export_tp2" / "iter_0000000"
    args = saved_args(written)
    assert (args.hybrid_override_pattern, args.is_hybrid_model, args.position_embedding_type) == ("M*-M-M", True, "none")
    assert (args.mamba_num_heads, args.mamba_head_dim, args.mamba_num_groups, args.mamba_state_dim) == (8, 8, 2, 16)
    assert args.spec == ["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"] and args.squared_relu
    assert args.tensor_model_parallel_size == 2 and args.padded_vocab_size == 1024
    model = yaml.safe_load((written / "run_config.yaml").read_text())["model"]
    assert model["_target_"].endswith("MambaModelProvider") and model["hybrid_override_pattern"] == "M*-M-M"
    assert model["mamba_chunk_size"] == 16 and model["activation_func"]["_target_"].endswith("squared_relu")
    keys = set(dist_checkpointing.load_tensors_metadata(str(written)))
    assert {"decoder.layers.0.mixer.in_proj.layer_norm_weight", "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
            "decoder.layers.2.mlp.linear_fc1.layer_norm_weight", "decoder.final_norm.weight",
            "decoder.layers.0.mixer.in_proj.weight.dt"} <= keys
    assert not any(k.endswith(("layers.0.norm.weight", "input_layernorm.weight", "pre_mlp_layernorm.weight")) for k in keys)


@pytest.mark.multirank
@pytest.mark.parametrize("changes, words", [
    ({"hybrid_layer_pattern": "M*-E-M"}, ["num_moe_experts is missing", "'E'"]),  # MoE layers: tests/test_megatron_moe.py
    ({"hybrid_layer_pattern": "M*-M-M/*-"}, ["hybrid_layer_pattern", "multi-token prediction"]),
    ({"position_embedding_type": "rope"}, ["position_embedding_type='rope'", "must be 'none'"]),
    ({"hybrid_layer_pattern": None, "hybrid_attention_ratio": 0.2}, ["hybrid_attention_ratio=0.2", "not supported"]),
    ({"activation_func": {"_target_": "torch.nn.functional.gelu", "_call_": False}}, ["activation_func='gelu'"]),
])
def test_unreadable_hybrid_checkpoints_are_one_line(hybrid_megatron, tmp_path, capsys, changes, words):
    ckpt = changed_copy(hybrid_megatron["out"] / "bridge", tmp_path / "ckpt", **changes)
    code, err = cli_in_process(capsys, "eval", ckpt, "--data", "builtin:heldout", "--seq-len", "16", "--max-tokens", "32")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err


def test_pipeline_bars_are_stage_boundaries_only():
    """Megatron-LM's ``|`` marks pipeline stages in a pattern: the layers are the same."""
    from nemo_minitron.checkpoint.megatron_config import hybrid_pattern

    assert hybrid_pattern({"hybrid_override_pattern": "M*-|M-M"}, "args") == "M*-M-M"
    assert hybrid_pattern({"is_hybrid_model": True, "num_layers": 3}, "args") == "MMM"  # megatron's default


def test_conv_width_megatron_cannot_state_is_refused(tiny_hf):
    from nemo_minitron.checkpoint.api import describe_model
    from nemo_minitron.checkpoint.megatron_config import check_writable
    from nemo_minitron.errors import UsageError

    desc = describe_model(str(tiny_hf(KIND))).replace(mamba_conv_kernel=3)
    with pytest.raises(UsageError, match="conv of width 3"):
        check_writable(desc)
