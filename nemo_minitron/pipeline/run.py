"""``nemo-minitron run RECIPE.yaml``: the whole Minitron pipeline, one directory per stage.

    OUT/00-convert                 project checkpoint of the input model
    OUT/01-teacher-correction      (optional) the teacher fine-tuned on the training data
    OUT/<round>-1-importance       importance scores, plots
    OUT/<round>-2-prune            pruned checkpoint
    OUT/<round>-2-search           or, with a search: every candidate's result, the winner in best/
    OUT/<round>-3-synthetic        with distill.method synthetic/both: the teacher's generations
    OUT/<round>-2b-sparsify        with sparsify.at before_distill: the pruned model made sparse
    OUT/<round>-3-distill          distilled student (final/), metrics, checkpoints
    OUT/<round>-4-sparsify         with sparsify.at after_distill: the distilled model made sparse
    OUT/export                     Hugging Face directory of the last student
    OUT/report                     report.md, report.json, plots

A stage whose output is complete is skipped, so a killed run started again resumes
where it stopped (distillation itself resumes from its last checkpoint). Everything is
validated before the first stage starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from nemo_minitron.checkpoint import api as checkpoint_api
from nemo_minitron.checkpoint.api import describe_model
from nemo_minitron.checkpoint.megatron_layout import model_path
from nemo_minitron.checkpoint.store import is_checkpoint, parse_dtype
from nemo_minitron.config import check_resume, log_settings, recipe_names, resume_safe_fields, to_dict, yaml_text
from nemo_minitron.distill import api as distill_api
from nemo_minitron.distill.config import DistillConfig
from nemo_minitron.errors import require
from nemo_minitron.files import check_output_dir
from nemo_minitron.generate import api as generate_api
from nemo_minitron.generate.config import GenerateConfig
from nemo_minitron.importance import api as importance_api
from nemo_minitron.importance.config import ImportanceConfig
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.pipeline.corpora import data_corpus
from nemo_minitron.pipeline.recipe import Recipe, RoundConfig
from nemo_minitron.pipeline.report import write_report
from nemo_minitron.prune import api as prune_api
from nemo_minitron.prune.api import planned_description
from nemo_minitron.prune.per_layer import check_per_layer_budget
from nemo_minitron.prune.config import PruneConfig
from nemo_minitron.runtime.distributed import barrier, check_world_size, init_distributed, is_rank0
from nemo_minitron.runtime.precision import log_compute_dtype, resolve_dtype
from nemo_minitron.runtime.signals import received, stop_requested
from nemo_minitron.search import api as search_api
from nemo_minitron.search.api import RESULT
from nemo_minitron.search.candidates import search_candidates
from nemo_minitron.search.config import SearchConfig
from nemo_minitron.sparsity import api as sparsity_api
from nemo_minitron.sparsity.api import target_weights
from nemo_minitron.sparsity.config import SparsifyConfig
from nemo_minitron.tasks.api import resolve_tasks

log = logging.getLogger("nemo_minitron")

STAGES_FILE = "stages.json"
#: the runs of stages a stop signal ended (their wall time counts towards the stage's total)
SEGMENTS_FILE = "stages-unfinished.json"
SYNTHETIC_FILE = "completions.jsonl"
FORCE_HINT = "resume=force (or run --force)"


@dataclasses.dataclass
class Stage:
    name: str
    directory: Path
    is_done: Callable[[Path], bool]
    work: Callable[[Path], dict[str, Any]]  # returns stats such as {"tokens": n}
    #: the recipe keys (dotted, as the user writes them) this stage's output depends on
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunPaths:
    """Where every stage of a recipe writes; also what the report reads."""

    root: Path
    recipe: Recipe

    @property
    def convert(self) -> Path:
        return self.root / "00-convert"

    @property
    def teacher_correction(self) -> Path:
        return self.root / "01-teacher-correction"

    def importance(self, i: int) -> Path:
        return self.root / f"{self.recipe.rounds[i].name}-1-importance"

    def prune(self, i: int) -> Path:
        """The round's pruned checkpoint: its prune stage's, or its search's winner."""
        if self.recipe.rounds[i].search is not None:
            return self.search(i) / "best" / "pruned"
        return self.root / f"{self.recipe.rounds[i].name}-2-prune"

    def search(self, i: int) -> Path:
        return self.root / f"{self.recipe.rounds[i].name}-2-search"

    def synthetic(self, i: int) -> Path:
        """The round's generated training data (``completions.jsonl`` inside)."""
        return self.root / f"{self.recipe.rounds[i].name}-3-synthetic"

    def distill(self, i: int) -> Path:
        return self.root / f"{self.recipe.rounds[i].name}-3-distill"

    def sparsify(self, i: int) -> Path | None:
        """The round's sparse checkpoint (None: the round has no sparsify stage)."""
        rnd = self.recipe.rounds[i]
        if rnd.sparsify is None:
            return None
        return self.root / f"{rnd.name}-{'2b' if rnd.sparsify.at == 'before_distill' else '4'}-sparsify"

    def distill_student(self, i: int) -> Path:
        """What the round distils: the pruned model, or its sparse version."""
        rnd = self.recipe.rounds[i]
        return self.sparsify(i) if rnd.sparsify is not None and rnd.sparsify.at == "before_distill" \
            else self.prune(i)

    def round_output(self, i: int) -> Path:
        """The round's final model: the distilled student, or its sparse version."""
        rnd = self.recipe.rounds[i]
        return self.sparsify(i) if rnd.sparsify is not None and rnd.sparsify.at == "after_distill" \
            else self.distill(i) / "final"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def report(self) -> Path:
        return self.root / "report"

    # ---------------------------------------------------------------- checkpoints
    def input_checkpoint(self) -> Path:
        source = self.recipe.model.source
        return Path(source) if is_checkpoint(source) else self.convert

    def teacher(self) -> Path:
        tc = self.recipe.teacher_correction
        return self.teacher_correction / "final" if tc.enabled else self.input_checkpoint()

    def round_input(self, i: int) -> Path:
        return self.teacher() if i == 0 else self.round_output(i - 1)

    def round_teacher(self, i: int) -> Path:
        return self.teacher() if self.recipe.rounds[i].distill.teacher == "original" else self.round_input(i)

    def student(self) -> Path:
        return self.round_output(len(self.recipe.rounds) - 1)


