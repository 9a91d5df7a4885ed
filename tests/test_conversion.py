"""Hugging Face <-> megatron-core conversion on tiny random models of every supported kind."""

from __future__ import annotations

import pytest
import torch

from tiny_models import TINY_CONFIGS, hf_logits
from tolerances import log_softmax_sum, transformer_logits


def widest(desc, seq_len: int = 48) -> int:
    """The longest accumulation of a forward pass: a matrix product's inner dimension (a
    mixture of experts adds its top-k experts' outputs: a few terms more, negligible); a
    Mamba mixer's out-projection sums its heads x head_dim channels and its scan, per
    output, the state (C . B) and then the ``seq_len`` positions."""
    return max(desc.hidden_size, desc.ffn_hidden_size, desc.moe_ffn_hidden_size, desc.moe_shared_ffn_hidden_size,
               desc.num_attention_heads * desc.head_dim, desc.mamba_num_heads * desc.mamba_head_dim,
               desc.mamba_state_dim + seq_len)


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
    desc = opened.description
    assert (ours - reference).abs().max().item() <= transformer_logits(widest(desc), desc.num_layers, reference)
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))

    out = export(str(tiny_checkpoint(kind)), str(tmp_path / "hf"))
    reloaded = load_hf_model(out)
    assert sum(p.numel() for p in reloaded.parameters()) == opened.description.num_parameters()
    assert sum(p.numel() for p in load_hf_model(hf_dir).parameters()) == opened.description.num_parameters()
    with torch.no_grad():
        again = reloaded(tokens).logits.float()
    # the same library on the exported copies of the same float32 weights: the same arithmetic
    assert torch.equal(again, reference)


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
    # megatron float32 logits against HF's (a forward pass's rounding, logits below 2), then a
    # log-softmax over the vocabulary
    tol = log_softmax_sum(1000, 2.0) + 2 * transformer_logits(96, 4, logits)
    assert abs(result.loss - expected.item()) <= tol


@pytest.mark.smollm2
def test_smollm2_export_reloads_in_transformers(smollm2, smollm2_hf):
    """The converted SmolLM2-135M exports (with --verify) to a directory transformers loads
    with no custom code, giving the GGUF model's logits and parameter count."""
    out, reloaded = smollm2_hf["dir"], smollm2_hf["model"]
    with torch.no_grad():
        logits = reloaded(smollm2["tokens"]).logits.float()
    # transformers on the exported weights against transformers on the GGUF's: float32 copies of
    # the same weights through the same library, up to reassembled fused tensors
    assert (logits - smollm2["logits"]).abs().max().item() <= transformer_logits(1536, 30, smollm2["logits"])
    assert sum(p.numel() for p in reloaded.parameters()) == 134_515_008
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def _without_tokenizer(hf_dir, directory):
    """A copy of a tiny HF directory as transformers' save_pretrained writes a model alone."""
    import shutil

    directory.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(hf_dir / name, directory)
    return directory


@pytest.mark.parametrize("kind", ["llama", "qwen3", "nemotron", "mixtral"])
def test_a_directory_without_a_tokenizer_is_refused_alike(kind, tiny_hf, tmp_path, capsys):
    """Every family the same way, before any work: transformers builds an empty tokenizer for
    some (Qwen) and fails on others (a slow tokenizer it cannot build)."""
    from conftest import cli_in_process

    src, out = _without_tokenizer(tiny_hf(kind), tmp_path / "model"), tmp_path / "ckpt"
    code, err = cli_in_process(capsys, "convert", "--hf", src, "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--hf '{src}' has no tokenizer files" in err and "tokenizer.model" in err
    assert not out.exists() and not list(tmp_path.glob(".ckpt.tmp-*"))


@pytest.mark.parametrize("kind", ["llama", "nemotron"])
def test_a_sentencepiece_tokenizer_converts(kind, tiny_hf, tmp_path):
    """A tokenizer.model alone (Llama-2, Mistral, Nemotron repositories) is read with
    sentencepiece and carried into the checkpoint, giving the sentencepiece model's ids."""
    import io

    import sentencepiece as spm

    from nemo_minitron.checkpoint.api import convert
    from nemo_minitron.checkpoint.store import load_tokenizer

    text = ["The quick brown fox jumps over the lazy dog.", "Pruning removes heads, neurons and layers.",
            "Distillation trains the student on the teacher's outputs."] * 10
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=60,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    src = _without_tokenizer(tiny_hf(kind), tmp_path / "model")
    (src / "tokenizer.model").write_bytes(model.getvalue())
    ckpt = convert(str(src), str(tmp_path / "ckpt"))
    reference = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokenizer = load_tokenizer(ckpt)
    sentence = "the lazy fox removes layers"
    assert tokenizer(sentence, add_special_tokens=False).input_ids == reference.encode(sentence)
    assert tokenizer.eos_token_id == reference.eos_id()
