"""Hugging Face <-> megatron-core conversion on tiny random models of every supported kind."""

from __future__ import annotations

import pytest
import torch

from tiny_models import TINY_CONFIGS, hf_logits


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_convert_load_export_roundtrip(kind, tiny_hf, tiny_checkpoint, tmp_path):
    """Converted logits equal HF's; the exported model reloads in transformers with the
    same logits and the same parameter count as the description predicts."""
    from nemo_minitron.checkpoint.api import export, open_model
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.model.forward import full_logits

    hf_dir = tiny_hf(kind)
    tokens = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(1))
    reference = hf_logits(hf_dir, tokens)

    opened = open_model(str(tiny_checkpoint(kind)))
    ours = full_logits(opened.model, tokens, opened.description.vocab_size)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() < 1e-4
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))

    out = export(str(tiny_checkpoint(kind)), str(tmp_path / "hf"))
    reloaded = load_hf_model(out)
    assert sum(p.numel() for p in reloaded.parameters()) == opened.description.num_parameters()
    assert sum(p.numel() for p in load_hf_model(hf_dir).parameters()) == opened.description.num_parameters()
    with torch.no_grad():
        again = reloaded(tokens).logits.float()
    assert (again - reference).abs().max().item() < 1e-5


def test_vocab_padding_is_masked(tiny_hf, tiny_checkpoint):
    """The tiny vocabulary (1000) is padded to 1024; the padded logits never reach a softmax:
    the evaluated loss equals HF's cross-entropy over the true vocabulary."""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.evaluate import evaluate

    opened = open_model(str(tiny_checkpoint("llama")))
    desc = opened.description
    assert desc.padded_vocab_size == 1024 and desc.vocab_size == 1000
    samples = torch.randint(0, 1000, (3, 17), generator=torch.Generator().manual_seed(2))
    result = evaluate(opened.model, desc.vocab_size, samples, micro_batch=2)
    logits = hf_logits(tiny_hf("llama"), samples[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 1000), samples[:, 1:].reshape(-1))
    assert result.tokens == 3 * 16
    assert abs(result.loss - expected.item()) < 1e-5


@pytest.mark.smollm2
def test_smollm2_export_reloads_in_transformers(smollm2, tmp_path):
    """The converted SmolLM2-135M exports to a directory transformers loads with no custom
    code, giving the GGUF model's logits and parameter count."""
    from nemo_minitron.checkpoint.api import export
    from nemo_minitron.checkpoint.verify import load_hf_model

    out = export(str(smollm2["checkpoint"]), str(tmp_path / "hf"), verify=True)
    reloaded = load_hf_model(out)
    with torch.no_grad():
        logits = reloaded(smollm2["tokens"]).logits.float()
    assert (logits - smollm2["logits"]).abs().max().item() <= 1e-4
    assert sum(p.numel() for p in reloaded.parameters()) == 134_515_008
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