# -------------------------------------------------------------------- validation
def preflight(recipe: Recipe, paths: RunPaths) -> list:
    """Check every input before any work: source, data, layout, targets of every round.
    Returns the model description after each round (the planned architectures)."""
    recipe.model.source = model_path(recipe.model.source, recipe.model.iteration, "recipe key 'model.source'",
                                     "recipe key 'model.iteration'")
    resolve_dtype(recipe.dtype, "recipe key 'dtype'")
    done = paths.input_checkpoint() if paths.convert.exists() else None
    desc = describe_model(str(done or recipe.model.source), flag="model.source")
    corpora = {use: data_corpus(recipe, use, vocab_size=desc.vocab_size) for use in ("calib", "train", "heldout")}
    if corpora["heldout"] is None:  # every evaluation reads the validation part of data.train
        corpora["train"].check_parts("valid", eval_flag="data.heldout")
    tp, pp = recipe.parallel.tp, recipe.parallel.pp
    desc.check_layout(tp, pp)
    check_world_size(tp, pp)
    descriptions = [desc]
    for i, rnd in enumerate(recipe.rounds):
        if (rnd.search or rnd.prune).per_layer:  # the shapes follow from the scores; the budget is checked now
            stage = "prune" if rnd.search is None else "search"
            check_per_layer_budget(desc, rnd.importance, getattr(rnd, stage), tp, recipe_names(f"rounds.{i}.{stage}"))
        if rnd.search is not None:
            desc = _searched_description(desc, rnd, paths.search(i), tp, pp, recipe_names(f"rounds.{i}.search"))
        elif not rnd.prune.per_layer:
            desc = planned_description(desc, rnd.prune, tp=tp, pp=pp, names=recipe_names(f"rounds.{i}.prune"))
        descriptions.append(desc)
        lengths = [("importance.seq_len", rnd.importance.seq_len), ("distill.seq_len", rnd.distill.seq_len)]
        if rnd.sparsify is not None:  # the pattern fits the round's model at this layout
            target_weights(desc, rnd.sparsify, tp, recipe_names(f"rounds.{i}.sparsify"))
            lengths.append(("sparsify.seq_len", rnd.sparsify.seq_len))
        if rnd.search is not None:
            lengths.append(("search.seq_len", rnd.search.seq_len))
        if rnd.distill.method != "logits":  # the round teacher generates: prompts and context checked now
            g, names = rnd.synthetic, recipe_names(f"rounds.{i}.synthetic")
            if g.prompts is not None:
                require(Path(g.prompts).is_file(), f"{names('prompts')} '{g.prompts}' does not exist")
            else:
                lengths.append(("synthetic.prefix_tokens + max_new_tokens", g.prefix_tokens + g.max_new_tokens))
        for key, model in lengths:
            value = model
            limit = min(d.max_position_embeddings for d in descriptions)
            require(value <= limit, f"recipe key 'rounds.{i}.{key}' ({value}) exceeds the models' "
                                    f"max_position_embeddings ({limit})")
    if recipe.report.tasks:
        resolve_tasks(recipe.report.tasks, recipe.report.tasks_path, flag="recipe key 'report.tasks'",
                      path_flag="recipe key 'report.tasks_path'")
    check_output_dir(recipe.output_dir, "recipe key 'output_dir'")
    return descriptions


