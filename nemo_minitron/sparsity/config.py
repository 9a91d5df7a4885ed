"""Sparsity settings: one dataclass, the source of the ``sparsify`` flags, the ``sparsify()``
keywords and the recipes' ``rounds.N.sparsify`` keys; and the pattern grammar.

    --pattern 2:4               N:M: at most N non-zero weights in every M consecutive
                                weights of a row along the input (2:4: half of them zero,
                                what sparse tensor cores run)
    --pattern unstructured:0.5  that fraction of each weight zero, anywhere
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from nemo_minitron.config import DEFAULT_SEQ_LEN, option
from nemo_minitron.errors import UsageError, require

#: ``--modules`` name -> the canonical weight (``decoder.layers.{i}.`` + suffix, or whole)
MODULES = {
    "qkv": "self_attention.linear_qkv.weight",
    "proj": "self_attention.linear_proj.weight",
    "fc1": "mlp.linear_fc1.weight",
    "fc2": "mlp.linear_fc2.weight",
    "output": "output_layer.weight",
}
DECODER_MODULES = ["qkv", "proj", "fc1", "fc2"]
PATTERN_HELP = "N:M (e.g. 2:4) or unstructured:RATIO with 0 < RATIO < 1 (e.g. unstructured:0.5)"


@dataclasses.dataclass(frozen=True)
class Pattern:
    """N:M (``n`` kept of every ``m``) or unstructured (``ratio`` of the weights zero)."""

    n: int = 0
    m: int = 0
    ratio: float = 0.0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        """The fraction of a masked weight that is zero."""
        return 1 - self.n / self.m if self.is_nm else self.ratio

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"unstructured:{self.ratio:g}"


def parse_pattern(text: str, flag: str = "--pattern") -> Pattern:
    text = str(text).strip()
    head, sep, tail = text.partition(":")
    if head == "unstructured" and sep:
        try:
            ratio = float(tail)
        except ValueError:
            raise UsageError(f"{flag} must be {PATTERN_HELP} (got '{text}')") from None
        require(0 < ratio < 1, f"{flag} {text}: the ratio must be in (0, 1) (got {tail})")
        return Pattern(ratio=ratio)
    if not (sep and head.isdigit() and tail.isdigit()):
        raise UsageError(f"{flag} must be {PATTERN_HELP} (got '{text}')")
    n, m = int(head), int(tail)
    require(0 < n < m, f"{flag} {text}: N:M needs 0 < N < M (e.g. 2:4)")
    return Pattern(n=n, m=m)


def module_list(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def layer_ranges(text: str) -> list[int]:
    """``0-11,14`` -> [0, 1, ..., 11, 14]."""
    out: list[int] = []
    for item in (i.strip() for i in str(text).split(",")):
        if not item:
            continue
        lo, dash, hi = item.partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if dash else [int(item)]
        except ValueError:
            raise UsageError(f"expected layer numbers and ranges such as 0-11,14 (got '{text}')") from None
    return out


@dataclasses.dataclass
class SparsifyConfig:
    pattern: str = option("2:4", f"which weights may be non-zero: {PATTERN_HELP}")
    method: Literal["magnitude", "wanda", "sparsegpt"] = option(
        "sparsegpt", "magnitude (|W|, no data), wanda (|W| x the input column's norm on the calibration data, per "
                     "output row) or sparsegpt (one-shot OBS: masks from the layer's Hessian, the kept weights "
                     "updated to make up for the pruned ones)")
    modules: list[str] = option(list(DECODER_MODULES), "linear layers to sparsify: any of "
                                + ", ".join(MODULES) + " (output: the output layer, untied models only)",
                                parse=module_list, metavar="NAME,...")
    layers: list[int] = option([], "decoder layers to sparsify, 0-indexed, ranges allowed (e.g. 0-11,14)",
                               parse=layer_ranges, default_text="all", metavar="I,J-K")
    samples: int = option(128, "calibration samples (wanda, sparsegpt)", ge=1)
    seq_len: int = option(DEFAULT_SEQ_LEN, "tokens per calibration sample", ge=1)
    micro_batch: int = option(1, "samples per forward pass", ge=1, resume_safe=True)
    sequential: bool = option(
        True, "wanda, sparsegpt: calibrate layer by layer, each layer on the outputs of the layers before it "
              "already sparsified (one forward pass per layer, as both papers do); --no-sequential: every layer "
              "from one pass of the dense model (ModelOpt's way; holds every layer's statistics at once)")
    block_size: int = option(128, "sparsegpt: columns per block of lazy updates, and per mask choice of an "
                                  "unstructured pattern", ge=1)
    damp: float = option(0.01, "sparsegpt: dampening, the fraction of the Hessian's mean diagonal added to its "
                               "diagonal", ge=0)

    def check(self, names) -> None:
        self.pattern = str(parse_pattern(self.pattern, names("pattern")))
        require(bool(self.modules), f"{names('modules')} must name at least one of {', '.join(MODULES)}")
        for name in self.modules:
            require(name in MODULES, f"{names('modules')}: '{name}' is not a sparsifiable module (allowed: "
                                     f"{', '.join(MODULES)})")
        require(len(set(self.modules)) == len(self.modules), f"{names('modules')} names a module twice")
        for i in self.layers:
            require(isinstance(i, int) and not isinstance(i, bool) and i >= 0,
                    f"{names('layers')}: layers are numbered from 0 (got {i})")

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude"
