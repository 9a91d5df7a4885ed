"""Recipes: OmegaConf YAML validated into dataclasses at the edge.

A recipe names a model, the data, and one or more *rounds* of importance -> prune ->
distill (a chain: round 2 prunes round 1's distilled student again). Unknown keys are
errors that name the key; dotted overrides (``rounds.0.distill.steps=20``) apply on top
of the YAML. Only the schema and values are checked here; whether paths exist is
checked by each stage before it starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import MISSING

from nemo_minitron.errors import UsageError, require

AGGREGATIONS = ("mean", "l2", "var")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1


@dataclass
class ModelConfig:
    #: HF directory, .gguf file, alias (smollm2-135m), Hugging Face Hub id, or a project checkpoint.
    source: str = "???"
    #: dtype of the converted checkpoint (default: as the source stores it).
    dtype: Optional[str] = None


@dataclass
class DataConfig:
    """The data of each use, each a blend: a list of sources (``[builtin:train]``, Megatron
    prefixes, text/JSONL files or folders), Megatron's blend syntax (``[0.7, /data/a, 0.3,
    /data/b]`` or the same as one string), or a list of ``{weight: 0.7, path: /data/a}``."""

    calib: Any = MISSING
    train: Any = MISSING
    #: held-out data, read whole; may be left out when ``split`` has a validation part
    heldout: Any = None
    #: Megatron's split of every source's documents, e.g. "99,1,0": calibration and
    #: training read the first part; without ``heldout``, evaluation reads the second.
    split: Optional[str] = None
    #: tokenised text and sample indices (default $NEMO_MINITRON_DATA_CACHE or
    #: ~/.cache/nemo_minitron/data); must be visible to every node
    cache_dir: Optional[str] = None


@dataclass
class TrainingConfig:
    """Shared by distillation and by the teacher's correction (plain fine-tuning)."""

    steps: int = 100
    global_batch: int = 8
    micro_batch: int = 2
    seq_len: int = 512
    lr: float = 1e-4
    min_lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    eval_every: int = 0
    eval_samples: int = 64
    save_every: int = 0


@dataclass
class TeacherCorrectionConfig(TrainingConfig):
    enabled: bool = False


@dataclass
class ImportanceConfig:
    samples: int = 1024
    seq_len: int = 4096
    micro_batch: int = 1
    batch_agg: str = "l2"
    seq_agg: str = "mean"
    neuron_activation: str = "post"
    layer_samples: Optional[int] = None
    drop_blocks: list[int] = field(default_factory=list)


@dataclass
class PruneConfig:
    #: explicit target, any subset of hidden, ffn, heads, query_groups, layers
    target: dict[str, int] = field(default_factory=dict)
    #: or a parameter budget such as "90M" (the planner's first candidate)
    target_params: Optional[str] = None
    order: str = "importance"
    layer_metric: str = "contiguous"
    max_width_cut: float = 0.5
    max_depth_cut: float = 0.5


@dataclass
class DistillConfig(TrainingConfig):
    #: "original": the (corrected) input model teaches every round; "previous": the model
    #: the round started from teaches it.
    teacher: str = "original"
    kd_temperature: float = 1.0
    kd_loss: str = "forward"
    kd_top_k: Optional[int] = None
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    kd_pairs: list[str] = field(default_factory=list)
    kd_pair_loss: str = "cosine"
    kd_pair_weight: str = "auto"
    logit_chunk: int = 1024


@dataclass
class RoundConfig:
    name: str = ""
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class ExportConfig:
    enabled: bool = True
    dtype: str = "bfloat16"
    verify: bool = False


@dataclass
class ReportConfig:
    eval_samples: int = 256
    seq_len: int = 1024
    micro_batch: int = 4
    #: context length at which FLOPs per token are reported
    flops_seq_len: int = 4096


@dataclass
class Recipe:
    name: str = "minitron"
    output_dir: str = "runs/minitron"
    seed: int = 1234
    #: compute dtype of every stage (weights are stored in their own dtype)
    dtype: str = "bfloat16"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher_correction: TeacherCorrectionConfig = field(default_factory=TeacherCorrectionConfig)
    rounds: list[RoundConfig] = field(default_factory=lambda: [RoundConfig()])
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def _omegaconf_error(e: Exception) -> UsageError:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    msg = str(e).splitlines()[0]
    if type(e).__name__ in ("ConfigKeyError", "ConfigAttributeError") and key:
        hint = msg.split(". Did you mean: ", 1)
        return UsageError(f"unknown recipe key '{key}'" + (f" (did you mean {hint[1]})" if len(hint) == 2 else ""))
    if type(e).__name__ == "MissingMandatoryValue" and key:
        return UsageError(f"recipe key '{key}' must be set (e.g. {key}=...)")
    return UsageError(f"recipe: {f'{key}: ' if key else ''}{msg}")


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, merge overrides and validate a recipe; raise UsageError naming the bad key."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    require(path.is_file(), f"recipe '{path}' does not exist")
    for o in overrides:
        require("=" in o, f"override '{o}' is not of the form key=value")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Recipe), OmegaConf.load(path))
        for override in overrides:
            key, value = override.split("=", 1)
            # values are YAML (``steps=20``, ``data.train=[a,b]``); list indices are keys too
            OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=True)
        recipe: Recipe = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    except Exception as e:  # YAML syntax errors and the like
        raise UsageError(f"recipe '{path}': {str(e).splitlines()[0]}") from None
    validate(recipe)
    return recipe