def _searched_description(desc, rnd: RoundConfig, directory: Path, tp: int, pp: int, names):
    """The round's result shape: the winner of a finished search; before that, the first
    candidate stands in (for the checks of later rounds; a per-layer search, the last
    round, may have only per-layer ones, known after the importance run: the parent stands
    in). Raises when no candidate meets the budget."""
    candidates = search_candidates(desc, rnd.search, tp=tp, pp=pp, names=names)
    if (directory / RESULT).is_file():
        result = json.loads((directory / RESULT).read_text())
        best = next(c for c in result["candidates"] if c["name"] == result["best"])
        return ModelDescription.from_dict(best["architecture"])
    return candidates[0].description if candidates else desc


# -------------------------------------------------------------------- stages
def _stages(recipe: Recipe, paths: RunPaths) -> list[Stage]:
    tp, pp, seed = recipe.parallel.tp, recipe.parallel.pp, recipe.seed
    data = recipe.data
    runtime = dict(tp=tp, pp=pp, seed=seed, dtype=recipe.dtype, split=data.split, cache_dir=data.cache_dir,
                   data_names=recipe_names("data"))
    force = recipe.resume == "force"
    stages: list[Stage] = []

    if not is_checkpoint(recipe.model.source):
        def convert(out: Path) -> dict:
            dtype = parse_dtype(recipe.model.dtype, "model.dtype") if recipe.model.dtype else None
            checkpoint_api.convert(recipe.model.source, str(out), tp=tp, pp=pp, dtype=dtype, seed=seed)
            return {}
        stages.append(Stage("convert", paths.convert, is_checkpoint, convert, {"model": to_dict(recipe.model)}))

    tc = recipe.teacher_correction
    if tc.enabled:
        def correct(out: Path) -> dict:
            return _training_stats(distill_api.finetune(str(paths.input_checkpoint()), data.train, str(out), tc,
                                                        eval_data=data.heldout, force=force,
                                                        names=recipe_names("teacher_correction"),
                                                        force_hint=FORCE_HINT, **runtime))
        stages.append(Stage("teacher-correction", paths.teacher_correction, _distill_done, correct,
                            {"teacher_correction": to_dict(tc), "data.train": data.train, "data.heldout": data.heldout,
                             "data.split": data.split, "seed": seed, "dtype": recipe.dtype}))

    for i, rnd in enumerate(recipe.rounds):
        stages += _round_stages(recipe, paths, i, rnd)

    if recipe.export.enabled:
        def export(out: Path) -> dict:
            dtype = parse_dtype(recipe.export.dtype, "export.dtype") if recipe.export.dtype else None
            checkpoint_api.export(str(paths.student()), str(out), tp=tp, pp=pp, dtype=dtype, seed=seed,
                                  verify=recipe.export.verify)
            return {}
        stages.append(Stage("export", paths.export, lambda p: (p / "config.json").is_file(), export,
                            {"export": to_dict(recipe.export)}))

    def report(out: Path) -> dict:
        stopped = write_report(recipe, paths, out)
        return {"stopped": stopped} if stopped else {}
    stages.append(Stage("report", paths.report, lambda p: (p / "report.md").is_file(), report,
                        {"report": to_dict(recipe.report), "data.heldout": data.heldout}))
    return stages


