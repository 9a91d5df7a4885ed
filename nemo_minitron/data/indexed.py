"""Megatron indexed data sets (``PREFIX.bin`` + ``PREFIX.idx``): checked cheaply, written atomically.

The ``.idx`` layout is megatron-core's (``megatron/core/datasets/indexed_dataset.py``):
a 9-byte magic ``MMIDIDX\\0\\0``, version 1 (u64), the token dtype code (u8), the
sequence and document counts (u64 each), then int32 sequence lengths, int64 byte
pointers into ``.bin`` and int64 document boundaries. Every check here reads the
header and a few entries, never the whole corpus, so it costs the same for 1M or 1T
tokens. Writing goes through megatron-core's ``IndexedDatasetBuilder``, so Megatron-LM
and Megatron-Bridge read the result unchanged.
"""

from __future__ import annotations

import contextlib
import os
import struct
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from nemo_minitron.errors import UsageError, require

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34  # magic 9 + version 8 + dtype 1 + sequence count 8 + document count 8
# megatron-core's DType codes that can hold token ids (6 and 7 are float64/float32)
TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
VOCAB_CHECK_SEQUENCES = 32  # sequences read to check token ids against the vocabulary
VOCAB_CHECK_TOKENS = 1 << 16  # at most this many tokens of each


