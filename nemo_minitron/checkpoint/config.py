"""``convert`` and ``export`` settings: the source of their flags and of ``export()``'s
keywords (a light module: the command line reads it without torch)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from nemo_minitron.config import option
from nemo_minitron.errors import require


@dataclasses.dataclass
class ConvertConfig:
    """``nemo-minitron convert``: where the model comes from (one of the two)."""

    hf: Optional[str] = option(None, "HF model directory, .gguf file, Hub id, or the alias smollm2-135m",
                               metavar="SRC")
    megatron: Optional[str] = option(None, "Megatron-LM / Megatron-Bridge checkpoint directory (or its iter_N "
                                           "directory), or a NeMo 2 checkpoint", metavar="SRC")

    def check(self, names) -> None:
        require((self.hf is None) != (self.megatron is None),
                f"give one of {names('hf')} SRC and {names('megatron')} SRC")


@dataclasses.dataclass
class ExportConfig:
    """``nemo-minitron export``: checks of the Hugging Face export, and how a Megatron export
    pads the vocabulary."""

    verify: bool = option(False, "with --hf-out: reload with transformers and compare logits")
    vocab_padding: str = option(
        "megatron", "with --megatron-out: megatron (a multiple of 128 x --tp, Megatron-LM's rule), none (Bridge's "
                    "should_pad_vocab false), or a multiple N (e.g. 128, the project's)", metavar="PAD")
