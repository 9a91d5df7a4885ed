"""The data layer: blends of Megatron indexed data sets and text, read through megatron-core;
``preprocess``; bad data input."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from conftest import cli_in_process, run_cli
from nemo_minitron.data.builtin import SPLITS, builtin_documents
from nemo_minitron.data.dataset import check_corpus, data_parallel_bounds
from nemo_minitron.errors import UsageError
from tiny_models import tiny_tokenizer


def test_builtin_splits_are_disjoint_english_and_stable():
    docs = {s: builtin_documents(s) for s in SPLITS}
    assert all(len(d) > 50 for d in docs.values())
    assert len(docs["train"]) > 4 * len(docs["heldout"])
    assert not (set(docs["train"]) & set(docs["heldout"])) and not (set(docs["calib"]) & set(docs["heldout"]))
    assert all(sum(c.isascii() for c in d) >= 0.97 * len(d) for d in docs["heldout"])
    assert builtin_documents("heldout") == docs["heldout"]  # second read comes from the cache


def test_builtin_docs_is_other_text_than_the_docstring_splits():
    """builtin:docs (the reference manual's prose) shares no document with the docstring
    splits, and almost none of its 12-word runs: only stock phrases and quoted code recur."""
    import re

    manual = builtin_documents("docs")
    docstrings = [d for s in ("calib", "train", "heldout") for d in builtin_documents(s)]
    assert not set(manual) & set(docstrings)
    assert sum(map(len, manual)) > 300_000 and all(sum(c.isascii() for c in d) >= 0.97 * len(d) for d in manual)

    def runs(text):
        words = re.findall(r"\w+", text.lower())
        return [tuple(words[i:i + 12]) for i in range(len(words) - 11)]

    seen = {r for d in docstrings for r in runs(d)}
    manual_runs = [r for d in manual for r in runs(d)]
    assert sum(r in seen for r in manual_runs) < 0.03 * len(manual_runs)


# ---------------------------------------------------------------------- helpers
def _write_sources(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text(" ".join(f"w{i}" for i in range(300)))
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": " ".join(f"w{i}" for i in range(j, j + 50))}) for j in range(5)))
    return text, jsonl


def _indexed(prefix, docs, dtype=np.uint16):
    """A Megatron data set written with megatron-core's own builder (one sequence per document)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for d in docs:
        builder.add_document(torch.tensor(d), [len(d)])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def _read_indexed(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix), multimodal=False, mmap=True)
    return [np.asarray(ds[i]).tolist() for i in range(len(ds))]


def _assert_windows_of(samples: torch.Tensor, docs: list[list[int]], eos: int):
    """Each sample is a run of the corpus: the end of one document, whole documents, the
    start of another (documents end with ``eos``), however they were shuffled."""
    docs = [tuple(d) for d in docs]

    def ends_a_doc(p):
        return any(d[len(d) - len(p):] == p for d in docs if len(d) >= len(p))

    def starts_a_doc(p):
        return any(d[:len(p)] == p for d in docs)

    def inside_a_doc(p):
        return any(d[i:i + len(p)] == p for d in docs for i in range(len(d) - len(p) + 1))

    for row in samples.tolist():
        cuts = [i + 1 for i, t in enumerate(row) if t == eos]
        if not cuts:
            assert inside_a_doc(tuple(row)), row
            continue
        pieces = [tuple(row[a:b]) for a, b in zip([0] + cuts, cuts + [len(row)])]
        assert ends_a_doc(pieces[0]), row
        assert all(p in docs for p in pieces[1:-1]), row
        assert starts_a_doc(pieces[-1]), row


