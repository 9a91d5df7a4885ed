"""The training samples distillation reads, and how they are identified: the one place
where ``distill``, ``teacher-logits`` and ``search`` read training data.

Sample ``i`` is row ``i`` of what :func:`training_samples` returns; the trainer picks each
step's samples by index (``train.step_indices``), and the teacher-logit cache stores
sample ``i`` under index ``i`` with a hash of its tokens, so a cache is only ever read
against the very samples it was computed from.

Tokenised samples are remembered for the life of the process (keyed by the data, the
files' modification times, the tokenizer and the sequence length): a search distils many
candidates from the same data.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

_MEMO: dict[tuple, torch.Tensor] = {}
_MEMO_SIZE = 4


def _key(data: Sequence[str], tokenizer, seq_len: int, vocab_size: int | None) -> tuple:
    def stamp(spec: str):
        paths = [Path(spec + ".bin"), Path(spec)] if not spec.startswith("builtin:") else []
        return tuple(os.stat(p).st_mtime_ns for p in paths if p.exists())

    return (tuple(data), tuple(stamp(s) for s in data), getattr(tokenizer, "name_or_path", id(tokenizer)),
            len(tokenizer) if tokenizer is not None else 0, seq_len, vocab_size)


def samples_of(data: Sequence[str], tokenizer, seq_len: int, *, vocab_size: int | None,
               flag: str = "--data") -> torch.Tensor:
    """``[N, seq_len + 1]`` token windows of ``data`` in order (remembered; do not modify)."""
    from nemo_minitron.data.samples import load_samples, parse_data_specs

    specs = parse_data_specs(data, flag)
    key = _key(data, tokenizer, seq_len, vocab_size)
    if key not in _MEMO:
        if len(_MEMO) >= _MEMO_SIZE:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = load_samples(specs, tokenizer, seq_len, vocab_size=vocab_size)
    return _MEMO[key]


def training_samples(data: Sequence[str], tokenizer, seq_len: int, *, seed: int, vocab_size: int,
                     flag: str = "--data") -> torch.Tensor:
    """The training data set, sample ``i`` = row ``i``. ``seed`` is part of a sample's identity
    (data layers that shuffle documents use it); this one keeps the data's own order."""
    del seed  # windows are in the data's order here
    return samples_of(data, tokenizer, seq_len, vocab_size=vocab_size, flag=flag)


def sample_hashes(samples: torch.Tensor) -> np.ndarray:
    """One 64-bit hash per sample of its tokens (int64 [N]): what the cache checks samples by."""
    rows = samples.to(torch.int64).contiguous().numpy()
    out = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i] = np.frombuffer(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), dtype=np.int64)[0]
    return out
