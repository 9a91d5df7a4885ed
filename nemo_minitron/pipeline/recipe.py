"""Recipes: OmegaConf YAML validated into dataclasses at the edge.

A recipe names a model, the data, and one or more *rounds* of importance -> prune ->
distill (a chain: round 2 prunes round 1's distilled student again); a round may add a
``sparsify`` stage before or after its distillation. Unknown keys are
errors that name the key; dotted overrides (``rounds.0.distill.steps=20``) apply on top
of the YAML. Only the schema and values are checked here; whether paths exist is
checked by each stage before it starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_minitron.config import DEFAULT_SEQ_LEN, Dtype, Names, flatten, nearest_key, option, recipe_names
from nemo_minitron.config import validate as validate_config
from nemo_minitron.data.blend import blend_words, split_fractions
from nemo_minitron.data.config import DataOptions
from nemo_minitron.distill.config import DistillConfig, TrainingConfig
from nemo_minitron.errors import UsageError, require
from nemo_minitron.generate.config import GenerateConfig
from nemo_minitron.importance.config import ImportanceConfig
from nemo_minitron.prune.config import PruneConfig
from nemo_minitron.runtime.config import ParallelConfig, RunConfig
from nemo_minitron.search.config import SearchConfig
from nemo_minitron.sparsity.config import SparsifyConfig
from nemo_minitron.tasks.builtin import BUILTIN_TASKS


@dataclass
class ModelConfig:
    source: str = option("???", "HF directory, .gguf file, alias (smollm2-135m), Hugging Face Hub id, a project "
                                "checkpoint, a Megatron-LM / Megatron-Bridge checkpoint directory or a NeMo 2 "
                                "checkpoint")
    iteration: Optional[int] = option(None, "with a Megatron-LM / Megatron-Bridge directory: the iteration to read",
                                      ge=0, default_text="the latest")
    dtype: Optional[Dtype] = option(None, "dtype of the converted checkpoint", default_text="as the source stores it")


@dataclass
class DataConfig(DataOptions):
    """The data of each use, each a blend: a list of sources (``[builtin:train]``, Megatron
    prefixes, text/JSONL files or folders), Megatron's blend syntax (``[0.7, /data/a, 0.3,
    /data/b]`` or the same as one string), or a list of ``{weight: 0.7, path: /data/a}``.
    With ``split``, calibration and training read the first part of every source."""

    calib: Any = MISSING
    train: Any = MISSING
    #: held-out data, read whole; may be left out when ``split`` has a validation part (read then)
    heldout: Optional[Any] = None

    def check(self, names) -> None:
        fractions = split_fractions(self.split, names("split"))
        for use in ("calib", "train", "heldout"):
            value = getattr(self, use)
            if use == "heldout" and value is None:
                require(fractions is not None and fractions[1] > 0,
                        f"{names('heldout')} must be set, or {names('split')} given a validation part (e.g. 99,1,0)")
                continue
            blend_words(value, f"data.{use}")
        if fractions is not None:
            require(fractions[0] > 0, f"{names('split')} ({self.split}) leaves no training part")


@dataclass
class TeacherCorrectionConfig(TrainingConfig):
    """The teacher fine-tuned (cross-entropy) on the training data before it teaches."""

    enabled: bool = option(False, "correct the teacher first")


@dataclass
class RoundDistillConfig(DistillConfig):
    teacher: Literal["original", "previous"] = option(
        "original", "who teaches: the (corrected) input model (original) or the model the round started from "
                    "(previous)")


@dataclass
class SyntheticDataConfig(GenerateConfig):
    """The teacher's generations a round trains on when ``distill.method`` is synthetic or
    both: completions of prompts, written by ``generate``. Sampled by default (greedy
    continuations of a base model repeat themselves)."""

    prompts: Optional[str] = option(None, "a prompts file (JSONL with prompt or messages, or text lines)",
                                    default_text="prefixes of data.train (prefix_tokens long)")
    prefix_tokens: Optional[int] = option(32, "without prompts: the first N tokens of samples of data.train", ge=2)
    limit: Optional[int] = option(256, "prompts to complete", ge=1)
    max_new_tokens: int = option(224, "new tokens per prompt at most", ge=1)
    temperature: float = option(1.0, "0: greedy decoding; > 0: sample at this temperature", ge=0)
    top_p: float = option(0.95, "sample from the smallest set of tokens with this probability (0: off)", ge=0,
                          le=1)

    def check(self, names) -> None:
        super().check(names)
        require(self.prompts is not None or self.prefix_tokens is not None,
                f"{names('prefix_tokens')} must be set when {names('prompts')} is not")


@dataclass
class RoundSparsifyConfig(SparsifyConfig):
    """One-shot sparsity of the round's model, on the calibration data (``data.calib``)."""

    at: Literal["before_distill", "after_distill"] = option(
        "before_distill", "before_distill: sparsify the pruned model and distil it with its masks kept (the loss "
                          "lost to sparsity is trained back); after_distill: sparsify the distilled model (one-shot "
                          "only)")