def _choice(value: Any, allowed: Sequence[Any], key: str) -> None:
    require(value in allowed, f"recipe key '{key}' must be one of {', '.join(map(str, allowed))} (got '{value}')")


def _positive(value: Any, key: str, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    require(ok, f"recipe key '{key}' must be {'>= 0' if allow_zero else '> 0'} (got {value})")


def _validate_training(cfg: TrainingConfig, key: str) -> None:
    for name in ("steps", "global_batch", "micro_batch", "seq_len", "eval_samples"):
        _positive(getattr(cfg, name), f"{key}.{name}")
    for name in ("eval_every", "save_every", "weight_decay", "clip_grad"):
        _positive(getattr(cfg, name), f"{key}.{name}", allow_zero=True)
    _positive(cfg.lr, f"{key}.lr")
    require(cfg.global_batch % cfg.micro_batch == 0,
            f"recipe key '{key}.global_batch' ({cfg.global_batch}) must be a multiple of "
            f"'{key}.micro_batch' ({cfg.micro_batch})")


def validate(recipe: Recipe) -> None:
    """Value checks that need no files (sizes, choices, consistency)."""
    require(recipe.model.source not in ("", "???"), "recipe key 'model.source' must be set")
    _choice(recipe.dtype, DTYPES, "dtype")
    if recipe.model.dtype is not None:
        _choice(recipe.model.dtype, DTYPES, "model.dtype")
    _positive(recipe.parallel.tp, "parallel.tp")
    _positive(recipe.parallel.pp, "parallel.pp")
    from nemo_minitron.data.blend import blend_words, split_fractions

    fractions = split_fractions(recipe.data.split, "data.split")
    for use in ("calib", "train", "heldout"):
        value = getattr(recipe.data, use)
        if use == "heldout" and value is None:
            require(fractions is not None and fractions[1] > 0, "recipe key 'data.heldout' must be set, or "
                                                                "'data.split' given a validation part (e.g. 99,1,0)")
            continue
        blend_words(value, f"data.{use}")
    if fractions is not None:
        require(fractions[0] > 0, f"recipe key 'data.split' ({recipe.data.split}) leaves no training part")
    if recipe.teacher_correction.enabled:
        _validate_training(recipe.teacher_correction, "teacher_correction")
    require(len(recipe.rounds) >= 1, "recipe key 'rounds' needs at least one round")
    for i, rnd in enumerate(recipe.rounds):
        key = f"rounds.{i}"
        imp = rnd.importance
        _positive(imp.samples, f"{key}.importance.samples")
        _positive(imp.seq_len, f"{key}.importance.seq_len")
        _positive(imp.micro_batch, f"{key}.importance.micro_batch")
        _choice(imp.batch_agg, AGGREGATIONS, f"{key}.importance.batch_agg")
        _choice(imp.seq_agg, AGGREGATIONS, f"{key}.importance.seq_agg")
        _choice(imp.neuron_activation, ("post", "pre"), f"{key}.importance.neuron_activation")
        pr = rnd.prune
        require(bool(pr.target) != (pr.target_params is not None),
                f"recipe key '{key}.prune': set exactly one of 'target' and 'target_params'")
        for axis, value in pr.target.items():
            _choice(axis, ("hidden", "ffn", "heads", "query_groups", "layers"), f"{key}.prune.target.{axis}")
            _positive(value, f"{key}.prune.target.{axis}")
        _choice(pr.order, ("importance", "magnitude", "random"), f"{key}.prune.order")
        _validate_training(rnd.distill, f"{key}.distill")
        _choice(rnd.distill.teacher, ("original", "previous"), f"{key}.distill.teacher")
        _choice(rnd.distill.kd_loss, ("forward", "reverse"), f"{key}.distill.kd_loss")
        _positive(rnd.distill.kd_temperature, f"{key}.distill.kd_temperature")
        if not rnd.name:
            rnd.name = f"round{i + 1}"
    _choice(recipe.export.dtype, DTYPES, "export.dtype")
    _positive(recipe.report.eval_samples, "report.eval_samples")
    _positive(recipe.report.seq_len, "report.seq_len")


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)
