"""The training samples distillation reads, and how they are identified: the one place
where ``distill``, ``teacher-logits`` and ``search`` read training data.

Sample ``i`` is row ``i`` of what :func:`training_samples` returns; the trainer picks each
step's samples by index (``train.step_indices``), and the teacher-logit cache stores
sample ``i`` under index ``i`` with a hash of its tokens, so a cache is only ever read
against the very samples it was computed from.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch


def training_samples(data: Sequence[str], tokenizer, seq_len: int, *, seed: int, vocab_size: int,
                     flag: str = "--data") -> torch.Tensor:
    """``[N, seq_len + 1]`` token windows of the training data, in index order. ``seed`` is part
    of a sample's identity (data layers that shuffle documents use it); this one keeps the
    data's own order."""
    from nemo_minitron.data.samples import load_samples, parse_data_specs

    del seed  # windows are in the data's order here
    return load_samples(parse_data_specs(data, flag), tokenizer, seq_len, vocab_size=vocab_size)


def sample_hashes(samples: torch.Tensor) -> np.ndarray:
    """One 64-bit hash per sample of its tokens (int64 [N]): what the cache checks samples by."""
    rows = samples.to(torch.int64).contiguous().numpy()
    out = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i] = np.frombuffer(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), dtype=np.int64)[0]
    return out