class IndexHeader:
    """What a ``.idx`` says about its data set, validated against both files' sizes."""

    def __init__(self, prefix: str, flag: str = "--data"):
        self.prefix = prefix
        idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
        try:
            with open(idx, "rb") as f:
                head = f.read(HEADER_BYTES)
            idx_size, self.bin_size = idx.stat().st_size, bin_.stat().st_size
        except OSError as e:
            raise UsageError(f"{flag} '{prefix}': cannot read the indexed data set ({e.strerror})") from None
        require(len(head) == HEADER_BYTES and head[:9] == MAGIC,
                f"{flag} '{prefix}.idx' is not a Megatron index (bad magic bytes)")
        version, code = struct.unpack("<QB", head[9:18])
        require(version == VERSION, f"{flag} '{prefix}.idx' has index version {version}; Megatron's is {VERSION}")
        require(code in TOKEN_DTYPES, f"{flag} '{prefix}.idx' has dtype code {code}, not a Megatron token dtype "
                                      f"(allowed: {', '.join(f'{c} ({np.dtype(t).name})' for c, t in TOKEN_DTYPES.items())})")
        self.dtype = np.dtype(TOKEN_DTYPES[code])
        self.sequences, self.documents = struct.unpack("<QQ", head[18:34])
        need = HEADER_BYTES + 12 * self.sequences + 8 * self.documents
        require(idx_size >= need, f"{flag} '{prefix}.idx' is truncated ({idx_size} bytes, its header needs {need})")
        if self.sequences:
            last_len = int(self._array(np.int32, HEADER_BYTES + 4 * (self.sequences - 1), 1)[0])
            last_ptr = int(self._pointers(self.sequences - 1, 1)[0])
            expected = last_ptr + last_len * self.dtype.itemsize
            require(self.bin_size == expected, f"{flag} '{prefix}.bin' has {self.bin_size} bytes; its .idx "
                                               f"describes {expected} (a truncated or mismatched pair)")
        else:
            require(self.bin_size == 0, f"{flag} '{prefix}.bin' is not empty but its .idx lists no sequences")

    def _array(self, dtype, offset: int, count: int) -> np.ndarray:
        return np.fromfile(self.prefix + ".idx", dtype=dtype, count=count, offset=offset)

    def _pointers(self, start: int, count: int) -> np.ndarray:
        return self._array(np.int64, HEADER_BYTES + 4 * self.sequences + 8 * start, count)

    def _pointer(self, sequence: int) -> int:
        return self.bin_size if sequence >= self.sequences else int(self._pointers(sequence, 1)[0])

    def tokens(self, first: int = 0, last: int | None = None) -> int:
        """Tokens in sequences ``[first, last)`` (all by default), from two pointers."""
        last = self.sequences if last is None else last
        return (self._pointer(last) - self._pointer(first)) // self.dtype.itemsize if last > first else 0

    def sample_tokens(self, count: int = VOCAB_CHECK_SEQUENCES) -> np.ndarray:
        """Token ids of up to ``count`` sequences spread evenly over the data set."""
        if not self.sequences:
            return np.zeros(0, dtype=np.int64)
        picks = np.unique(np.linspace(0, self.sequences - 1, min(count, self.sequences)).round().astype(np.int64))
        data = np.memmap(self.prefix + ".bin", dtype=self.dtype, mode="r")
        parts = []
        for i in picks:
            start = self._pointer(int(i)) // self.dtype.itemsize
            end = min(self._pointer(int(i) + 1) // self.dtype.itemsize, start + VOCAB_CHECK_TOKENS)
            parts.append(np.asarray(data[start:end], dtype=np.int64))
        del data
        return np.concatenate(parts)


def check_prefix(prefix: str, flag: str = "--data") -> IndexHeader:
    """Both files present, a Megatron header, sizes consistent."""
    for suffix in (".bin", ".idx"):
        require(Path(prefix + suffix).is_file(), f"{flag} '{prefix}': a Megatron indexed data set needs both "
                                                 f"{prefix}.bin and {prefix}.idx ({prefix}{suffix} is missing)")
    return IndexHeader(prefix, flag)


def check_vocabulary(header: IndexHeader, vocab_size: int, flag: str = "--data") -> None:
    """Token ids of a sample of sequences must lie in ``[0, vocab_size)``: a data set made
    with another tokenizer fails here, without reading the whole corpus."""
    ids = header.sample_tokens()
    if ids.size:
        low, high = int(ids.min()), int(ids.max())
        require(low >= 0 and high < vocab_size, f"{flag} '{header.prefix}': token id {high if high >= vocab_size else low} "
                                                f"is outside the model's vocabulary (0..{vocab_size - 1}); was it "
                                                "tokenised with another tokenizer?")


def token_dtype(vocab_size: int) -> np.dtype:
    """Megatron-LM's rule (``DType.optimal_dtype``): uint16 below 65,500 ids, int32 above."""
    # deferred (also below): recipe and --data checks read headers here without megatron-core
    from megatron.core.datasets.indexed_dataset import DType

    return np.dtype(DType.optimal_dtype(vocab_size))


class IndexedWriter:
    """Documents in, ``PREFIX.bin/.idx`` out (one sequence per document)."""

    def __init__(self, bin_path: str, idx_path: str, dtype: np.dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # deferred: see token_dtype

        self.idx_path, self.dtype = idx_path, np.dtype(dtype)
        self.builder = IndexedDatasetBuilder(bin_path, dtype=self.dtype.type)
        self.documents = self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        if len(ids):
            self.builder.add_document(np.asarray(ids, dtype=self.dtype), [len(ids)])
            self.documents += 1
            self.tokens += len(ids)

    def finalize(self) -> None:
        self.builder.finalize(self.idx_path)


@contextlib.contextmanager
def atomic_indexed(prefix: str, dtype: np.dtype) -> Iterator[IndexedWriter]:
    """Write ``PREFIX.bin/.idx`` under temporary names; rename them into place (``.bin``
    first, ``.idx`` last: a prefix whose ``.idx`` exists is complete) only on success."""
    tag = f".tmp-{uuid.uuid4().hex[:8]}"
    tmp_bin, tmp_idx = prefix + ".bin" + tag, prefix + ".idx" + tag
    writer = IndexedWriter(tmp_bin, tmp_idx, dtype)
    try:
        yield writer
        writer.finalize()
        os.replace(tmp_bin, prefix + ".bin")
        os.replace(tmp_idx, prefix + ".idx")
    finally:
        for leftover in (tmp_bin, tmp_idx):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
