"""Pruning transforms on tiny models, the planner's counts, layouts, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli, run_workers

DATA = Path(__file__).parent / "data" / "hf_configs"


@pytest.fixture(scope="module")
def scored(tiny_checkpoint, tmp_path_factory):
    """Factory: kind -> (checkpoint, importance directory with contiguous blocks of 1 and 2)."""
    from nemo_minitron.importance.api import compute_importance

    made = {}

    def get(kind="llama"):
        if kind not in made:
            out = tmp_path_factory.mktemp("imp") / kind
            ckpt = tiny_checkpoint(kind)
            compute_importance(str(ckpt), ["builtin:calib"], str(out), samples=8, seq_len=32, layer_samples=4,
                               drop_blocks=[1, 2], progress=False)
            made[kind] = (ckpt, out)
        return made[kind]

    return get


def _state(checkpoint):
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.model.params import named_weights

    opened = open_model(str(checkpoint))
    return opened, {k: v.detach().clone() for k, v in named_weights(opened.model)}


def test_prune_to_original_sizes_is_bit_identical(scored, tmp_path):
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.prune.api import prune

    ckpt, imp = scored("llama")
    original, before = _state(ckpt)
    d = original.description
    out = prune(str(ckpt), str(imp), str(tmp_path / "same"), target={
        "hidden": d.hidden_size, "ffn": d.ffn_hidden_size, "heads": d.num_attention_heads,
        "query_groups": d.num_query_groups, "layers": d.num_layers}, progress=False)
    pruned, after = _state(out)
    tokens = torch.randint(0, d.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(full_logits(original.model, tokens, d.vocab_size), full_logits(pruned.model, tokens, d.vocab_size))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind, target", [
    ("llama", {"hidden": 40}),
    ("llama", {"ffn": 48}),
    ("llama", {"heads": 2}),                       # one head per group
    ("llama", {"query_groups": 1}),                # a whole K/V group with its heads
    ("llama", {"layers": 3}),
    ("llama_tied", {"hidden": 48, "ffn": 64, "heads": 2, "query_groups": 2, "layers": 2}),
    ("qwen2", {"hidden": 56, "query_groups": 1, "layers": 2}),   # q/k/v biases, tied
    ("llama_pruned_shape", {"hidden": 40, "heads": 2, "layers": 4}),
])
def test_pruned_counts_and_kept_weights(scored, tmp_path, kind, target):
    """Parameter count: description == megatron model == exported HF model; kept weights
    are the original ones at the kept indices."""
    from nemo_minitron.checkpoint.api import export
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.prune.api import prune

    ckpt, imp = scored(kind)
    original, before = _state(ckpt)
    out = prune(str(ckpt), str(imp), str(tmp_path / "pruned"), target=target, layer_metric="contiguous",
                progress=False)
    pruned, after = _state(out)
    new = pruned.description
    counted = sum(v.numel() for k, v in after.items() if "word_embeddings" not in k and "output_layer" not in k)
    counted += new.vocab_size * new.hidden_size * (1 if new.tie_embeddings else 2)
    assert counted == new.num_parameters()
    hf = load_hf_model(export(str(out), str(tmp_path / "hf")))
    assert sum(p.numel() for p in hf.parameters()) == new.num_parameters()

    kept = read_info(out).provenance["kept"]
    h = torch.tensor(kept["hidden"])
    assert torch.equal(after["decoder.final_layernorm.weight"], before["decoder.final_layernorm.weight"][h])
    assert torch.equal(after["embedding.word_embeddings.weight"], before["embedding.word_embeddings.weight"][:, h])
    for new_i, old_i in enumerate(kept["layers"]):
        ffn = torch.tensor(kept["ffn"][str(old_i)])
        fc2_old = before[f"decoder.layers.{old_i}.mlp.linear_fc2.weight"]
        assert torch.equal(after[f"decoder.layers.{new_i}.mlp.linear_fc2.weight"], fc2_old[h][:, ffn])
        norm_old = before[f"decoder.layers.{old_i}.pre_mlp_layernorm.weight"]
        assert torch.equal(after[f"decoder.layers.{new_i}.pre_mlp_layernorm.weight"], norm_old[h])
    tokens = torch.randint(0, new.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = full_logits(pruned.model, tokens, new.vocab_size)
        theirs = hf(tokens).logits.float()
    assert torch.isfinite(ours).all() and (ours - theirs).abs().max() < 1e-4


def test_heads_are_pruned_inside_groups(scored, tmp_path):
    """The kept heads are each group's best; every kept group keeps the same number."""
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.prune.api import prune

    ckpt, imp = scored("llama")
    scores = ImportanceScores.load(imp)
    out = prune(str(ckpt), str(imp), str(tmp_path / "p"), target={"heads": 2}, progress=False)
    kept = read_info(out).provenance["kept"]
    for layer in range(4):
        heads = kept["heads"][str(layer)]
        assert len(heads) == 2 and {h // 2 for h in heads} == {0, 1}
        per_group = scores["heads"][layer].reshape(2, 2)
        assert heads == [g * 2 + int(per_group[g].argmax()) for g in range(2)]


@pytest.mark.multirank
def test_prune_at_tp2_and_pp2_equals_tp1(scored, tmp_path):
    """Width, whole query groups and depth, pruned on models loaded at TP=2 and at PP=2."""
    from nemo_minitron.prune.api import prune

    ckpt, imp = scored("llama_tied")  # 4 heads in 4 groups: 2 groups survive, divisible by TP=2
    target = "hidden=48,ffn=64,query_groups=2,layers=3"
    reference = prune(str(ckpt), str(imp), str(tmp_path / "tp1"), progress=False,
                      target={k: int(v) for k, v in (kv.split("=") for kv in target.split(","))})
    _, expected = _state(reference)
    for name, flags in (("tp2", ["--tp", "2"]), ("pp2", ["--pp", "2"])):
        out = tmp_path / name
        run_workers("prune_layouts.py", ckpt, imp, out, target, *flags)
        _, got = _state(out)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), name


