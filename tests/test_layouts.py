"""Checkpoints and logits across tensor and pipeline parallel layouts (2-3 CPU processes, gloo)."""

from __future__ import annotations

import pytest
import torch

from conftest import run_workers
from tiny_models import hf_logits
from tolerances import transformer_logits

pytestmark = pytest.mark.multirank


def _logits_at(tmp_path, tag: str, tokens: torch.Tensor, *args: str, nproc: int = 2) -> torch.Tensor:
    tokens_file, logits_file = tmp_path / f"{tag}-tokens.pt", tmp_path / f"{tag}-logits.pt"
    torch.save(tokens, tokens_file)
    run_workers("checkpoint_layouts.py", "--tokens", tokens_file, "--logits", logits_file, *args, nproc=nproc)
    return torch.load(logits_file)


def test_saved_at_tp2_loads_at_tp1_and_pp2(tiny_hf, tmp_path, runtime):
    """Convert at TP=2 (logits equal HF), then load the TP=2 checkpoint at TP=1 and at PP=2."""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.model.forward import full_logits

    hf_dir = tiny_hf("llama_pruned_shape")  # head_dim != hidden/heads, 2 groups, 5 layers (uneven PP split)
    tokens = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(3))
    reference = hf_logits(hf_dir, tokens)
    ckpt = tmp_path / "saved_at_tp2"
    at_tp2 = _logits_at(tmp_path, "tp2", tokens, "--tp", "2", "--convert-from", hf_dir, "--save", ckpt)
    at_pp2 = _logits_at(tmp_path, "pp2", tokens, "--pp", "2", "--checkpoint", ckpt)
    opened = open_model(str(ckpt))
    at_tp1 = full_logits(opened.model, tokens, opened.description.vocab_size)

    # float32 forward passes of one model in another library or another split of the row-parallel
    # sums (widest inner dimension 80, 5 layers)
    tol = transformer_logits(80, 5, reference)
    assert (at_tp2 - reference).abs().max().item() <= tol
    for other in (at_tp2, at_pp2):
        assert (other - at_tp1).abs().max().item() <= tol
        assert torch.equal(other.argmax(-1), at_tp1.argmax(-1))


@pytest.mark.smollm2
def test_smollm2_logits_equal_huggingface(smollm2, tmp_path):
    """SmolLM2-135M from the GGUF: megatron-core logits equal HF's at TP=1, PP=2 and TP=3.

    TP=2 is impossible for this model in megatron-core (3 query groups, 9 heads); TP=3 is
    the tensor-parallel check on the unmodified model, and the next test runs TP=2 on
    SmolLM2 pruned to 2 query groups."""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.model.forward import full_logits

    tokens, reference = smollm2["tokens"], smollm2["logits"]
    opened = open_model(str(smollm2["checkpoint"]))
    results = {"tp1": full_logits(opened.model, tokens, opened.description.vocab_size)}
    results["pp2"] = _logits_at(tmp_path, "pp2", tokens, "--pp", "2", "--checkpoint", smollm2["checkpoint"])
    results["tp3"] = _logits_at(tmp_path, "tp3", tokens, "--tp", "3", "--checkpoint", smollm2["checkpoint"], nproc=3)
    for name, logits in results.items():
        assert logits.shape == reference.shape, name
        # megatron against transformers, float32, ffn 1536 wide, 30 layers
        assert (logits - reference).abs().max().item() <= transformer_logits(1536, 30, reference), name
        assert torch.equal(logits.argmax(-1), reference.argmax(-1)), name


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
    at_tp2 = _logits_at(tmp_path, "tp2", tokens, "--tp", "2", "--checkpoint", pruned)
    assert at_tp2.shape == reference.shape
    print(f"pruned SmolLM2 at TP=2 vs HF: max abs diff {(at_tp2 - reference).abs().max().item():.2e}")
    assert (at_tp2 - reference).abs().max().item() <= transformer_logits(1536, 30, reference)
    assert torch.equal(at_tp2.argmax(-1), reference.argmax(-1))
