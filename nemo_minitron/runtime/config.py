"""What every command shares: the parallel layout, the compute dtype and the seed."""

from __future__ import annotations

import dataclasses
from typing import Optional

from nemo_minitron.config import DEFAULT_SEED, Dtype, option


@dataclasses.dataclass
class ParallelConfig:
    """Tensor and pipeline parallel sizes; data parallel is the rest of the world size."""

    tp: int = option(1, "tensor parallel size", ge=1)
    pp: int = option(1, "pipeline parallel size", ge=1)


@dataclasses.dataclass
class RunConfig:
    seed: int = option(DEFAULT_SEED, "random seed (calibration sample choice, data order, initialisation)")
    dtype: Optional[Dtype] = option(None, "compute dtype", default_text="as stored in the checkpoint")
