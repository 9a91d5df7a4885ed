"""Heterogeneous (per-layer) models: the description and its counts, conversion from and to
the Llama-Nemotron (nemotron-nas) format at TP=1, TP=2 and PP=2, Megatron export read back,
and bad input. The reference is transformers' Llama with each layer's modules resized or
removed (tests/tiny_models.py: heterogeneous_reference)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli_in_process, run_workers
from safetensors.torch import load_file
from tiny_models import (
    HETERO_HEAD_DIM,
    HETERO_HEADS,
    TINY_HETEROGENEOUS,
    TINY_VOCAB,
    heterogeneous_used_weights,
    make_tiny_heterogeneous,
)
from tolerances import transformer_logits

from nemo_minitron.errors import UsageError

WIDEST = max(f for _, f in TINY_HETEROGENEOUS)  # the widest inner dimension of any product
TOKENS = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def hetero(tmp_path_factory):
    """(nemotron-nas directory, its reference model, the reference's logits of TOKENS)."""
    directory, reference = make_tiny_heterogeneous(tmp_path_factory.mktemp("hetero") / "hf")
    with torch.no_grad():
        logits = reference(TOKENS).logits.float()
    return directory, reference, logits


def _description(directory):
    from nemo_minitron.checkpoint.hf_format import description_from_hf_config

    return description_from_hf_config(json.loads((directory / "config.json").read_text()))


def _layer_weights(weights: dict, i: int) -> dict:
    return {k: v for k, v in weights.items() if k.startswith(f"model.layers.{i}.")}


def test_description_shapes_json_and_counts_equal_the_reference(hetero):
    from nemo_minitron.model.description import LayerShape, ModelDescription, layer_costs

    directory, reference, _ = hetero
    desc = _description(directory)
    assert desc.architecture == "nemotron-nas"
    assert desc.layer_shapes == tuple(LayerShape(g, f) for g, f in TINY_HETEROGENEOUS)
    assert ModelDescription.from_dict(json.loads(desc.to_json())) == desc
    used = heterogeneous_used_weights(reference)
    assert desc.num_parameters() == sum(t.numel() for t in used.values())
    seq = 100
    for i, shape in enumerate(desc.layer_shapes):
        mine = _layer_weights(used, i)
        costs = layer_costs(desc, shape, seq_len=seq)
        assert costs.parameters == sum(t.numel() for t in mine.values()), i
        matrices = sum(t.numel() for k, t in mine.items() if t.dim() == 2)
        attention = 2 * 2 * HETERO_HEADS * HETERO_HEAD_DIM * seq / 2 if shape.num_query_groups else 0
        assert costs.flops_per_token == 2 * matrices + attention, i
        k_rows = mine[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0] if shape.num_query_groups else 0
        assert costs.kv_cache_bytes_per_token == 2 * k_rows * 2, i  # keys and values, 2 bytes each
    assert desc.kv_cache_bytes_per_token() == sum(layer_costs(desc, s).kv_cache_bytes_per_token
                                                  for s in desc.layer_shapes)
    # a uniform model's layers cost what its per-layer count says
    uniform = desc.replace(layer_shapes=(), architecture="llama", num_query_groups=2, ffn_hidden_size=512)
    assert layer_costs(uniform, uniform.layer_shape(0)).parameters == uniform.parameters_per_layer()
    # a Llama pruned per layer is written in this format
    from nemo_minitron.checkpoint.hf_export import hf_config

    as_llama = desc.replace(architecture="llama")
    config = hf_config(as_llama, torch.float32)
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert _description_of(config).layer_shapes == desc.layer_shapes


def _description_of(config: dict):
    from nemo_minitron.checkpoint.hf_format import description_from_hf_config

    return description_from_hf_config(config)


def test_bad_per_layer_shapes_are_one_line_errors(hetero):
    from nemo_minitron.checkpoint.hf_export import hf_config

    directory, _, _ = hetero
    desc = _description(directory)
    cases = {
        "must divide the attention heads": lambda: desc.replace(layer_shapes=[(3, 256), (4, 256), (4, 256), (4, 256)]),
        "remove the attention of every layer": lambda: desc.replace(layer_shapes=[(0, 256)] * 4),
        "--tp 2 does not divide layer 1's query groups (1)":
            lambda: desc.replace(layer_shapes=[(2, 256), (1, 256), (4, 0), (2, 768)]).check_layout(2, 1),
        "--tp 4 does not divide layer 0's query groups (2)": lambda: desc.check_layout(4, 1),
        "layer 2: MLP width 96 is not representable":
            lambda: hf_config(desc.replace(layer_shapes=[(2, 512), (0, 256), (4, 96), (2, 768)]), torch.float32),
        "has 3 entries, the model 4 layers": lambda: desc.replace(layer_shapes=[(2, 512)] * 3),
    }
    for expected, make in cases.items():
        with pytest.raises(UsageError) as e:
            make()
        assert expected in str(e.value) and "\n" not in str(e.value), (expected, str(e.value))


def _set(key: str, value):
    def change(blocks: list) -> None:
        part, name = key.split(".")
        blocks[1][part][name] = value
    return change


def _no_attention(blocks: list) -> None:
    for block in blocks:
        block["attention"] = {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False}


def test_bad_configs_exit_2_in_one_line_naming_the_key(hetero, tmp_path, capsys):
    import shutil

    directory, _, _ = hetero
    cases = (("linear-attention", _set("attention.replace_with_linear", True),
              "block_configs[1].attention.replace_with_linear"),
             ("linear-ffn", _set("ffn.replace_with_linear", True), "block_configs[1].ffn.replace_with_linear"),
             ("window", _set("attention.window_length", 64), "block_configs[1].attention.window_length"),
             ("no-attention", _no_attention, "remove the attention of every layer"))
    for tag, change, expected in cases:
        bad = tmp_path / tag
        shutil.copytree(directory, bad)
        config = json.loads((bad / "config.json").read_text())
        change(config["block_configs"])
        (bad / "config.json").write_text(json.dumps(config))
        code, err = cli_in_process(capsys, "convert", "--hf", str(bad), "--out", str(tmp_path / f"{tag}-out"))
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"{tag}-out").exists()
    code, err = cli_in_process(capsys, "convert", "--hf", str(directory), "--out", str(tmp_path / "tp4"), "--tp", "4")
    assert code == 2 and "--tp 4 does not divide layer 0's query groups" in err, err


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_conversion_both_ways_at_tp1(tied, hetero, tmp_path, runtime):
    """Import equals the reference; the Hugging Face export holds the source's tensors bit for bit
    and loads in transformers with its shipped code (trust_remote_code) to the same logits; the
    Megatron export reads back in place to them too. Also with tied embeddings (SmolLM2's)."""
    from transformers import AutoModelForCausalLM

    from nemo_minitron.checkpoint.api import convert, export, open_model
    from nemo_minitron.model.forward import full_logits

    directory, reference, ref_logits = hetero
    if tied:
        directory, reference = make_tiny_heterogeneous(tmp_path / "tied-hf", seed=1, tied=True)
        with torch.no_grad():
            ref_logits = reference(TOKENS).logits.float()
    tol = transformer_logits(WIDEST, len(TINY_HETEROGENEOUS), ref_logits)
    checkpoint = convert(str(directory), str(tmp_path / "ckpt"))
    opened = open_model(str(checkpoint))
    assert (full_logits(opened.model, TOKENS, TINY_VOCAB) - ref_logits).abs().max().item() <= tol

    export(str(checkpoint), str(tmp_path / "hf"), megatron_out=str(tmp_path / "megatron"))
    exported = load_file(str(tmp_path / "hf" / "model-stage000-00000.safetensors"))
    source = load_file(str(directory / "model.safetensors"))
    assert exported.keys() == source.keys()
    assert all(torch.equal(exported[k], source[k]) for k in source)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert _description_of(config).layer_shapes == opened.description.layer_shapes
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True, dtype=torch.float32)
    assert type(model).__name__ == "DeciLMForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == opened.description.num_parameters()
    with torch.no_grad():
        assert (model.eval()(TOKENS).logits - ref_logits).abs().max().item() <= tol

    megatron = open_model(str(tmp_path / "megatron"))
    assert megatron.description.layer_shapes == opened.description.layer_shapes
    assert (full_logits(megatron.model, TOKENS, TINY_VOCAB) - ref_logits).abs().max().item() <= tol