@dataclass
class RoundConfig:
    name: str = ""
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    #: an architecture search instead of prune's fixed target: its winner is the round's
    #: pruned model, which ``distill`` then distils (from the pruned weights)
    search: Optional[SearchConfig] = None
    distill: RoundDistillConfig = field(default_factory=RoundDistillConfig)
    #: generation settings, used when distill.method is synthetic or both
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    #: optional 2:4 / unstructured sparsity before or after the round's distillation
    sparsify: Optional[RoundSparsifyConfig] = None


@dataclass
class ExportConfig:
    enabled: bool = option(True, "export the last student to Hugging Face")
    dtype: Optional[Dtype] = option(None, "dtype of the exported weights", default_text="as stored")
    verify: bool = option(False, "reload the export with transformers and compare logits")


@dataclass
class ReportConfig:
    eval_samples: int = option(256, "held-out samples every model of the run is evaluated on", ge=1)
    seq_len: int = option(1024, "tokens per held-out sample", ge=1)
    micro_batch: int = option(4, "samples per forward pass", ge=1)
    flops_seq_len: int = option(DEFAULT_SEQ_LEN, "context length at which FLOPs per token are reported", ge=1)
    tasks: list[str] = option(list(BUILTIN_TASKS), "downstream tasks every model of the run is scored on, through "
                                                   "lm-evaluation-harness (the built-in ones need no download; [] "
                                                   "for none)")
    task_limit: Optional[int] = option(100, "examples per task (none: all)", ge=1)
    tasks_path: Optional[str] = option(None, "folder of local lm-eval task definitions (YAML)", default_text="none")
    num_fewshot: Optional[int] = option(None, "few-shot examples", ge=0, default_text="the task's, else 0")


@dataclass
class Recipe(RunConfig):
    name: str = "minitron"
    output_dir: str = "runs/minitron"
    #: check (default): a stage finished, or a training run checkpointed, under other settings
    #: than the recipe's now is refused; force: continue anyway (the new settings apply).
    resume: Literal["check", "force"] = "check"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher_correction: TeacherCorrectionConfig = field(default_factory=TeacherCorrectionConfig)
    rounds: list[RoundConfig] = field(default_factory=lambda: [RoundConfig()])
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def _known_keys() -> list[str]:
    """Every dotted key of the schema (with one round), for suggestions."""
    return sorted(flatten(dataclasses.asdict(Recipe(rounds=[RoundConfig(search=SearchConfig(),
                                                                        sparsify=RoundSparsifyConfig())]))))


def _dotted(key: str) -> str:
    return key.replace("[", ".").replace("]", "")


def _omegaconf_error(e: Exception, attempted: str | None = None, given: Any = None) -> UsageError:
    """One line naming the recipe key. ``given``: the YAML as read, to find the full key of
    an error OmegaConf reports inside a list item (``distill.steps`` of ``rounds.0``)."""
    key = _full_key(_dotted(str(getattr(e, "full_key", None) or getattr(e, "key", None) or "")),
                    getattr(e, "value", None), given)
    msg = str(e).splitlines()[0]
    name = type(e).__name__
    if name in ("ConfigKeyError", "ConfigAttributeError") and key:
        wanted = attempted or key
        near = nearest_key(wanted, _known_keys())
        return UsageError(f"unknown recipe key '{wanted}'" + (f" (did you mean '{near}'?)" if near else ""))
    if name == "MissingMandatoryValue" and key:
        return UsageError(f"recipe key '{key}' must be set (e.g. {key}=...)")
    if name == "ValidationError" and "expected one of" in msg:
        value = msg.split("Invalid value ", 1)[-1].split(",", 1)[0]
        allowed = msg.split("expected one of ", 1)[1].strip("[]").replace("'", "")
        return UsageError(f"recipe key '{key}' must be one of {allowed} (got {value})")
    return UsageError(f"recipe key '{key}': {msg}" if key else f"recipe: {msg}")


def _full_key(key: str, value: Any, given: Any) -> str:
    """``key`` as the recipe spells it: the one key of ``given`` that ends with it and holds ``value``."""
    if not key or given is None:
        return key
    written = flatten(OmegaConf.to_container(given, resolve=False))
    matches = [k for k, v in written.items() if (k == key or k.endswith("." + key)) and str(v) == str(value)]
    return matches[0] if len(matches) == 1 else key


