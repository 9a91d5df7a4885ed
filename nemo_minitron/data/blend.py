"""``--data`` values -> a blend: sources with optional weights, validated before any work.

Forms accepted (the CLI's ``--data`` takes several words; a recipe key takes any of them):
- sources only: ``--data /data/a_text_document builtin:train notes.jsonl``; several sources
  are mixed in proportion to their sizes (tokens);
- Megatron's blend syntax, weight then source: ``--data 0.7 /data/a_text_document 0.3 /data/b``
  (weights are relative and need not sum to 1);
- in a recipe, also the same as one string (``"0.7 /data/a 0.3 /data/b"``) or a list of
  ``{weight: 0.7, path: /data/a}`` mappings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from nemo_minitron.data.sources import DataSpec, parse_data_spec
from nemo_minitron.errors import UsageError, require


@dataclasses.dataclass(frozen=True)
class BlendItem:
    weight: float | None  # None: in proportion to the source's size
    source: DataSpec


@dataclasses.dataclass(frozen=True)
class DataBlend:
    items: tuple[BlendItem, ...]
    flag: str = "--data"

    @property
    def weighted(self) -> bool:
        return self.items[0].weight is not None

    @property
    def label(self) -> str:
        return " ".join((f"{i.weight:g} " if i.weight is not None else "") + i.source.label for i in self.items)


def _number(word: str) -> float | None:
    try:
        return float(word)
    except ValueError:
        return None


def blend_words(value: Any, flag: str = "--data") -> list[str | tuple[float, str]]:
    """Normalise any accepted form to a list of sources, or of (weight, source) pairs.
    Checks the syntax only (no file is touched): recipes validate with this."""
    if isinstance(value, str):
        value = value.split()
    if isinstance(value, Mapping):
        value = [value]
    require(isinstance(value, Sequence) and len(value) > 0, f"{flag} is required (e.g. {flag} builtin:train, or "
                                                            f"{flag} 0.7 /data/a_text_document 0.3 /data/b_text_document)")
    if all(isinstance(v, Mapping) for v in value):
        pairs = []
        for v in value:
            keys = set(v)
            require(keys == {"weight", "path"}, f"{flag}: a blend entry needs exactly the keys weight and path "
                                                f"(got {', '.join(sorted(map(str, keys)))})")
            weight = v["weight"] if isinstance(v["weight"], (int, float)) else _number(str(v["weight"]))
            require(weight is not None, f"{flag}: blend weight '{v['weight']}' is not a number")
            pairs.append((float(weight), str(v["path"])))
        words: list[str] = [w for pair in pairs for w in (str(pair[0]), pair[1])]
    else:
        require(not any(isinstance(v, Mapping) for v in value),
                f"{flag}: mix of {{weight, path}} entries and plain values; use one form")
        words = [str(v) for v in value]
    if not any(_number(w) is not None for w in words):
        return list(words)
    # Megatron's blend syntax: weight source weight source ...
    require(len(words) % 2 == 0, f"{flag}: a weighted blend needs pairs of weight and source; got {len(words)} "
                                 f"items (e.g. {flag} 0.7 /data/a_text_document 0.3 /data/b_text_document)")
    out: list[str | tuple[float, str]] = []
    for i in range(0, len(words), 2):
        weight, source = _number(words[i]), words[i + 1]
        require(weight is not None, f"{flag}: expected a weight before '{words[i + 1]}', got '{words[i]}' "
                                    "(a weighted blend is weight source weight source ...)")
        require(_number(source) is None, f"{flag}: expected a source after weight {words[i]}, got '{source}'")
        require(weight > 0, f"{flag}: blend weight {words[i]} for '{source}' must be > 0")
        out.append((weight, source))
    return out


def parse_blend(value: Any, flag: str = "--data") -> DataBlend:
    """Validate the blend's syntax and every source (existence, kind, Megatron headers)."""
    items = []
    for word in blend_words(value, flag):
        weight, source = word if isinstance(word, tuple) else (None, word)
        items.append(BlendItem(weight, parse_data_spec(source, flag)))
    return DataBlend(tuple(items), flag)


def split_fractions(split: str | None, flag: str = "--split") -> tuple[float, float, float] | None:
    """'99,1,0' -> (0.99, 0.01, 0.0): train, validation and test shares of every source
    (Megatron's split string; missing trailing parts are 0)."""
    if split is None:
        return None
    parts = [p.strip() for p in str(split).split(",")]
    numbers = [_number(p) for p in parts]
    if not (1 <= len(parts) <= 3 and all(n is not None and n >= 0 for n in numbers) and sum(numbers) > 0):
        raise UsageError(f"{flag} '{split}' does not parse: give up to three comma-separated non-negative "
                         "weights for train,validation,test (e.g. 99,1,0)")
    total = sum(numbers)
    shares = [n / total for n in numbers] + [0.0] * (3 - len(numbers))
    return shares[0], shares[1], shares[2]
