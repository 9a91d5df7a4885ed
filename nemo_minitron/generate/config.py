"""Generation settings: ``GenerateConfig`` is the source of the ``generate`` flags and the
``generate()`` keywords; ``SamplingConfig`` is the part the inference engine needs (also
used by the lm-eval ``LM``'s generate-until). A light module: no torch."""

from __future__ import annotations

import dataclasses
from typing import Optional

from nemo_minitron.config import option
from nemo_minitron.errors import require


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each new token. ``temperature == 0`` is greedy decoding. The defaults live
    here; ``GenerateConfig``'s flags and ``generate()`` keywords take theirs from them."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 0.0  # 0: off
    top_k: int = 0  # 0: off
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


STOP_HELP = ("stop string (repeatable): a prompt's generation ends where one appears, and the text is cut before "
             "it")


@dataclasses.dataclass
class GenerateConfig:
    """``nemo-minitron generate``: how many tokens, how they are picked, in what batches."""

    max_new_tokens: int = option(SamplingConfig.max_new_tokens, "new tokens per prompt at most", ge=1)
    temperature: float = option(SamplingConfig.temperature, "0: greedy decoding; > 0: sample at this temperature",
                                ge=0)
    top_p: float = option(SamplingConfig.top_p, "sample from the smallest set of tokens with this probability "
                                                "(0: off)", ge=0, le=1)
    top_k: int = option(SamplingConfig.top_k, "sample from the k most likely tokens (0: off)", ge=0)
    stop: list[str] = option(list(SamplingConfig.stop), STOP_HELP, cli=False)  # --stop is repeatable: cli.py
    ignore_eos: bool = option(SamplingConfig.ignore_eos, "generate past end-of-sequence tokens")
    batch_size: int = option(8, "prompts per batch (data-parallel replicas take turns at batches)", ge=1)
    prefix_tokens: Optional[int] = option(None, "with --data: the prompts are the first N tokens of windows of the "
                                                "data", ge=2, default_text="none", metavar="N")
    limit: Optional[int] = option(None, "at most this many prompts", ge=1, default_text="all", metavar="N")

    def check(self, names) -> None:
        require(not (self.top_k and self.top_p), f"{names('top_k')} and {names('top_p')} cannot both be set; "
                                                 "choose one")
        require(self.temperature > 0 or not (self.top_k or self.top_p),
                f"{names('top_k')}/{names('top_p')} need {names('temperature')} > 0 (temperature 0 is greedy "
                "decoding)")
        require(all(isinstance(s, str) and s for s in self.stop), f"{names('stop')} strings must not be empty")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, stop=tuple(self.stop), ignore_eos=self.ignore_eos)