@pytest.mark.multirank
def test_conversion_both_ways_at_tp2_and_pp2(hetero, tmp_path):
    """Converted at TP=2 and at PP=2 (each PP stage holds a removed part), the TP=2 checkpoint
    loaded at PP=2, both exported to Hugging Face (bit-equal tensors) and Megatron (read back
    in place): every model's logits equal the reference's."""
    directory, _, ref_logits = hetero
    out = tmp_path / "workers"
    torch.save(TOKENS, tmp_path / "tokens.pt")
    spec = {"tokens": str(tmp_path / "tokens.pt"), "source": str(directory), "out": str(out),
            "layouts": [[2, 1], [1, 2]], "load_at": [1, 2]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_workers("heterogeneous_layouts.py", tmp_path / "spec.json", out=out)
    tol = transformer_logits(WIDEST, len(TINY_HETEROGENEOUS), ref_logits)
    source = load_file(str(directory / "model.safetensors"))
    for tag in ("tp2pp1", "tp1pp2"):
        for kind in ("converted", "megatron"):
            logits = torch.load(out / f"{tag}-{kind}.pt")
            assert (logits - ref_logits).abs().max().item() <= tol, (tag, kind)
        exported = {}
        for f in sorted((out / f"{tag}-hf").glob("model-*.safetensors")):
            exported.update(load_file(str(f)))
        assert exported.keys() == source.keys(), tag
        assert all(torch.equal(exported[k], source[k]) for k in source), tag
    assert (torch.load(out / "reloaded.pt") - ref_logits).abs().max().item() <= tol


def test_export_refuses_a_width_the_format_cannot_state(tmp_path, runtime, capsys):
    """Our checkpoints hold any MLP width; the Hugging Face export (ffn_mult: multiples of 256)
    refuses a layer of width 96 before writing anything, naming the layer and nearest widths."""
    from nemo_minitron.checkpoint.api import convert

    shapes = ((2, 512), (0, 256), (4, 0), (2, 96))
    directory, _ = make_tiny_heterogeneous(tmp_path / "hf", shapes=shapes)
    config = json.loads((directory / "config.json").read_text())
    config["block_configs"][3]["ffn"] = {"ffn_hidden_size": 96, "no_op": False}  # megatron-core's key
    (directory / "config.json").write_text(json.dumps(config))
    checkpoint = convert(str(directory), str(tmp_path / "ckpt"))
    code, err = cli_in_process(capsys, "export", str(checkpoint), "--hf-out", str(tmp_path / "out"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "layer 3: MLP width 96 is not representable" in err and "nearest: 0, 256" in err, err
    assert not (tmp_path / "out").exists()
