"""The data layer: built-in corpus, text/JSONL/indexed sources, deterministic samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nemo_minitron.data.builtin import SPLITS, builtin_documents
from nemo_minitron.data.samples import data_parallel_slice, load_samples, parse_data_spec, parse_data_specs
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


def _write_sources(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text(" ".join(f"w{i}" for i in range(300)))
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": " ".join(f"w{i}" for i in range(j, j + 50))}) for j in range(5)))
    return text, jsonl


def test_text_and_jsonl_samples_are_deterministic(tmp_path):
    text, jsonl = _write_sources(tmp_path)
    tok = tiny_tokenizer()
    specs = parse_data_specs([str(text), str(jsonl)])
    all_windows = load_samples(specs, tok, seq_len=15)
    # 300 + 1 eos + 5 * (50 + 1) tokens, cut into windows of 16
    assert all_windows.shape == ((301 + 255) // 16, 16)
    assert all_windows[0, :3].tolist() == tok.convert_tokens_to_ids(["w0", "w1", "w2"])
    assert all_windows[18, 12].item() == tok.eos_token_id  # the end of the text file's document
    a = load_samples(specs, tok, seq_len=15, num_samples=7, seed=5)
    b = load_samples(specs, tok, seq_len=15, num_samples=7, seed=5)
    c = load_samples(specs, tok, seq_len=15, num_samples=7, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(any(torch.equal(row, w) for w in all_windows) for row in a)


def test_folder_source(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    _write_sources(folder)
    assert parse_data_spec(str(folder)).kind == "folder"
    assert load_samples([parse_data_spec(str(folder))], tiny_tokenizer(), seq_len=15).shape[0] == (301 + 255) // 16


def test_megatron_indexed_dataset(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "corpus_text_document"
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    docs = [np.arange(10, 40, dtype=np.int32), np.arange(100, 117, dtype=np.int32)]
    for d in docs:
        builder.add_document(torch.from_numpy(d), [len(d)])
    builder.finalize(str(prefix) + ".idx")
    spec = parse_data_spec(str(prefix))
    assert spec.kind == "indexed"
    samples = load_samples([spec], None, seq_len=9, vocab_size=1000)
    assert torch.equal(samples.flatten(), torch.from_numpy(np.concatenate(docs)[:40]).long())
    with pytest.raises(UsageError, match="outside the model's vocabulary"):
        load_samples([spec], None, seq_len=9, vocab_size=50)


def test_errors_name_the_problem(tmp_path):
    text, _ = _write_sources(tmp_path)
    tok = tiny_tokenizer()
    with pytest.raises(UsageError, match="more than the data holds"):
        load_samples([parse_data_spec(str(text))], tok, seq_len=15, num_samples=100, seed=0)
    with pytest.raises(UsageError, match="shorter than one sample"):
        load_samples([parse_data_spec(str(text))], tok, seq_len=1000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"body": "w3"}\n')
    with pytest.raises(UsageError, match="line 2"):
        load_samples([parse_data_spec(str(bad))], tok, seq_len=2)
    (tmp_path / "half.bin").write_bytes(b"")
    with pytest.raises(UsageError, match="needs both"):
        parse_data_spec(str(tmp_path / "half"))


def test_data_parallel_slices_cover_every_sample_once():
    samples = torch.arange(10).unsqueeze(1)
    parts = [data_parallel_slice(samples, r, 3) for r in range(3)]
    assert sorted(torch.cat(parts).flatten().tolist()) == list(range(10))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