def _training_stats(result) -> dict[str, Any]:
    """A training stage's stats: the tokens it trained on, or the signal that stopped it."""
    if result.status == "stopped":
        return {"stopped": result.signal}
    return {"tokens": result.summary["tokens"]}


def _distill_done(path: Path) -> bool:
    return (path / "summary.json").is_file() and (path / "final").is_dir()


def _search_done(path: Path) -> bool:
    return (path / RESULT).is_file() and is_checkpoint(path / "best" / "pruned")


def _round_stages(recipe: Recipe, paths: RunPaths, i: int, rnd: RoundConfig) -> list[Stage]:
    data, seed = recipe.data, recipe.seed
    runtime = dict(tp=recipe.parallel.tp, pp=recipe.parallel.pp, seed=seed, dtype=recipe.dtype)
    # data.split and data.cache_dir reach every stage that reads data (they are in its stage keys)
    data_runtime = dict(split=data.split, cache_dir=data.cache_dir, data_names=recipe_names("data"))
    key = f"rounds.{i}"

    def importance(out: Path) -> dict:
        scores = importance_api.compute_importance(str(paths.round_input(i)), data.calib, str(out), rnd.importance,
                                                   names=recipe_names(f"{key}.importance"), **runtime,
                                                   **data_runtime)
        return {"tokens": int(scores.summary.get("tokens", 0))}

    def prune(out: Path) -> dict:
        prune_api.prune(str(paths.round_input(i)), str(paths.importance(i)), str(out), rnd.prune,
                        names=recipe_names(f"{key}.prune"), tp=recipe.parallel.tp, pp=recipe.parallel.pp, seed=seed)
        return {}

    def distill(out: Path) -> dict:
        d = rnd.distill
        config = DistillConfig(**{f.name: getattr(d, f.name) for f in dataclasses.fields(DistillConfig)})
        # method synthetic trains on the generations alone; data.train then only provides the
        # held-out part under data.split
        synthetic = [str(paths.synthetic(i) / SYNTHETIC_FILE)] if d.method != "logits" else None
        return _training_stats(distill_api.distill(str(paths.round_teacher(i)), str(paths.distill_student(i)),
                                                   data.train,
                                                   str(out), config, eval_data=data.heldout,
                                                   force=recipe.resume == "force",
                                                   names=recipe_names(f"{key}.distill"), force_hint=FORCE_HINT,
                                                   synthetic_data=synthetic, **runtime, **data_runtime))

    def generate(out: Path) -> dict:
        g = rnd.synthetic
        config = GenerateConfig(**{f.name: getattr(g, f.name) for f in dataclasses.fields(GenerateConfig)})
        source = dict(prompts=g.prompts) if g.prompts else dict(data=data.train)
        if g.prompts:
            config.prefix_tokens = None
        if is_rank0():
            out.mkdir(parents=True, exist_ok=True)
        barrier()
        generate_api.generate(str(paths.round_teacher(i)), str(out / SYNTHETIC_FILE), config,
                              names=recipe_names(f"{key}.synthetic"), **source, **runtime, **data_runtime)
        return {}

    def search(out: Path) -> dict:
        result = search_api.search(str(paths.round_input(i)), str(paths.importance(i)), data.train, str(out),
                                   rnd.search, teacher=str(paths.round_teacher(i)), eval_data=data.heldout,
                                   force=recipe.resume == "force", names=recipe_names(f"{key}.search"),
                                   force_hint=FORCE_HINT, **runtime, **data_runtime)
        steps = sum(c["stopped_at"] or result["steps"] for c in result["candidates"])  # over all candidates
        return {"tokens": steps * rnd.search.global_batch * rnd.search.seq_len}

    def sparsify(out: Path) -> dict:
        source = paths.prune(i) if rnd.sparsify.at == "before_distill" else paths.distill(i) / "final"
        sparsity_api.sparsify(str(source), str(out), data.calib, rnd.sparsify, names=recipe_names(f"{key}.sparsify"),
                              **runtime, **data_runtime)
        return {"tokens": rnd.sparsify.samples * rnd.sparsify.seq_len if rnd.sparsify.needs_data else 0}

    common = {"seed": seed, "dtype": recipe.dtype}
    if rnd.search is not None:
        pick = Stage(f"{rnd.name}-search", paths.search(i), _search_done, search,
                     {f"{key}.search": to_dict(rnd.search), "data.train": data.train, "data.heldout": data.heldout,
                      "data.split": data.split, **common})
    else:
        pick = Stage(f"{rnd.name}-prune", paths.prune(i), is_checkpoint, prune,
                     {f"{key}.prune": to_dict(rnd.prune), "seed": seed})
    generation = []
    if rnd.distill.method != "logits":
        generation = [Stage(f"{rnd.name}-synthetic", paths.synthetic(i), lambda p: (p / SYNTHETIC_FILE).is_file(),
                            generate, {f"{key}.synthetic": to_dict(rnd.synthetic), f"{key}.distill.teacher":
                                       rnd.distill.teacher, "data.train": data.train, "data.split": data.split,
                                       **common})]
    sparse = []
    if rnd.sparsify is not None:
        sparse = [Stage(f"{rnd.name}-sparsify", paths.sparsify(i), is_checkpoint, sparsify,
                        {f"{key}.sparsify": to_dict(rnd.sparsify), "data.calib": data.calib,
                         "data.split": data.split, **common})]
    before = sparse if rnd.sparsify is not None and rnd.sparsify.at == "before_distill" else []
    after = sparse if not before else []
    return [
        Stage(f"{rnd.name}-importance", paths.importance(i), lambda p: (p / "scores.safetensors").is_file(),
              importance, {f"{key}.importance": to_dict(rnd.importance), "data.calib": data.calib,
                           "data.split": data.split, **common}),
        pick,
        *before,
        *generation,
        Stage(f"{rnd.name}-distill", paths.distill(i), _distill_done, distill,
              {f"{key}.distill": to_dict(rnd.distill), "data.train": data.train, "data.heldout": data.heldout,
               "data.split": data.split, **common}),
        *after,
    ]


