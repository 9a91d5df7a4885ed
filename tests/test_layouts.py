"""Checkpoints and logits across tensor and pipeline parallel layouts (2-3 CPU processes, gloo),
and SmolLM2-135M's logits against Hugging Face's."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_workers
from tiny_models import hf_logits
from tolerances import transformer_logits


def _logits_at(tmp_path, tag: str, tokens: torch.Tensor, steps: list[dict], nproc: int = 2) -> list[torch.Tensor]:
    """Logits of each step of one worker run (``checkpoint_layouts.py``): a step converts
    (``convert_from``, ``save``) or loads (``checkpoint``) at its ``tp`` and ``pp``."""
    out = tmp_path / tag
    spec = {"tokens": str(tmp_path / f"{tag}-tokens.pt"),
            "steps": [{**step, "logits": str(out / f"{i}.pt")} for i, step in enumerate(steps)]}
    torch.save(tokens, spec["tokens"])
    (tmp_path / f"{tag}.json").write_text(json.dumps(spec, default=str))
    run_workers("checkpoint_layouts.py", tmp_path / f"{tag}.json", out=out, nproc=nproc)
    return [torch.load(out / f"{i}.pt") for i in range(len(steps))]


@pytest.mark.multirank
def test_saved_at_tp2_loads_at_tp1_and_pp2(tiny_hf, tmp_path, runtime):
    """Convert at TP=2 (logits equal HF), then load the TP=2 checkpoint at TP=1 and at PP=2."""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.model.forward import full_logits

    hf_dir = tiny_hf("llama_pruned_shape")  # head_dim != hidden/heads, 2 groups, 5 layers (uneven PP split)
    tokens = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(3))
    reference = hf_logits(hf_dir, tokens)
    ckpt = tmp_path / "layouts" / "saved_at_tp2"  # in the workers' output directory
    at_tp2, at_pp2 = _logits_at(tmp_path, "layouts", tokens, [
        {"tp": 2, "pp": 1, "convert_from": hf_dir, "save": ckpt}, {"tp": 1, "pp": 2, "checkpoint": ckpt}])
    opened = open_model(str(ckpt))
    at_tp1 = full_logits(opened.model, tokens, opened.description.vocab_size)

    # float32 forward passes of one model in another library or another split of the row-parallel
    # sums (widest inner dimension 80, 5 layers)
    tol = transformer_logits(80, 5, reference)
    assert (at_tp2 - reference).abs().max().item() <= tol
    for other in (at_tp2, at_pp2):
        assert (other - at_tp1).abs().max().item() <= tol
        assert torch.equal(other.argmax(-1), at_tp1.argmax(-1))


def _assert_smollm2_logits(logits: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    assert logits.shape == reference.shape, what
    # megatron against transformers, float32, ffn 1536 wide, 30 layers
    assert (logits - reference).abs().max().item() <= transformer_logits(1536, 30, reference), what
    assert torch.equal(logits.argmax(-1), reference.argmax(-1)), what


@pytest.mark.smollm2
def test_smollm2_logits_equal_huggingface(smollm2, runtime):
    """SmolLM2-135M from the GGUF: megatron-core logits equal HF's (TP=1)."""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.model.forward import full_logits

    opened = open_model(str(smollm2["checkpoint"]))
    logits = full_logits(opened.model, smollm2["tokens"], opened.description.vocab_size)
    _assert_smollm2_logits(logits, smollm2["logits"], "tp1")


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.smollm2
def test_smollm2_logits_equal_huggingface_at_pp2_and_tp3(smollm2, tmp_path):
    """The same at PP=2 and TP=3. TP=2 is impossible for this model in megatron-core (3
    query groups, 9 heads); TP=3 is the tensor-parallel check on the unmodified model, and
    the next test runs TP=2 on SmolLM2 pruned to 2 query groups."""
    tokens = smollm2["tokens"]
    [pp2] = _logits_at(tmp_path, "pp2", tokens, [{"tp": 1, "pp": 2, "checkpoint": smollm2["checkpoint"]}])
    [tp3] = _logits_at(tmp_path, "tp3", tokens, [{"tp": 3, "pp": 1, "checkpoint": smollm2["checkpoint"]}], nproc=3)
    _assert_smollm2_logits(pp2, smollm2["logits"], "pp2")
    _assert_smollm2_logits(tp3, smollm2["logits"], "tp3")


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.smollm2
def test_smollm2_pruned_to_two_groups_at_tp2_equals_huggingface(smollm2, smollm2_importance, tmp_path):
    """SmolLM2 with 2 of its 3 query groups (6 heads) runs at TP=2: megatron-core logits
    there equal those of its Hugging Face export."""
    from nemo_minitron.checkpoint.api import export
    from nemo_minitron.prune.api import prune

    pruned = prune(str(smollm2["checkpoint"]), str(smollm2_importance[0]), str(tmp_path / "pruned"),
                   target={"query_groups": 2})
    from nemo_minitron.checkpoint.store import read_info

    desc = read_info(pruned).description
    assert (desc.num_query_groups, desc.num_attention_heads) == (2, 6)
    hf_dir = export(str(pruned), str(tmp_path / "hf"))
    tokens = smollm2["tokens"]
    reference = hf_logits(hf_dir, tokens)
    [at_tp2] = _logits_at(tmp_path, "tp2", tokens, [{"tp": 2, "pp": 1, "checkpoint": pruned}])
    assert at_tp2.shape == reference.shape
    print(f"pruned SmolLM2 at TP=2 vs HF: max abs diff {(at_tp2 - reference).abs().max().item():.2e}")
    assert (at_tp2 - reference).abs().max().item() <= transformer_logits(1536, 30, reference)
    assert torch.equal(at_tp2.argmax(-1), reference.argmax(-1))
