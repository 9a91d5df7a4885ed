"""Model families as data: the tables, Nemotron and Qwen3 end to end, unsupported features.

Conversion of every family at TP=1 is in test_conversion.py, importance against HF
activations in test_importance.py, pruning (identity, kept weights, counts) in
test_prune.py; here: the family tables themselves, real configs' parameter counts against
transformers' own models, TP=2 and PP=2 round trips, and the one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import cli_in_process, run_workers
from tiny_models import MOE_KINDS, TINY_CONFIGS, hf_logits
from tolerances import transformer_logits

DATA = Path(__file__).parent / "data" / "hf_configs"
NEW_FAMILIES = ("qwen3", "nemotron", *MOE_KINDS)
#: Qwen/Qwen3-8B config.json (the fields that matter)
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096,
            "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 40960, "attention_bias": False, "tie_word_embeddings": False,
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": 36, "bos_token_id": 151643,
            "eos_token_id": 151645, "torch_dtype": "bfloat16"}


def _hf_model(config: dict):
    """transformers' own model for ``config``, built on the meta device (no memory)."""
    import transformers

    from nemo_minitron.families import family

    cls = getattr(transformers, family(config["model_type"]).config_class)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cls(**config))


@pytest.mark.parametrize("config", [QWEN3_8B, "nvidia__Nemotron-4-15B.json"], ids=["qwen3-8b", "nemotron-4-15b"])
def test_real_configs_count_like_transformers(config):
    """Parameter counts of the description (what the planner uses) equal transformers' model
    for real Qwen3 and Nemotron configs, before and after a width prune; FLOPs per token are
    2 per weight of every matrix transformers' model multiplies by (the output layer, not the
    embedding lookup) plus the attention term."""
    from nemo_minitron.checkpoint.hf_format import hf_config_dict
    from nemo_minitron.checkpoint.hf_format import description_from_hf_config
    from nemo_minitron.prune.targets import apply_target

    config = json.loads((DATA / config).read_text()) if isinstance(config, str) else config
    desc = description_from_hf_config(config)
    pruned = apply_target(desc, {"hidden": 3072, "ffn": 8192, "query_groups": 4, "layers": 20})
    for d in (desc, pruned):
        model = _hf_model(hf_config_dict(d))
        assert d.num_parameters() == sum(p.numel() for p in model.parameters())
        matrices = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        attention = d.num_layers * 2 * 2 * d.num_attention_heads * d.head_dim * (4096 / 2)
        assert d.flops_per_token(4096) == int(2 * matrices + attention)
    if desc.architecture == "nemotron":
        assert (desc.mlp_matrices, desc.rotary_dim, desc.normalization) == (2, 64, "LayerNorm")
        assert round(desc.num_parameters() / 1e9, 1) == 15.6  # 3.1B embedding + 12.5B (arXiv 2402.16819)
    else:
        assert desc.qk_norm and round(desc.num_parameters() / 1e9, 1) == 8.2  # Qwen3-8B: "8.2B"


def test_minitron_8b_is_among_the_planners_candidates():
    """Nemotron-4 15B to the Minitron-8B budget: the published width shape (hidden 4096, ffn
    16384, 48 heads, 32 layers) is a candidate, so the MLP width is solved with the two
    matrices a squared-ReLU MLP has (three would put ffn elsewhere on the grid)."""
    from nemo_minitron.checkpoint.hf_format import description_from_hf_config
    from nemo_minitron.prune.plan import plan
    from nemo_minitron.prune.targets import apply_target

    nemotron = description_from_hf_config(json.loads((DATA / "nvidia__Nemotron-4-15B.json").read_text()))
    minitron = apply_target(nemotron, {"hidden": 4096, "ffn": 16384})
    assert minitron.num_parameters() == 8_271_699_968
    targets = [c.target() for c in plan(nemotron, minitron.num_parameters(), max_width_cut=0.35)]
    assert {"hidden": 4096, "ffn": 16384, "heads": 48, "query_groups": 8, "layers": 32} in targets