# -------------------------------------------------------------------- runner
def _update(file: Path, name: str, entry: Any) -> None:
    """Rank 0: set (or, with None, remove) ``name`` in the JSON mapping ``file``, atomically."""
    if not is_rank0():
        return
    records = json.loads(file.read_text()) if file.is_file() else {}
    if entry is None:
        if name not in records:
            return
        del records[name]
    else:
        records[name] = entry
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=2))
    tmp.replace(file)


def _segments(root: Path, name: str) -> list[dict[str, Any]]:
    file = root / SEGMENTS_FILE
    return json.loads(file.read_text()).get(name, []) if file.is_file() else []


def _finished_entry(stage: Stage, wall: float, tokens: int, earlier: list[dict[str, Any]]) -> dict[str, Any]:
    """A finished stage's record: its wall time summed over every run of it (a stage a stop
    signal ended continues when started again) and tokens/s over that total."""
    total = wall + sum(s["wall_seconds"] for s in earlier)
    return {"directory": str(stage.directory), "wall_seconds": round(total, 2), "runs": len(earlier) + 1,
            "tokens": tokens, "tokens_per_second": round(tokens / total, 1) if tokens else None,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "config": to_plain(stage.config)}


def check_finished_stages(recipe: Recipe, root: Path, stages: list[Stage]) -> dict[str, list[str]]:
    """A finished stage was made with the recipe's settings of that time; refuse to build on it
    when they changed (naming the keys), unless ``resume=force``. Returns the accepted changes."""
    file = root / STAGES_FILE
    records = json.loads(file.read_text()) if file.is_file() else {}
    safe = resume_safe_fields(ImportanceConfig, PruneConfig, DistillConfig, SearchConfig, SparsifyConfig)
    accepted = {}
    for stage in stages:
        saved = records.get(stage.name, {}).get("config")
        if saved is None or not stage.is_done(stage.directory):
            continue
        changed = check_resume(saved, to_plain(stage.config), what=f"stage {stage.name} ({stage.directory})",
                               force=recipe.resume == "force", force_hint=FORCE_HINT, ignore=safe)
        if changed:
            accepted[stage.name] = changed
    return accepted


