"""What every command shares: the parallel layout, the compute dtype and the seed; and
``stage_configs``, which turns a stage API's keyword arguments into its configs."""

from __future__ import annotations

import dataclasses
from typing import Any, Generic, TypeVar

from nemo_minitron.config import DEFAULT_SEED, ComputeDtypeName, Names, build, cli_names, option, split_overrides
from nemo_minitron.data.config import DataOptions

C = TypeVar("C")


@dataclasses.dataclass
class ParallelConfig:
    """Tensor and pipeline parallel sizes; data parallel is the rest of the world size."""

    tp: int = option(1, "tensor parallel size", ge=1)
    pp: int = option(1, "pipeline parallel size", ge=1)


@dataclasses.dataclass
class RunConfig:
    seed: int = option(DEFAULT_SEED, "random seed (calibration sample choice, data order, initialisation)")
    dtype: ComputeDtypeName = option("auto", "compute dtype; auto: bfloat16 on GPUs and on CPUs with native bf16 "
                                             "matrix products (AVX-512-BF16, AMX), float32 elsewhere")


@dataclasses.dataclass
class StageConfigs(Generic[C]):
    """A stage's settings, validated: its own config, the layout, seed and dtype, how it reads
    data (None for a stage that reads none), and how errors name each of them."""

    stage: C
    parallel: ParallelConfig
    run: RunConfig
    data: DataOptions | None
    names: Names
    data_names: Names | None


def stage_configs(cls: type[C] | None, config: C | None, options: dict[str, Any], names: Names | None = None,
                  data_names: Names | None = None, *, data: bool = True) -> StageConfigs[C]:
    """The configs of a stage API call: ``config`` (or ``cls``'s defaults) with the keyword
    ``options`` that are its fields, and ``tp``, ``pp``, ``seed``, ``dtype`` (and, with
    ``data``, ``split`` and ``cache_dir``) from the rest; an unknown keyword is a TypeError.
    Errors name the stage's fields by ``names`` (its flags by default) and the data
    options by ``data_names``. ``cls`` None: a stage with no settings of its own."""
    classes = [c for c in (cls, ParallelConfig, RunConfig, DataOptions if data else None) if c is not None]
    given = dict(zip(classes, split_overrides(options, *classes)))
    names = names or cli_names(cls)
    data_names = (data_names or cli_names(DataOptions)) if data else None
    return StageConfigs(build(cls, config, names, **given[cls]) if cls is not None else None,
                        build(ParallelConfig, None, names, **given[ParallelConfig]),
                        build(RunConfig, None, names, **given[RunConfig]),
                        build(DataOptions, None, data_names, **given[DataOptions]) if data else None,
                        names, data_names)
