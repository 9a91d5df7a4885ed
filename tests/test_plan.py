"""The architecture planner and targets: model descriptions only, no weights."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

LLAMA_31_8B = {  # meta-llama/Llama-3.1-8B config.json (the fields that matter)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "max_position_embeddings": 131072, "attention_bias": False, "mlp_bias": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": 128001,
}
MISTRAL_NEMO_12B = {  # mistralai/Mistral-Nemo-Base-2407
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu", "hidden_size": 5120,
    "intermediate_size": 14336, "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 131072, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0, "max_position_embeddings": 1024000, "sliding_window": None,
}
SMOLLM2_135M = {  # HuggingFaceTB/SmolLM2-135M
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "vocab_size": 49152, "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
}


def _desc(config):
    from nemo_minitron.checkpoint.hf_format import description_from_hf_config

    return description_from_hf_config(config)


def _cuts(old, new):
    return [1 - b / a for a, b in ((old.hidden_size, new.hidden_size), (old.ffn_hidden_size, new.ffn_hidden_size),
                                   (old.num_attention_heads, new.num_attention_heads))]


def test_published_shapes_from_descriptions_alone():
    """Llama-3.1-Minitron 4B width and depth both count ~4.5B; Mistral-NeMo-Minitron 8B ~8.4B."""
    from nemo_minitron.prune.targets import apply_target

    llama = _desc(LLAMA_31_8B)
    assert round(llama.num_parameters() / 1e9, 2) == 8.03
    width = apply_target(llama, {"hidden": 3072, "ffn": 9216})
    depth = apply_target(llama, {"layers": 16})
    assert (width.num_attention_heads, width.num_query_groups, width.num_layers, width.head_dim) == (32, 8, 32, 128)
    assert round(width.num_parameters() / 1e9, 1) == 4.5 and round(depth.num_parameters() / 1e9, 1) == 4.5
    nemo = apply_target(_desc(MISTRAL_NEMO_12B), {"hidden": 4096, "ffn": 11520})
    assert round(_desc(MISTRAL_NEMO_12B).num_parameters() / 1e9, 1) == 12.2
    assert round(nemo.num_parameters() / 1e9, 1) == 8.4
    # depth halves the KV cache, width keeps it
    assert depth.kv_cache_bytes_per_token() * 2 == width.kv_cache_bytes_per_token() == 131072


def test_budget_candidates_for_llama_8b_to_4_5b():
    from nemo_minitron.prune.plan import plan

    llama = _desc(LLAMA_31_8B)
    candidates = plan(llama, int(4.5e9))
    assert len(candidates) > 10 and all(abs(c.params / 4.5e9 - 1) <= 0.05 for c in candidates)
    assert all(max(_cuts(llama, c.description)) <= 0.5 + 1e-9 and c.description.num_layers >= 16
               for c in candidates)
    best = candidates[0].description
    assert best.num_layers == 32 and (best.num_attention_heads, best.num_query_groups) == (32, 8)  # width first
    assert "keeps all 32 layers and attention" in candidates[0].why
    published_width = {"hidden": 3072, "ffn": 9216, "heads": 32, "query_groups": 8, "layers": 32}
    assert published_width in [c.target() for c in candidates]
    depth_first = plan(llama, int(4.5e9), prefer="depth")
    assert depth_first[0].target() == {"hidden": 4096, "ffn": 14336, "heads": 32, "query_groups": 8, "layers": 16}
    assert depth_first[0].why == "depth: -16 layers; keeps attention"
    same_set = sorted(tuple(c.target().values()) for c in depth_first)
    assert same_set == sorted(tuple(c.target().values()) for c in candidates)  # only the order differs


def test_planner_respects_limits_and_layouts():
    from nemo_minitron.errors import UsageError
    from nemo_minitron.prune.plan import plan

    llama, smol = _desc(LLAMA_31_8B), _desc(SMOLLM2_135M)
    for c in plan(llama, int(6e9), max_width_cut=0.2, max_depth_cut=0.1):
        assert max(_cuts(llama, c.description)) <= 0.2 + 1e-9 and c.description.num_layers >= 29
    for c in plan(llama, int(4.5e9), tp=8, pp=4):
        d = c.description
        assert d.num_query_groups % 8 == 0 and d.num_attention_heads % 8 == 0 and d.ffn_hidden_size % 8 == 0
    for c in plan(smol, int(90e6), tp=3):
        d = c.description
        assert d.num_query_groups % 3 == 0 and d.ffn_hidden_size % 3 == 0 and abs(c.params / 90e6 - 1) <= 0.05
    groups_cut = [c for c in plan(smol, int(90e6)) if c.description.num_query_groups < 3]
    assert groups_cut and all(c.description.heads_per_group == 3 for c in groups_cut)  # whole groups go
    with pytest.raises(UsageError, match="no architecture within 5%"):
        plan(llama, int(1e9))  # would need more than half of every width and depth
    with pytest.raises(UsageError, match="not smaller than the model"):
        plan(llama, int(9e9))


def test_parse_targets_and_budgets():
    from nemo_minitron.errors import UsageError
    from nemo_minitron.prune.targets import apply_target, parse_param_count, parse_target

    assert parse_param_count("90M") == 90_000_000 and parse_param_count("4.5B") == 4_500_000_000
    assert parse_param_count("135000000") == 135_000_000 and parse_param_count("1.5k") == 1500
    assert parse_target("hidden=480, ffn=1024,heads=6,query_groups=3,layers=24") == {
        "hidden": 480, "ffn": 1024, "heads": 6, "query_groups": 3, "layers": 24}
    for bad in ("90X", "-1M", "M"):
        with pytest.raises(UsageError, match="--target-params"):
            parse_param_count(bad)
    for bad, words in (("width=3", "unknown axis 'width'"), ("ffn=1k", "ffn must be a whole number"),
                       ("ffn=1,ffn=2", "given twice"), ("", "is empty")):
        with pytest.raises(UsageError, match=words):
            parse_target(bad)
    smol = _desc(SMOLLM2_135M)
    only_groups = apply_target(smol, {"query_groups": 2})
    assert (only_groups.num_attention_heads, only_groups.num_query_groups) == (6, 2)  # groups go with their heads
    with pytest.raises(UsageError, match="needs 4 heads per group, but the original groups hold 3"):
        apply_target(smol, {"heads": 8, "query_groups": 2})


def test_plan_command_on_a_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    proc = run_cli("plan", tmp_path / "config.json", "--target-params", "4.5B", "--json", tmp_path / "plan.json")
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.lstrip().startswith("#"))
    for column in ("params", "hidden", "ffn", "heads", "groups", "layers", "GFLOPs/token", "KV bytes/token", "how"):
        assert column in header
    assert "ranked width first" in proc.stdout
    rows = json.loads((tmp_path / "plan.json").read_text())
    assert rows and all(abs(r["params"] / 4.5e9 - 1) <= 0.05 for r in rows)
    assert rows[0]["target"]["layers"] == 32 and rows[0]["flops_per_token"] < _desc(LLAMA_31_8B).flops_per_token()


def test_plan_command_on_a_checkpoint_matches_its_config(tiny_hf, tiny_checkpoint):
    """A checkpoint and the HF config.json it came from plan alike."""
    table = {}
    for name, model in (("config", tiny_hf("llama") / "config.json"), ("checkpoint", tiny_checkpoint("llama"))):
        proc = run_cli("plan", model, "--target-params", "210K")
        assert proc.returncode == 0, proc.stderr
        table[name] = proc.stdout.splitlines()[1:]
    assert table["config"] == table["checkpoint"] and len(table["config"]) > 5
