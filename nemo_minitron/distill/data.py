"""How training samples are identified: the teacher-logit cache stores sample ``i`` of the
training data set (``data.dataset.Corpus.dataset``, part ``train``) under index ``i``
with a hash of its tokens, so that a cache is only ever read against the very samples it
was computed from."""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch


def sample_hash(window: torch.Tensor) -> int:
    """A 64-bit hash of one sample's tokens."""
    row = window.to(torch.int64).contiguous().numpy()
    return int(np.frombuffer(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), dtype=np.int64)[0])


def sample_hashes(samples, indices: Sequence[int] | None = None) -> np.ndarray:
    """The hashes (int64) of samples ``indices`` (default: all) of a TokenDataset or a
    ``[N, s+1]`` tensor: what the cache checks samples by."""
    indices = range(len(samples)) if indices is None else indices
    return np.array([sample_hash(samples[int(i)]) for i in indices], dtype=np.int64)