def test_qwen3_30b_a3b_counts_and_plans_total_or_active():
    """Qwen3-30B-A3B: total parameters == transformers' model (meta device) before and after
    an expert prune, 30.5B total and 3.3B active (the model card's figures); FLOPs per token
    written out from the config (q, k, v, o; router; top-8 experts of 3 matrices; the output
    layer; attention scores and values); the planner meets a total or an active budget with
    the count it was given, and its candidates prune experts and their width."""
    from nemo_minitron.checkpoint.hf_format import hf_config_dict
    from nemo_minitron.checkpoint.hf_format import description_from_hf_config
    from nemo_minitron.prune.plan import plan
    from nemo_minitron.prune.targets import apply_target

    config = json.loads((DATA / "Qwen__Qwen3-30B-A3B.json").read_text())
    desc = description_from_hf_config(config)
    pruned = apply_target(desc, {"experts": 64, "moe_ffn": 512, "top_k": 4, "layers": 40})
    for d in (desc, pruned):
        assert d.num_parameters() == sum(p.numel() for p in _hf_model(hf_config_dict(d)).parameters())
    # the model card: "30.5B in total and 3.3B activated", "29.9B non-embedding" (3.35B active: the card truncates)
    assert round(desc.num_parameters() / 1e9, 1) == 30.5 and int(desc.num_active_parameters() / 1e8) == 33
    assert round((desc.num_parameters() - 2 * 151936 * 2048) / 1e9, 1) == 29.9
    h, q, kv, f, k, experts = 2048, 32 * 128, 4 * 128, 768, 8, 128
    weights = 48 * (h * q + 2 * h * kv + q * h + experts * h + k * 3 * h * f) + 151936 * h
    assert desc.flops_per_token(4096) == int(2 * weights + 48 * 2 * 2 * q * 2048)
    for count, budget in (("total", 15_000_000_000), ("active", 2_000_000_000)):
        candidates = plan(desc, budget, param_count=count)
        assert candidates and all(abs(c.description.num_parameters(active=count == "active") / budget - 1) <= 0.05
                                  for c in candidates), count
        assert all(c.description.moe_top_k == 8 for c in candidates)
        if count == "total":  # fewer experts is a way to a total budget
            assert any(c.description.num_experts < 128 for c in candidates)


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_table_names_are_the_models_names(kind, tiny_hf, runtime):
    """Each family table lists exactly the weights megatron-core builds for the description
    and exactly the tensors the HF model stores."""
    from safetensors import safe_open

    from nemo_minitron.checkpoint.hf_format import canonical_names, hf_names
    from nemo_minitron.checkpoint.hf_import import resolve_source
    from nemo_minitron.model.builder import build_model
    from nemo_minitron.model.params import named_weights

    desc = resolve_source(str(tiny_hf(kind))).description
    assert sorted(canonical_names(desc)) == sorted(n for n, _ in named_weights(build_model(desc)))
    with safe_open(str(tiny_hf(kind) / "model.safetensors"), framework="pt") as f:
        assert sorted(hf_names(desc)) == sorted(f.keys())


@pytest.mark.multirank
def test_new_families_round_trip_at_tp2_and_pp2(tiny_hf, tmp_path):
    """HF -> ours -> HF at TP=2 and at PP=2 (one 2-process run for both layouts and every
    new family, the mixtures of experts included: their experts split over TP ranks, the
    all-gather dispatcher): the loaded model's logits and the exported model's logits
    equal HF's."""
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(5))
    torch.save(tokens, tmp_path / "tokens.pt")
    layouts = {"tp2": [2, 1], "pp2": [1, 2]}
    out = tmp_path / "out"
    jobs = [{"src": str(tiny_hf(k)), "hf_out": str(out / f"{{layout}}-{k}-hf"),
             "logits": str(out / f"{{layout}}-{k}.pt")} for k in NEW_FAMILIES]
    (tmp_path / "jobs.json").write_text(json.dumps({"tokens": str(tmp_path / "tokens.pt"), "layouts": layouts,
                                                    "jobs": jobs}))
    run_workers("families_layouts.py", tmp_path / "jobs.json", out=out)
    for kind, job in zip(NEW_FAMILIES, jobs):
        reference = hf_logits(tiny_hf(kind), tokens)
        # megatron (split over 2 ranks) against transformers, both float32: the rounding of two
        # forward passes through 3 layers whose matrix products sum at most 128 terms (the
        # widest: heads x head_dim); a misplaced row or expert moves logits by ~0.1
        tol = transformer_logits(128, 3, reference)
        for layout in layouts:
            ours = torch.load(job["logits"].format(layout=layout))
            assert (ours - reference).abs().max().item() <= tol, (layout, kind)
            # the export is the loaded weights, gathered: transformers computes the reference again
            exported = hf_logits(Path(job["hf_out"].format(layout=layout)), tokens)
            assert torch.equal(exported, reference), (layout, kind)


# ---------------------------------------------------------------------- unsupported features
def _hf_dir(tmp_path: Path, tiny_hf, kind: str, config_changes: dict, extra_weight: str | None = None) -> Path:
    """A copy of a tiny HF model with its config.json changed (and optionally one more weight)."""
    out = tmp_path / "model"
    shutil.copytree(tiny_hf(kind), out)
    config = json.loads((out / "config.json").read_text())
    config.update(config_changes)
    (out / "config.json").write_text(json.dumps(config))
    if extra_weight:
        from safetensors.torch import save_file

        save_file({extra_weight: torch.zeros(4)}, str(out / "model-extra.safetensors"))
    return out