def _yaml_error(path: Path, e: Exception) -> UsageError:
    """A YAML syntax error as FILE:LINE:COLUMN and the parser's words, on one line."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    words = [getattr(e, "context", None), getattr(e, "problem", None)]
    message = ", ".join(w for w in words if w) if any(words) else str(e).splitlines()[0]
    return UsageError(f"recipe {where}: {message}")


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, merge overrides and validate a recipe; raise UsageError naming the bad key."""
    path = Path(path)
    require(path.is_file(), f"recipe '{path}' does not exist")
    for o in overrides:
        require("=" in o, f"override '{o}' is not of the form key=value")
    try:
        given = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise _yaml_error(path, e) from None
    except Exception as e:  # an unreadable file and the like
        raise UsageError(f"recipe '{path}': {str(e).splitlines()[0]}") from None
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Recipe), given)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, given=given) from None
    for override in overrides:
        key, value = override.split("=", 1)
        try:
            # values are YAML (``steps=20``, ``data.train=[a,b]``); list indices are keys too
            parsed = yaml.safe_load(value) if value else None
        except yaml.YAMLError as e:
            raise UsageError(f"override '{override}': not a YAML value ({str(e).splitlines()[0]})") from None
        try:
            OmegaConf.update(cfg, key, parsed, merge=True)
        except OmegaConfBaseException as e:
            raise _omegaconf_error(e, attempted=key) from None
    try:
        recipe: Recipe = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    """Value checks that need no files (sizes, choices, consistency), naming the recipe key."""
    require(recipe.model.source not in ("", "???"), "recipe key 'model.source' must be set")
    validate_config(recipe.model, recipe_names("model"))
    validate_config(recipe.parallel, recipe_names("parallel"))
    validate_config(recipe, _TopLevelNames())
    validate_config(recipe.data, recipe_names("data"))
    if recipe.teacher_correction.enabled:
        validate_config(recipe.teacher_correction, recipe_names("teacher_correction"))
    require(len(recipe.rounds) >= 1, "recipe key 'rounds' needs at least one round")
    for i, rnd in enumerate(recipe.rounds):
        stages = ("importance", "prune", "distill")
        if rnd.search is not None:
            require(rnd.prune == PruneConfig(), f"recipe key 'rounds.{i}.search' replaces 'rounds.{i}.prune': remove "
                                                f"it (the search prunes by importance; set layer_metric and the "
                                                f"planner's limits under rounds.{i}.search)")
            stages = ("importance", "search", "distill")
        if rnd.distill.method != "logits":
            stages += ("synthetic",)
        if rnd.sparsify is not None:
            stages += ("sparsify",)
        for stage in stages:
            validate_config(getattr(rnd, stage), recipe_names(f"rounds.{i}.{stage}"))
        pruning = rnd.search or rnd.prune  # the stage that prunes this round, and its key
        pruner = "prune" if rnd.search is None else "search"
        if pruning.per_layer:
            key = f"recipe key 'rounds.{i}.{pruner}.per_layer'"
            require(rnd.importance.block_variants, f"{key} chooses from block-variant scores: set "
                                                   f"'rounds.{i}.importance.block_variants: true'")
            require(i == len(recipe.rounds) - 1, f"{key}: a per-layer model is not pruned again; make it the last "
                                                 "round")
            require(rnd.sparsify is None, f"{key}: sparsify a uniform round (rounds.{i}.sparsify with per-layer "
                                          "shapes is not supported)")
        if pruning.refit:  # what prune (or search) would refuse once importance has run
            key = f"recipe key 'rounds.{i}.{pruner}.refit'"
            require(rnd.importance.second_moments, f"{key} solves with the second moments: set "
                                                   f"'rounds.{i}.importance.second_moments: true' (auto collects "
                                                   "them only where they fit), or leave refit auto")
            require(not (pruning.per_layer and rnd.importance.block_distill_steps),
                    f"{key} with 'rounds.{i}.{pruner}.per_layer': 'rounds.{i}.importance.block_distill_steps' trains "
                    "the variants that replace the pruned weights refit would repair; drop one")
        if not rnd.name:
            rnd.name = f"round{i + 1}"
    validate_config(recipe.export, recipe_names("export"))
    validate_config(recipe.report, recipe_names("report"))


class _TopLevelNames(Names):
    def __call__(self, name: str) -> str:
        return f"recipe key '{name}'"


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)
