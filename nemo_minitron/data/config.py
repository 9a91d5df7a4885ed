"""How ``--data`` is read: the split of every source and the data cache. The source of the
``--split``/``--data-cache`` flags, the stage APIs' ``split``/``cache_dir`` keywords and
the recipes' ``data.split``/``data.cache_dir`` keys."""

from __future__ import annotations

import dataclasses
from typing import Optional

from nemo_minitron.config import option


@dataclasses.dataclass
class DataOptions:
    split: Optional[str] = option(
        None, "train,validation,test shares of every source's documents (Megatron's split, e.g. 99,1,0): training "
              "and calibration read the first part, evaluation the second", default_text="every use reads all",
        metavar="S")
    cache_dir: Optional[str] = option(
        None, "tokenised text and sample indices, on a file system every rank sees", flag="--data-cache",
        resume_safe=True,
        default_text="$NEMO_MINITRON_DATA_CACHE or ~/.cache/nemo_minitron/data", metavar="DIR")

    def check(self, names) -> None:
        from nemo_minitron.data.blend import split_fractions  # deferred: start-up time of --help

        split_fractions(self.split, names("split"))


@dataclasses.dataclass
class PreprocessConfig:
    """``nemo-minitron preprocess``: how the text is tokenised."""

    workers: int = option(1, "tokenizer processes", ge=1)