@pytest.mark.parametrize("kind, changes, extra, words", [
    ("mistral", {"sliding_window": 4096}, None, "sliding_window=4096 is not supported (sliding-window attention)"),
    ("qwen3", {"use_sliding_window": True}, None, "use_sliding_window=True is not supported (sliding-window"),
    ("qwen3", {"layer_types": ["sliding_attention", "full_attention", "full_attention"]}, None, "layer_types="),
    ("nemotron", {"hidden_act": "gelu"}, None, "hidden_act='gelu' is not supported (the MLP activation); "
                                               "supported: hidden_act='relu2'"),
    ("llama", {"kv_lora_rank": 512}, None, "kv_lora_rank=512 is not supported (multi-head latent attention (MLA))"),
    ("llama", {"num_local_experts": 8}, None, "num_local_experts=8 is not supported (mixture of experts)"),
    ("qwen3", {"attention_bias": True}, None, "attention_bias=True is not supported (attention biases)"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, None,
     "mlp_only_layers=[1] is not supported (dense MLP layers among the mixture-of-experts layers)"),
    ("mixtral", {"router_jitter_noise": 0.1}, None, "router_jitter_noise=0.1 is not supported (router jitter noise)"),
    ("mixtral", {"sliding_window": 4096}, None, "sliding_window=4096 is not supported (sliding-window attention)"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, None, "rope_scaling.rope_type='yarn'"),
    ("qwen3", {}, "model.layers.0.self_attn.sinks", "weight 'model.layers.0.self_attn.sinks' is not part of a qwen3"),
    ("llama", {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "kv_lora_rank": 512}, None,
     "unsupported architecture 'deepseek_v3' (supported: llama, mistral, qwen2, qwen3, nemotron, mixtral, qwen3_moe, "
     "qwen2_moe, nemotron_h, nemotron-nas); "
     "it uses kv_lora_rank"),
])
def test_unsupported_features_are_one_line_errors(tiny_hf, tmp_path, capsys, kind, changes, extra, words):
    src = _hf_dir(tmp_path, tiny_hf, kind, changes, extra)
    out = tmp_path / "ckpt"
    code, stderr = cli_in_process(capsys, "convert", "--hf", src, "--out", out)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("nemo-minitron convert: error: ") and words in stderr, stderr
    assert not out.exists()


def test_distillation_pairs_networks_of_one_kind(tmp_path):
    """A teacher teaches a student of its own kind: Llama and Mistral (whose tables fix the
    same features) pair; Qwen3 (QK-norm) or Nemotron do not pair with Llama."""
    from nemo_minitron.distill.api import check_compatible
    from nemo_minitron.errors import UsageError
    from nemo_minitron.model.description import ModelDescription

    llama = ModelDescription(architecture="llama", vocab_size=1000, hidden_size=64, ffn_hidden_size=96, num_layers=4,
                             num_attention_heads=4, num_query_groups=2, head_dim=16)
    (tmp_path / "tokenizer").mkdir()  # an empty tokenizer directory on both sides: equal fingerprints
    same_tokenizer = str(tmp_path)
    check_compatible(llama, llama.replace(architecture="mistral", hidden_size=48), same_tokenizer, same_tokenizer)
    for other in (llama.replace(architecture="qwen3", qk_norm=True),
                  llama.replace(architecture="nemotron", activation="squared_relu", normalization="LayerNorm",
                                zero_centered_gamma=True)):
        words = f"--student \\({other.architecture}\\) is not of the --teacher model's family"
        with pytest.raises(UsageError, match=words):
            check_compatible(llama, other, same_tokenizer, same_tokenizer)


def test_family_from_features():
    """Sources that state features, not a family (Megatron-LM arguments), find the family."""
    from nemo_minitron.errors import UsageError
    from nemo_minitron.families import family_with

    assert family_with({}).model_type == "llama"
    assert family_with({"qkv_bias": True}).model_type == "qwen2"
    assert family_with({"qk_norm": True}).model_type == "qwen3"
    assert family_with({"activation": "squared_relu", "normalization": "LayerNorm",
                        "zero_centered_gamma": True}).model_type == "nemotron"
    with pytest.raises(UsageError, match="no supported model family has activation='squared_relu', "
                                         "normalization='RMSNorm'"):
        family_with({"activation": "squared_relu"})


def test_descriptions_round_trip_and_old_checkpoints_load():
    """Descriptions of the new families survive JSON; descriptions written before the family
    features existed (a null sliding_window key, no feature keys) read as Llama-like."""
    from nemo_minitron.checkpoint.hf_format import description_from_hf_config
    from nemo_minitron.errors import UsageError
    from nemo_minitron.model.description import ModelDescription

    nemotron = description_from_hf_config(json.loads((DATA / "nvidia__Nemotron-4-15B.json").read_text()))
    assert ModelDescription.from_dict(json.loads(nemotron.to_json())) == nemotron
    old = {"architecture": "mistral", "vocab_size": 1000, "hidden_size": 64, "ffn_hidden_size": 96, "num_layers": 2,
           "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 16, "qkv_bias": False,
           "sliding_window": None}
    assert ModelDescription.from_dict(old).gated and ModelDescription.from_dict(old).normalization == "RMSNorm"
    with pytest.raises(UsageError, match="sliding-window attention is not supported"):
        ModelDescription.from_dict({**old, "sliding_window": 4096})
    with pytest.raises(UsageError, match="a nemotron model has activation='squared_relu'"):
        nemotron.replace(activation="swiglu")