def to_plain(tree: Any) -> Any:
    return json.loads(json.dumps(tree, default=str))


def _save_recipe(root: Path, recipe: Recipe) -> None:
    """``recipe.yaml``: the resolved recipe of the latest start; an earlier, different one is
    kept as ``recipe.previous-N.yaml``."""
    text = yaml_text(to_plain(dataclasses.asdict(recipe)))
    file = root / "recipe.yaml"
    if file.is_file() and file.read_text() != text:
        n = len(list(root.glob("recipe.previous-*.yaml"))) + 1
        file.replace(root / f"recipe.previous-{n}.yaml")
    tmp = root / ".recipe.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(file)


def run_recipe(recipe: Recipe) -> Path | None:
    """Run (or resume) every stage of the recipe; returns the report directory, or None when
    a stop signal (SIGTERM, SIGUSR1) ended the run early (started again, it continues)."""
    root = Path(recipe.output_dir)
    paths = RunPaths(root, recipe)
    descriptions = preflight(recipe, paths)
    stages = _stages(recipe, paths)
    accepted = check_finished_stages(recipe, root, stages)
    init_distributed(recipe.parallel.tp, recipe.parallel.pp, recipe.seed)
    if is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        _save_recipe(root, recipe)
        chain = " -> ".join(f"{d.num_parameters() / 1e6:.1f}M" for d in descriptions)
        log_settings(log, f"recipe {recipe.name}: {recipe.model.source}, {chain} parameters in {len(recipe.rounds)} "
                          f"round(s), output in {root}", to_plain(dataclasses.asdict(recipe)),
                     str(root / "recipe.yaml"))
        log_compute_dtype(resolve_dtype(recipe.dtype, "recipe key 'dtype'"))
        for name, keys in accepted.items():
            log.warning("stage %s was made with other settings (%s); kept because resume=force", name,
                        ", ".join(keys))
    barrier()
    for stage in stages:
        if stage.is_done(stage.directory):
            log.info("stage %s: complete in %s, skipped", stage.name, stage.directory)
            continue
        if not stage.directory.exists():  # starts afresh: earlier runs of it left nothing to continue
            _update(root / SEGMENTS_FILE, stage.name, None)
        log.info("stage %s: starting -> %s", stage.name, stage.directory)
        start = time.time()
        stats = stage.work(stage.directory) or {}
        wall = time.time() - start
        earlier = _segments(root, stage.name)
        if stats.get("stopped"):  # a stop signal: the stage saved its state; a new start continues it
            _update(root / SEGMENTS_FILE, stage.name, [*earlier, {"wall_seconds": round(wall, 2),
                                                                  "stopped_by": stats["stopped"]}])
            if stage.name == "report":  # nothing of it was written
                log.warning("recipe stopped by %s in stage report, before the report was written; start it "
                            "again to redo the report", stats["stopped"])
            else:
                log.warning("recipe stopped by %s in stage %s; start it again to continue", stats["stopped"],
                            stage.name)
            return None
        entry = _finished_entry(stage, wall, int(stats.get("tokens", 0) or 0), earlier)
        _update(root / STAGES_FILE, stage.name, entry)
        _update(root / SEGMENTS_FILE, stage.name, None)
        log.info("stage %s: done in %.0f s%s", stage.name, wall,
                 f" ({entry['wall_seconds']:.0f} s over {entry['runs']} runs)" if earlier else "")
        barrier()
        if stop_requested():  # a signal during a stage that cannot pause
            signal_name = received() or "a signal on another rank"
            if stage is stages[-1]:
                log.warning("%s came during stage %s, which finished: the recipe is complete", signal_name,
                            stage.name)
            else:
                log.warning("recipe stopped by %s after stage %s; start it again to continue", signal_name,
                            stage.name)
                return None
    return paths.report

