"""Generation on megatron-core's inference engine: equal to transformers' greedy decoding,
seeded sampling, stop strings, resumable output, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli_in_process
from tiny_models import hf_greedy


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PROMPTS = ["The quick brown fox", "a", "Return the number of items in the", "x = 1 + 2",
           "Parse the source into an AST node and return it.", "hello"]


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_generation_equals_transformers(tiny_hf, runtime, one_thread, tmp_path, capsys):
    """``nemo-minitron generate`` (batches of 4 prompts of mixed lengths, KV cache) gives
    transformers' greedy tokens, prompt by prompt; the records hold what they say."""
    from nemo_minitron.checkpoint.verify import load_hf_model
    from tiny_models import byte_tokenizer

    hf_dir = tiny_hf("llama")
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "out.jsonl"
    code, err = cli_in_process(capsys, "generate", hf_dir, "--prompts", prompts, "--out", out,
                               "--max-new-tokens", 12, "--batch-size", 4)
    assert code == 0, err
    records = _records(out)
    tok = byte_tokenizer()
    tokens = [tok(p)["input_ids"] for p in PROMPTS]
    expected = hf_greedy(load_hf_model(hf_dir), tokens, 12, eos_token_id=2)
    assert [r["index"] for r in records] == list(range(len(PROMPTS)))
    for r, p, t, e in zip(records, PROMPTS, tokens, expected):
        assert r["completion_ids"] == e, r["prompt"]
        assert (r["prompt"], r["prompt_tokens"], r["completion_tokens"]) == (p, len(t), len(e))
        assert r["completion"] == tok.decode(e, skip_special_tokens=True)
        assert r["finish_reason"] == ("length" if len(e) == 12 else "eos")
    assert not list(tmp_path.glob("out.jsonl.partial*"))


def test_sampling_is_seeded_and_never_picks_vocabulary_padding(tiny_checkpoint, runtime, one_thread):
    """Sampling at a high temperature reaches every real token, never one of the 24 padding
    columns (1000 -> 1024), and the same seed gives the same tokens."""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.generate.engine import SamplingConfig, TextGenerator

    opened = open_model(str(tiny_checkpoint("llama")))
    gen = TextGenerator(opened.model, opened.description, opened.tokenizer)
    prompts = [[5 + i, 17, 300 + i] for i in range(16)]
    hot = SamplingConfig(max_new_tokens=24, temperature=4.0, ignore_eos=True)
    first = [g.tokens for g in gen.generate(prompts, hot, seed=3)]
    assert first == [g.tokens for g in gen.generate(prompts, hot, seed=3)]
    assert first != [g.tokens for g in gen.generate(prompts, hot, seed=4)]
    ids = torch.tensor(first)
    assert ids.shape == (16, 24)
    # 384 draws from a nearly flat distribution over 1024 columns would hit the 24 padding
    # columns about 9 times; masked, never.
    assert int(ids.max()) < opened.description.vocab_size
    assert len(set(ids.flatten().tolist())) > 250
    top_k = [g.tokens for g in gen.generate(prompts, SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=1),
                                            seed=5)]
    greedy = [g.tokens for g in gen.generate(prompts, SamplingConfig(max_new_tokens=8), seed=9)]
    assert top_k == greedy


def test_stop_strings_end_generation(tiny_checkpoint, runtime, one_thread):
    """A stop string ends a prompt's generation where it appears, and is cut from the text."""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.generate.engine import SamplingConfig, TextGenerator

    opened = open_model(str(tiny_checkpoint("llama_tied")))
    gen = TextGenerator(opened.model, opened.description, opened.tokenizer)
    tok = opened.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    free = gen.generate(prompts, SamplingConfig(max_new_tokens=40, ignore_eos=True))
    texts = [tok.decode(g.tokens) for g in free]
    text = max(texts, key=len)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stopped = gen.generate(prompts, SamplingConfig(max_new_tokens=40, ignore_eos=True, stop=(stop,)))
    for full, g, s in zip(free, stopped, texts):
        if stop in s:
            assert g.finish_reason == "stop" and g.text == s[:s.index(stop)]
            n = next(k for k in range(1, 41) if stop in tok.decode(full.tokens[:k]))
            assert g.tokens == full.tokens[:n]  # stopped at the token that completed the stop string
        else:
            assert g.tokens == full.tokens and g.finish_reason == "length"
    assert any(g.finish_reason == "stop" for g in stopped)