def test_planner_reproduces_published_shapes():
    from nemo_minitron.model.description import description_from_hf_config
    from nemo_minitron.prune.plan import plan
    from nemo_minitron.prune.targets import apply_target

    llama = description_from_hf_config(json.loads((DATA / "meta-llama__Llama-3.1-8B.json").read_text()))
    width = apply_target(llama, {"hidden": 3072, "ffn": 9216})
    depth = apply_target(llama, {"layers": 16})
    assert round(width.num_parameters() / 1e9, 1) == 4.5 and round(depth.num_parameters() / 1e9, 1) == 4.5
    candidates = plan(llama, int(4.5e9))
    assert all(abs(c.params / 4.5e9 - 1) <= 0.05 for c in candidates)
    assert candidates[0].description.num_layers == 32  # width first
    assert any(c.target() == {"hidden": 3072, "ffn": 9216, "heads": 32, "query_groups": 8, "layers": 32}
               for c in candidates)
    assert plan(llama, int(4.5e9), prefer="depth")[0].target() == {
        "hidden": 4096, "ffn": 14336, "heads": 32, "query_groups": 8, "layers": 16}
    nemo = description_from_hf_config(json.loads((DATA / "mistralai__Mistral-Nemo-Base-2407.json").read_text()))
    assert round(apply_target(nemo, {"hidden": 4096, "ffn": 11520}).num_parameters() / 1e9, 1) == 8.4
    for c in plan(llama, int(4.5e9), tp=8)[:50]:
        d = c.description
        assert d.num_query_groups % 8 == 0 and d.ffn_hidden_size % 8 == 0 and d.num_attention_heads % 8 == 0


def test_plan_command_on_a_config_json(tmp_path):
    proc = run_cli("plan", DATA / "meta-llama__Llama-3.1-8B.json", "--target-params", "4.5B",
                   "--json", tmp_path / "plan.json")
    assert proc.returncode == 0, proc.stderr
    assert "GFLOPs/token" in proc.stdout and "KV bytes/token" in proc.stdout
    rows = json.loads((tmp_path / "plan.json").read_text())
    assert rows and all(abs(r["params"] / 4.5e9 - 1) <= 0.05 for r in rows)


@pytest.mark.parametrize("flags, words", [
    (["--target", "hidden=100"], ["hidden=100 is larger than the original model's 64"]),
    (["--target", "heads=3"], ["heads=3 is not a multiple of query_groups=2"]),
    (["--target", "ffn=95", "--tp", "2"], ["ffn=95 is not divisible by --tp 2"]),
    (["--target-params", "10K"], ["no architecture within 5%"]),
    (["--target", "layers=2", "--layer-metric", "contiguous"], ["no best contiguous block of 2"]),
    (["--target", "hidden=32", "--order", "largest"], ["--order must be one of importance, magnitude, random"]),
])
def test_bad_targets_are_rejected_before_loading(scored, tmp_path, flags, words):
    ckpt, imp = scored("llama")
    out = tmp_path / "out"
    # an importance run without a 2-layer block, for the contiguous case
    proc = run_cli("prune", ckpt, "--importance", imp if "contiguous" not in flags else _no_blocks(imp, tmp_path),
                   "--out", out, *flags)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr
    assert not out.exists()


def _no_blocks(imp: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "imp_no_blocks"
    shutil.copytree(imp, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["layers"]["contiguous_blocks"] = {}
    (copy / "summary.json").write_text(json.dumps(summary))
    return copy


def test_scores_from_another_model_are_rejected(scored, tmp_path):
    ckpt, _ = scored("llama")
    _, other = scored("mistral")
    out = tmp_path / "out"
    proc = run_cli("prune", ckpt, "--importance", other, "--out", out, "--target", "hidden=32")
    assert proc.returncode == 2 and "computed on another model" in proc.stderr and not out.exists()