# ---------------------------------------------------------------------- text sources
def test_text_sources_are_tokenised_once_into_megatron_data_sets(runtime, tmp_path):
    text, jsonl = _write_sources(tmp_path)
    tok = tiny_tokenizer()
    cache = tmp_path / "cache"
    corpus = check_corpus([str(text), str(jsonl)], vocab_size=1000, tokenizer=tok, cache_dir=str(cache))
    one_pass = corpus.dataset(tok, seq_len=15, seed=5)

    # the cache holds Megatron data sets: each document's ids, then end-of-sequence
    expected = [tok(text.read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    expected += [tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                 for line in jsonl.read_text().splitlines()]
    prefixes = sorted(str(p.with_suffix("")) for p in (cache / "tokens").glob("*/data.idx"))
    stored = [d for p in prefixes for d in _read_indexed(p)]
    assert len(prefixes) == 2 and sorted(stored) == sorted(expected)
    assert all(open(p + ".idx", "rb").read(18)[17] == 8 for p in prefixes)  # dtype code 8: uint16 below 65,500 ids

    # one pass: every source cut into windows of 16 tokens overlapping by one, the last partial one dropped
    tokens = [301, 5 * 51]
    assert len(one_pass) == sum((t - 1) // 15 for t in tokens)
    samples = one_pass.take()
    assert samples.shape == (len(one_pass), 16)
    _assert_windows_of(samples, expected, tok.eos_token_id)

    # the same data and seed: the same samples, from the cache (nothing tokenised again);
    # another seed: another order
    again = check_corpus([str(text), str(jsonl)], vocab_size=1000, tokenizer=tok, cache_dir=str(cache))
    mtimes = [p.stat().st_mtime_ns for p in (cache / "tokens").glob("*/data.bin")]
    assert torch.equal(again.dataset(tok, seq_len=15, seed=5).take(), samples)
    assert [p.stat().st_mtime_ns for p in (cache / "tokens").glob("*/data.bin")] == mtimes
    assert not torch.equal(again.dataset(tok, seq_len=15, seed=6).take(), samples)

    folder = tmp_path / "corpus"
    folder.mkdir()
    _write_sources(folder)
    from_folder = check_corpus([str(folder)], tokenizer=tok, cache_dir=str(cache)).dataset(tok, seq_len=15, seed=5)
    assert len(from_folder) == (sum(tokens) - 1) // 15  # one source: both files' documents together


def _paragraph_file(path):
    """Ten paragraphs, paragraph k written with the letter 'abcdefghij'[k] only; the third
    has two lines; blank, repeated blank and whitespace-only lines between them, blank
    lines before the first and after the last."""
    paragraphs = [" ".join([letter * 4] * 30) for letter in "abcdefghij"]
    paragraphs[2] = paragraphs[2][:50] + "\n" + paragraphs[2][51:]
    separators = ["\n\n", "\n\n\n", "\n \t\n"]
    path.write_text("\n" + "".join(p + separators[k % 3] for k, p in enumerate(paragraphs)))
    return path, paragraphs


def test_text_file_documents_are_its_paragraphs(tiny_hf, runtime, tmp_path, capsys):
    """A text file is split into documents at blank lines, the same way in the data cache
    and in ``preprocess`` (whose missing output directories are made); so a split of a
    one-file corpus validates on its last paragraphs."""
    from transformers import AutoTokenizer

    model = tiny_hf("llama")
    tok = AutoTokenizer.from_pretrained(str(model))
    text, paragraphs = _paragraph_file(tmp_path / "notes.txt")
    expected = [tok(p, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p in paragraphs]
    cache = tmp_path / "cache"
    corpus = check_corpus([str(text)], tokenizer=tok, cache_dir=str(cache), split="80,20,0")
    valid = corpus.dataset(tok, seq_len=8, seed=1, part="valid").take()
    (prefix,) = [str(p.with_suffix("")) for p in (cache / "tokens").glob("*/data.idx")]
    assert _read_indexed(prefix) == expected
    assert len(valid) > 0 and set(valid.unique().tolist()) <= set(expected[8]) | set(expected[9])

    out = tmp_path / "data" / "sub" / "notes_text_document"
    code, err = cli_in_process(capsys, "preprocess", "--input", text, "--model", model, "--out", out)
    assert code == 0, err
    assert _read_indexed(out) == expected


def test_blend_logs_each_sources_share(runtime, tmp_path, caplog):
    """A blend says once, at the start, what each source gives: weight, documents, tokens
    and the samples drawn from it (counted here from the samples themselves)."""
    import logging

    pa, pb, a, b = _two_sources(tmp_path)
    caplog.set_level(logging.INFO, logger="nemo_minitron")
    samples = check_corpus(["0.7", pa, "0.3", pb], vocab_size=1000, cache_dir=str(tmp_path / "cache")).dataset(
        None, seq_len=8, seed=1, num_samples=100).take()
    from_a = int((samples < 500).all(dim=1).sum())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    assert f"data: {pa}: weight 0.7 (70.0%), 40 documents, {sum(map(len, a)):,} tokens -> {from_a} of 100 samples" \
        in lines, lines
    assert f"data: {pb}: weight 0.3 (30.0%), 40 documents, {sum(map(len, b)):,} tokens -> {100 - from_a} of 100 " \
           "samples" in lines, lines


@pytest.mark.parametrize("case", ["one_document_split", "own_data_no_heldout"])
def test_held_out_data_is_never_empty_or_other_text_silently(tiny_checkpoint, tmp_path, capsys, case):
    """``distill`` refuses, in one line before any work (nothing tokenised, nothing written):
    a split that leaves a one-paragraph file no validation document; and the user's own
    --data with neither --split nor --eval-data (the built-in held-out text is other text)."""
    one = tmp_path / "one.txt"
    one.write_text(" ".join(f"w{i}" for i in range(300)))  # one paragraph: one document
    out, cache = tmp_path / "out", tmp_path / "cache"
    extra, words = (["--split", "90,10,0"], ["--split 90,10,0 leaves no document", "for validation", "1 document",
                                             "paragraphs", "--eval-data"]) if case == "one_document_split" else \
        ([], ["is not built-in data", "--eval-data", "--split"])
    code, err = cli_in_process(capsys, "distill", "--teacher", tiny_checkpoint("llama"), "--student",
                               tiny_checkpoint("llama_small"), "--data", one, *extra, "--out", out, "--steps", "1",
                               "--seq-len", "16", "--data-cache", cache)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), err
    assert not out.exists() and not (cache / "tokens").exists()


def test_malformed_jsonl_is_reported_before_any_work(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"body": "w3"}\n')
    with pytest.raises(UsageError, match="line 2"):
        check_corpus([str(bad)], tokenizer=tiny_tokenizer(), cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------------- blends and splits
def _two_sources(tmp_path):
    """Source a: token ids 10..499; source b: 500..999, twice a's tokens."""
    rng = np.random.default_rng(0)
    a = [rng.integers(10, 500, rng.integers(20, 60)).tolist() for _ in range(40)]
    b = [rng.integers(500, 1000, rng.integers(40, 120)).tolist() for _ in range(40)]
    return _indexed(tmp_path / "a", a), _indexed(tmp_path / "b", b), a, b


def test_blend_draws_sources_by_weight(runtime, tmp_path):
    pa, pb, a, b = _two_sources(tmp_path)
    cache = str(tmp_path / "cache")
    n = 100

    def from_a(values):
        samples = check_corpus(values, vocab_size=1000, cache_dir=cache).dataset(None, seq_len=8, seed=1,
                                                                                num_samples=n).take()
        assert samples.shape == (n, 9)
        in_a = (samples < 500).all(dim=1)
        assert bool((in_a | (samples >= 500).all(dim=1)).all())  # a sample never mixes sources
        return samples, int(in_a.sum())

    # megatron-core's blending keeps each source's count within one sample of weight x n
    weighted, count = from_a(["0.7", pa, "0.3", pb])
    assert abs(count - 0.7 * n) <= 1
    for form in ([{"weight": 0.7, "path": pa}, {"weight": 0.3, "path": pb}], f"7 {pa} 3 {pb}"):
        assert torch.equal(from_a(form)[0], weighted)  # the recipe forms: the same blend
    # without weights: in proportion to the sources' tokens
    tokens_a, tokens_b = sum(map(len, a)), sum(map(len, b))
    assert abs(from_a([pa, pb])[1] - n * tokens_a / (tokens_a + tokens_b)) <= 1


def test_split_parts_read_disjoint_documents(runtime, tmp_path):
    # document k is token 10 + k repeated, so every token names its document
    docs = [[10 + k] * (20 + k % 7) for k in range(40)]
    prefix = _indexed(tmp_path / "c", docs)
    corpus = check_corpus([prefix], vocab_size=1000, split="75,25,0", cache_dir=str(tmp_path / "cache"))
    train = corpus.dataset(None, seq_len=8, seed=2, part="train", num_samples=30).take()
    valid = corpus.dataset(None, seq_len=8, seed=2, part="valid").take()
    # megatron-core splits by document index: the first 30 documents train, the last 10 validate
    assert set(train.unique().tolist()) <= set(range(10, 40))
    assert set(valid.unique().tolist()) <= set(range(40, 50)) and len(valid) > 0
    with pytest.raises(UsageError, match="more than the data holds"):
        corpus.dataset(None, seq_len=8, seed=2, part="train", num_samples=10_000, exact=True)
    with pytest.raises(UsageError, match="shorter than one sample"):
        corpus.dataset(None, seq_len=5000, seed=2)


def test_an_interrupted_index_build_is_rebuilt(runtime, tmp_path):
    pa, pb, _, _ = _two_sources(tmp_path)
    cache = tmp_path / "cache"
    corpus = check_corpus(["0.5", pa, "0.5", pb], vocab_size=1000, cache_dir=str(cache))
    first = corpus.dataset(None, seq_len=8, seed=3, num_samples=20).take()
    (marker,) = (cache / "index").glob("*/complete")
    attempt = marker.parent / marker.read_text()
    marker.unlink()  # as if killed while megatron-core wrote its files
    for npy in attempt.glob("*.npy"):
        npy.write_bytes(npy.read_bytes()[:40])
    again = corpus.dataset(None, seq_len=8, seed=3, num_samples=20).take()
    assert torch.equal(again, first)
    assert marker.is_file() and marker.read_text() != attempt.name


def test_data_parallel_shares_cover_every_sample_once():
    shares = [data_parallel_bounds(10, r, 3) for r in range(3)]
    assert [lo for lo, _ in shares[1:]] == [hi for _, hi in shares[:-1]] and shares[0][0] == 0 and shares[-1][1] == 10
    assert max(hi - lo for lo, hi in shares) - min(hi - lo for lo, hi in shares) <= 1


# ---------------------------------------------------------------------- preprocess
def test_preprocess_writes_what_megatron_reads(tiny_hf, tmp_path, capsys):
    from transformers import AutoTokenizer

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("The first document.\nIt has two lines.")
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": f"Record {i}: caf\u00e9 {i * i}"}) for i in range(7)))
    model = tiny_hf("llama")
    tok = AutoTokenizer.from_pretrained(str(model))
    texts = [(folder / "a.txt").read_text()] + [json.loads(line)["text"] for line in
                                                (folder / "b.jsonl").read_text().splitlines()]
    expected = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]

    files = {}
    for workers in (1, 2):
        prefix = tmp_path / f"out{workers}_text_document"
        code, err = cli_in_process(capsys, "preprocess", "--input", folder, "--model", model, "--out", prefix,
                                   "--workers", workers)
        assert code == 0, err
        assert _read_indexed(prefix) == expected  # documents in order, one sequence each, end-of-sequence last
        files[workers] = [(tmp_path / f"out{workers}_text_document{s}").read_bytes() for s in (".bin", ".idx")]
    assert files[1] == files[2]  # workers change the speed, not the bytes
    assert files[1][1][17] == 8  # uint16, as Megatron-LM chooses below 65,500 ids
    assert not list(tmp_path.glob("*.tmp-*"))
    code, err = cli_in_process(capsys, "preprocess", "--input", folder, "--model", model, "--out",
                               tmp_path / "out1_text_document")
    assert code == 2 and "already exists" in err


def test_token_dtype_follows_megatron_lm():
    from nemo_minitron.data.indexed import token_dtype

    assert token_dtype(49152) == np.uint16 and token_dtype(128256) == np.int32


# ---------------------------------------------------------------------- bad input
def _bad_idx(tmp_path, name, offset, value: bytes):
    prefix = _indexed(tmp_path / name, [[5, 6, 7]])
    raw = bytearray(open(prefix + ".idx", "rb").read())
    raw[offset:offset + len(value)] = value
    open(prefix + ".idx", "wb").write(bytes(raw))
    return prefix


def test_bad_data_input_is_one_line_before_any_work(tiny_checkpoint, tmp_path, capsys):
    ckpt = tiny_checkpoint("llama")
    good = _indexed(tmp_path / "good", [[5, 6, 7, 8] * 10])
    half = tmp_path / "half"
    (tmp_path / "half.bin").write_bytes(b"\0\0")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    cases = [
        (["--data", "0.7", good, "0.3"], "pairs of weight and source"),
        (["--data", "0.7", good, "0", good], "must be > 0"),
        (["--data", str(half)], "half.idx is missing"),
        (["--data", _bad_idx(tmp_path, "v2", 9, struct.pack("<Q", 2))], "index version 2"),
        (["--data", _bad_idx(tmp_path, "f32", 17, bytes([7]))], "dtype code 7"),
        (["--data", _indexed(tmp_path / "big", [[5, 6, 7000]])], "outside the model's vocabulary"),
        (["--data", good, "--split", "99,x"], "--split '99,x' does not parse"),
        (["--data", good, "--data-cache", not_a_dir / "cache"], "--data-cache"),
    ]
    for args, words in cases:
        code, err = cli_in_process(capsys, "eval", ckpt, "--seq-len", "16", *args)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and words in lines[0], (args, err)


def test_split_weights_are_normalised_as_megatron_does_and_said(runtime, tmp_path, caplog):
    """Megatron's split is relative weights: 60,20 reads what 75,25,0 does, and the log says
    the shares it applied and the tokens per sample as --seq-len set them."""
    prefix = _indexed(tmp_path / "c", [[10 + k] * (20 + k % 7) for k in range(40)])

    def valid(split):
        corpus = check_corpus([prefix], vocab_size=1000, split=split, cache_dir=str(tmp_path / "cache"))
        return corpus.dataset(None, seq_len=8, seed=2, part="valid").take()

    with caplog.at_level("INFO", logger="nemo_minitron"):
        weights = valid("60,20")
    assert torch.equal(weights, valid("75,25,0"))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("data: "))
    assert f"{len(weights)} samples of 8 tokens (--seq-len 8)" in line
    assert "in the valid part (--split 60,20: train/validation/test 75/25/0 %)" in line


def test_a_split_leaving_a_needed_part_empty_is_one_line_before_any_work(tiny_checkpoint, tmp_path, capsys):
    """(eval as a process of its own: there, work started would log before the error)"""
    ckpt, out = tiny_checkpoint("llama"), tmp_path / "out"
    proc = run_cli("eval", ckpt, "--data", "builtin:heldout", "--split", "100,0", "--seq-len", "16")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--split 100,0 leaves no validation part" in proc.stderr
    for args in (["importance", ckpt, "--data", "builtin:calib", "--split", "0,100", "--out", out, "--seq-len", "16"],
                 ["generate", ckpt, "--data", "builtin:train", "--split", "0,1", "--out", out, "--prefix-tokens", "8"]):
        code, err = cli_in_process(capsys, *args)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and f"--split {args[5]} leaves no training part" in lines[0], err
        assert not out.exists()