def test_killed_generation_resumes_without_losing_or_repeating_records(tiny_hf, runtime, one_thread, tmp_path,
                                                                      monkeypatch):
    """A run that dies after two batches, leaving a record of the third batch and half a line,
    continues from the last whole batch; the file equals an uninterrupted run's."""
    from nemo_minitron.generate import api

    hf_dir = tiny_hf("llama")
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{p} {i}"} for i, p in enumerate(PROMPTS * 2)])
    kwargs = dict(prompts=str(prompts), max_new_tokens=6, temperature=0.8, top_p=0.9, batch_size=3, seed=11,
                  progress=False)
    reference = api.generate(str(hf_dir), str(tmp_path / "ref.jsonl"), **kwargs)

    out = tmp_path / "out.jsonl"
    calls = {"n": 0}
    append = api.ResumableJsonl.append

    def dying_append(self, records):
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process dies before the third batch is written
        calls["n"] += 1
        append(self, records)

    monkeypatch.setattr(api.ResumableJsonl, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        api.generate(str(hf_dir), str(out), **kwargs)
    monkeypatch.setattr(api.ResumableJsonl, "append", append)
    partial = tmp_path / "out.jsonl.partial"
    ref_lines = reference.read_text().splitlines(keepends=True)
    assert partial.read_text() == "".join(ref_lines[:6]) and not out.exists()
    partial_settings = (tmp_path / "out.jsonl.partial.json").read_text()
    with open(partial, "a") as f:  # a killed writer can leave part of the next batch behind
        f.write(ref_lines[6] + ref_lines[7][:20])

    api.generate(str(hf_dir), str(out), **kwargs)
    assert out.read_text() == reference.read_text()
    assert [r["index"] for r in _records(out)] == list(range(12))
    assert not partial.exists() and not (tmp_path / "out.jsonl.partial.json").exists()
    # a leftover from other settings is not continued
    from nemo_minitron.errors import UsageError

    (tmp_path / "other.jsonl.partial").write_text(ref_lines[0])
    (tmp_path / "other.jsonl.partial.json").write_text(partial_settings)
    with pytest.raises(UsageError, match="other settings"):
        api.generate(str(hf_dir), str(tmp_path / "other.jsonl"), **dict(kwargs, seed=12))


def _error(capsys, *args):
    code, err = cli_in_process(capsys, "generate", *args)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("nemo-minitron generate: error: "), err
    return lines[0]


def test_bad_generation_input_is_one_line(tiny_hf, tmp_path, capsys):
    hf_dir, out = tiny_hf("llama"), tmp_path / "out.jsonl"
    missing = _write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "ok"}, {"text": "no prompt here"}])
    line = _error(capsys, hf_dir, "--prompts", missing, "--out", out)
    assert "line 2" in line and "'prompt'" in line and "'messages'" in line
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert "chat template" in _error(capsys, hf_dir, "--prompts", chat, "--out", out)
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    line = _error(capsys, hf_dir, "--prompts", prompts, "--out", out, "--max-new-tokens", 5000)
    assert "--max-new-tokens 5000" in line and "context of 2048" in line
    line = _error(capsys, hf_dir, "--prompts", prompts, "--out", out, "--max-new-tokens", 2045)
    assert "line 1 has 5 tokens" in line
    assert "--top-k and --top-p" in _error(capsys, hf_dir, "--prompts", prompts, "--out", out,
                                           "--temperature", 1, "--top-k", 5, "--top-p", 0.9)
    assert "--prefix-tokens" in _error(capsys, hf_dir, "--data", "builtin:heldout", "--out", out)
    assert not out.exists() and not list(tmp_path.glob("out.jsonl.partial*"))


@pytest.mark.smollm2
def test_smollm2_greedy_generation_equals_transformers(smollm2, smollm2_hf, runtime):
    """SmolLM2-135M: prompts of 6 to 27 tokens cut from held-out text, 16 new tokens, one
    batch: megatron-core's KV-cached generation gives transformers' tokens on the export."""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.generate.engine import SamplingConfig, TextGenerator
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.generate.prompts import data_prefixes

    opened = open_model(str(smollm2["checkpoint"]))
    corpus = check_corpus(["builtin:heldout"], vocab_size=opened.description.vocab_size, tokenizer=opened.tokenizer)
    prefixes = data_prefixes(corpus, opened.tokenizer, 28, seed=1234, limit=8)
    prompts = [p.tokens[:6 + 3 * i] for i, p in enumerate(prefixes)]
    got = TextGenerator(opened.model, opened.description, opened.tokenizer).generate(
        prompts, SamplingConfig(max_new_tokens=16))
    expected = hf_greedy(smollm2_hf["model"], prompts, 16, opened.description.eos_token_id)
    assert [g.tokens for g in got] == expected


@pytest.mark.smollm2
def test_chat_messages_use_the_tokenizer_chat_template(smollm2, tmp_path):
    """SmolLM2's tokenizer has a ChatML template: a `messages` prompt becomes the turns with
    their role markers and ends with the assistant's generation prompt, tokenised without
    adding special tokens a second time."""
    from nemo_minitron.checkpoint.store import load_tokenizer
    from nemo_minitron.generate.prompts import read_prompt_file

    tok = load_tokenizer(smollm2["checkpoint"])
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": "Be brief."},
                                                                {"role": "user", "content": "Name a prime."}]},
                                                  {"prompt": "plain text"}])
    chat, plain = read_prompt_file(str(path), tok)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in chat.text
    assert chat.text.endswith("<|im_start|>user\nName a prime.<|im_end|>\n<|im_start|>assistant\n")
    assert chat.tokens == tok(chat.text, add_special_tokens=False)["input_ids"]
    assert chat.tokens.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert chat.messages[1]["content"] == "Name a prime." and plain.messages is None
