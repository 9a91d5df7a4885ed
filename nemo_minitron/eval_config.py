"""``nemo-minitron eval`` settings (a light module: the command line reads it without torch)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from nemo_minitron.config import DEFAULT_SEQ_LEN, option
from nemo_minitron.errors import require


@dataclasses.dataclass
class EvalConfig:
    """``nemo-minitron eval``: which held-out tokens, in what pieces."""

    seq_len: int = option(DEFAULT_SEQ_LEN, "tokens per sample", ge=1)
    max_tokens: Optional[int] = option(None, "evaluate at most this many tokens", ge=1, default_text="all")
    micro_batch: int = option(1, "samples per forward pass", ge=1)

    def check(self, names) -> None:
        require(self.max_tokens is None or self.max_tokens >= self.seq_len,
                f"{names('max_tokens')} {self.max_tokens} is less than one sample of {names('seq_len')} "
                f"{self.seq_len}")
