"""Text in, fixed-length token samples out: the data layer every stage shares.

``--data`` accepts, any number of times:
- ``builtin:calib`` / ``builtin:train`` / ``builtin:heldout`` / ``builtin:docs`` (see ``builtin.py``);
- a text file, or a folder of them (``.txt``, ``.md``, ``.rst``, ``.jsonl`` inside, sorted);
- a ``.jsonl`` file whose records have a ``text`` field;
- a Megatron indexed data set, by prefix (``PREFIX.bin`` + ``PREFIX.idx``), read with
  megatron-core's ``IndexedDataset`` (already tokenised: must match the model's vocabulary).

Documents are tokenised with the model's tokenizer, joined with the end-of-sequence
token between them, and cut into consecutive windows of ``seq_len + 1`` tokens (input
plus next-token labels). The same data and settings always give the same samples.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from nemo_minitron.data.builtin import SPLITS, builtin_documents
from nemo_minitron.errors import UsageError, require

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    kind: str  # builtin | text | jsonl | indexed
    path: str
    label: str


def _spec_for_file(path: Path, label: str, flag: str) -> DataSpec:
    if path.suffix == ".jsonl":
        return DataSpec("jsonl", str(path), label)
    if path.suffix in (".bin", ".idx"):
        return parse_data_spec(str(path.with_suffix("")), flag)
    return DataSpec("text", str(path), label)


def parse_data_spec(spec: str, flag: str = "--data") -> DataSpec:
    """Validate one --data value (existence, readability, kind) without reading it all."""
    if spec.startswith("builtin:"):
        split = spec.split(":", 1)[1]
        require(split in SPLITS, f"{flag} '{spec}': unknown split (allowed: {', '.join('builtin:' + s for s in SPLITS)})")
        return DataSpec("builtin", split, spec)
    path = Path(spec)
    if Path(spec + ".bin").is_file() or Path(spec + ".idx").is_file():
        require(Path(spec + ".bin").is_file() and Path(spec + ".idx").is_file(),
                f"{flag} '{spec}': a Megatron indexed data set needs both {spec}.bin and {spec}.idx")
        return DataSpec("indexed", spec, spec)
    require(path.exists(), f"{flag} '{spec}' does not exist (give a text file or folder, a .jsonl file, a Megatron "
                           "prefix with .bin/.idx files, or builtin:" + "|".join(SPLITS) + ")")
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".jsonl")]
        require(files, f"{flag} '{spec}': folder holds no .txt/.md/.rst/.jsonl files")
        return DataSpec("folder", spec, spec)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UsageError(f"{flag} '{spec}' is not readable: {e.strerror}") from None
    return _spec_for_file(path, spec, flag)


def parse_data_specs(specs: Sequence[str], flag: str = "--data") -> list[DataSpec]:
    require(len(specs) > 0, f"{flag} is required (e.g. {flag} builtin:train)")
    return [parse_data_spec(s, flag) for s in specs]


def _documents(spec: DataSpec) -> Iterator[str]:
    if spec.kind == "builtin":
        yield from builtin_documents(spec.path)
    elif spec.kind == "text":
        yield Path(spec.path).read_text(encoding="utf-8", errors="replace")
    elif spec.kind == "jsonl":
        with open(spec.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"--data '{spec.path}' line {n}: not JSON ({e.msg})") from None
                require(isinstance(record, dict) and isinstance(record.get("text"), str),
                        f"--data '{spec.path}' line {n}: record has no string 'text' field")
                yield record["text"]
    elif spec.kind == "folder":
        for p in sorted(Path(spec.path).rglob("*")):
            if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".jsonl"):
                yield from _documents(_spec_for_file(p, str(p), "--data"))


def _indexed_tokens(prefix: str) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, multimodal=False, mmap=True)
    parts = [np.asarray(dataset[i]) for i in range(len(dataset))]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def token_stream(specs: Sequence[DataSpec], tokenizer, vocab_size: int | None = None) -> np.ndarray:
    """All documents of all specs as one token array, end-of-sequence between documents."""
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    pieces: list[np.ndarray] = []
    for spec in specs:
        if spec.kind == "indexed":
            tokens = _indexed_tokens(spec.path)
            if vocab_size is not None and tokens.size:
                require(int(tokens.max()) < vocab_size, f"--data '{spec.label}': token id {int(tokens.max())} is "
                                                        f"outside the model's vocabulary ({vocab_size})")
            pieces.append(tokens)
            continue
        docs = [d for d in _documents(spec) if d.strip()]
        if not docs:
            continue
        encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            pieces.append(np.asarray(ids + ([eos] if eos is not None else []), dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def load_samples(specs: Sequence[DataSpec], tokenizer, seq_len: int, *, num_samples: int | None = None,
                 seed: int | None = None, vocab_size: int | None = None,
                 samples_flag: str = "--samples") -> torch.Tensor:
    """``[N, seq_len + 1]`` token windows. With ``seed``, ``num_samples`` windows are drawn at
    random (by that seed alone, so the choice never depends on the parallel layout);
    without, the first ``num_samples`` (or all) windows in order."""
    require(seq_len >= 1, f"--seq-len must be >= 1 (got {seq_len})")
    stream = token_stream(specs, tokenizer, vocab_size)
    window = seq_len + 1
    available = len(stream) // window
    labels = ", ".join(s.label for s in specs)
    require(available >= 1, f"--data {labels}: {len(stream)} tokens is shorter than one sample "
                            f"(--seq-len {seq_len} needs {window} tokens)")
    if num_samples is not None:
        require(num_samples >= 1, f"{samples_flag} must be >= 1 (got {num_samples})")
        require(num_samples <= available, f"{samples_flag} {num_samples} is more than the data holds: {labels} "
                                          f"has {available} samples of {window} tokens at --seq-len {seq_len}")
    n = available if num_samples is None else num_samples
    windows = torch.from_numpy(stream[: available * window].reshape(available, window))
    if seed is None:
        return windows[:n].clone()
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n]
    return windows[order].clone()


def data_parallel_slice(samples: torch.Tensor, dp_rank: int, dp_size: int) -> torch.Tensor:
    """A contiguous share of the samples for one data-parallel rank (sizes differ by at most one)."""
    bounds = np.linspace(0, len(samples), dp_size + 1).round().astype(int)
    return samples[bounds[dp_rank]: bounds[dp_rank + 1]]
