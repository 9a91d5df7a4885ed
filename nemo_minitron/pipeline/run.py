"""``nemo-minitron run RECIPE.yaml``: the whole Minitron pipeline, one directory per stage.

    OUT/00-convert                 project checkpoint of the input model
    OUT/01-teacher-correction      (optional) the teacher fine-tuned on the training data
    OUT/<round>-1-importance       importance scores, plots
    OUT/<round>-2-prune            pruned checkpoint
    OUT/<round>-3-distill          distilled student (final/), metrics, checkpoints
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

from nemo_minitron.errors import require
from nemo_minitron.pipeline.recipe import Recipe, RoundConfig, load_recipe

log = logging.getLogger("nemo_minitron")

STAGES_FILE = "stages.json"


@dataclasses.dataclass
class Stage:
    name: str
    directory: Path
    is_done: Callable[[Path], bool]
    work: Callable[[Path], dict[str, Any]]  # returns stats such as {"tokens": n}


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
        return self.root / f"{self.recipe.rounds[i].name}-2-prune"

    def distill(self, i: int) -> Path:
        return self.root / f"{self.recipe.rounds[i].name}-3-distill"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def report(self) -> Path:
        return self.root / "report"

    # ---------------------------------------------------------------- checkpoints
    def input_checkpoint(self) -> Path:
        from nemo_minitron.checkpoint.store import is_checkpoint

        source = self.recipe.model.source
        return Path(source) if is_checkpoint(source) else self.convert

    def teacher(self) -> Path:
        tc = self.recipe.teacher_correction
        return self.teacher_correction / "final" if tc.enabled else self.input_checkpoint()

    def round_input(self, i: int) -> Path:
        return self.teacher() if i == 0 else self.distill(i - 1) / "final"

    def round_teacher(self, i: int) -> Path:
        return self.teacher() if self.recipe.rounds[i].distill.teacher == "original" else self.round_input(i)

    def student(self) -> Path:
        return self.distill(len(self.recipe.rounds) - 1) / "final"


# -------------------------------------------------------------------- validation
def data_corpus(recipe: Recipe, use: str, **kwargs):
    """The checked corpus of ``data.<use>`` (calib, train, heldout); None for a left-out
    heldout (the validation part of ``train`` is read instead)."""
    from nemo_minitron.data.dataset import check_corpus

    value = getattr(recipe.data, use)
    if value is None:
        return None
    return check_corpus(value, flag=f"data.{use}", split=None if use == "heldout" else recipe.data.split,
                        split_flag="data.split", cache_dir=recipe.data.cache_dir, cache_flag="data.cache_dir",
                        **kwargs)


def preflight(recipe: Recipe, paths: RunPaths) -> list:
    """Check every input before any work: source, data, layout, targets of every round.
    Returns the model description after each round (the planned architectures)."""
    from nemo_minitron.checkpoint.api import describe_model
    from nemo_minitron.prune.api import planned_description
    from nemo_minitron.runtime.distributed import check_world_size

    done = paths.input_checkpoint() if paths.convert.exists() else None
    desc = describe_model(str(done or recipe.model.source), flag="model.source")
    for use in ("calib", "train", "heldout"):
        data_corpus(recipe, use, vocab_size=desc.vocab_size)
    tp, pp = recipe.parallel.tp, recipe.parallel.pp
    desc.check_layout(tp, pp)
    check_world_size(tp, pp)
    descriptions = [desc]
    for i, rnd in enumerate(recipe.rounds):
        pr = rnd.prune
        desc = planned_description(desc, target=pr.target or None, target_params=pr.target_params, tp=tp, pp=pp,
                                   max_width_cut=pr.max_width_cut, max_depth_cut=pr.max_depth_cut,
                                   flag=f"rounds.{i}.prune")
        descriptions.append(desc)
        for key, model in (("importance.seq_len", rnd.importance.seq_len), ("distill.seq_len", rnd.distill.seq_len)):
            value = model
            limit = min(d.max_position_embeddings for d in descriptions)
            require(value <= limit, f"recipe key 'rounds.{i}.{key}' ({value}) exceeds the models' "
                                    f"max_position_embeddings ({limit})")
    out = Path(recipe.output_dir)
    require(not out.exists() or out.is_dir(), f"recipe key 'output_dir': '{out}' exists and is not a directory")
    return descriptions


# -------------------------------------------------------------------- stages
def _stages(recipe: Recipe, paths: RunPaths) -> list[Stage]:
    from nemo_minitron.checkpoint.store import is_checkpoint

    tp, pp, seed = recipe.parallel.tp, recipe.parallel.pp, recipe.seed
    data = recipe.data
    stages: list[Stage] = []

    if not is_checkpoint(recipe.model.source):
        def convert(out: Path) -> dict:
            from nemo_minitron.checkpoint.api import convert as run
            from nemo_minitron.checkpoint.store import parse_dtype

            dtype = parse_dtype(recipe.model.dtype, "model.dtype") if recipe.model.dtype else None
            run(recipe.model.source, str(out), tp=tp, pp=pp, dtype=dtype, seed=seed)
            return {}
        stages.append(Stage("convert", paths.convert, is_checkpoint, convert))

    tc = recipe.teacher_correction
    if tc.enabled:
        def correct(out: Path) -> dict:
            from nemo_minitron.distill.api import finetune

            return finetune(str(paths.input_checkpoint()), data.train, str(out), eval_data=data.heldout,
                            tp=tp, pp=pp, dtype=recipe.dtype, seed=seed, **_data_kwargs(recipe),
                            **_training_kwargs(tc))
        stages.append(Stage("teacher-correction", paths.teacher_correction, _distill_done, correct))

    for i, rnd in enumerate(recipe.rounds):
        stages += _round_stages(recipe, paths, i, rnd)

    if recipe.export.enabled:
        def export(out: Path) -> dict:
            from nemo_minitron.checkpoint.api import export as run
            from nemo_minitron.checkpoint.store import parse_dtype

            run(str(paths.student()), str(out), tp=tp, pp=pp, dtype=parse_dtype(recipe.export.dtype, "export.dtype"),
                seed=seed, verify=recipe.export.verify)
            return {}
        stages.append(Stage("export", paths.export, lambda p: (p / "config.json").is_file(), export))

    def report(out: Path) -> dict:
        from nemo_minitron.pipeline.report import write_report

        write_report(recipe, paths, out)
        return {}
    stages.append(Stage("report", paths.report, lambda p: (p / "report.md").is_file(), report))
    return stages


def _training_kwargs(cfg) -> dict[str, Any]:
    keys = ("steps", "global_batch", "micro_batch", "seq_len", "lr", "min_lr", "warmup_steps", "weight_decay",
            "clip_grad", "eval_every", "eval_samples", "save_every")
    return {k: getattr(cfg, k) for k in keys}


def _data_kwargs(recipe: Recipe) -> dict[str, Any]:
    return {"split": recipe.data.split, "data_cache": recipe.data.cache_dir}


def _distill_done(path: Path) -> bool:
    return (path / "summary.json").is_file() and (path / "final").is_dir()


def _round_stages(recipe: Recipe, paths: RunPaths, i: int, rnd: RoundConfig) -> list[Stage]:
    tp, pp, seed, data = recipe.parallel.tp, recipe.parallel.pp, recipe.seed, recipe.data

    def importance(out: Path) -> dict:
        from nemo_minitron.importance.api import compute_importance

        imp = rnd.importance
        scores = compute_importance(str(paths.round_input(i)), data.calib, str(out), samples=imp.samples,
                                    seq_len=imp.seq_len, micro_batch=imp.micro_batch, batch_agg=imp.batch_agg,
                                    seq_agg=imp.seq_agg, neuron_activation=imp.neuron_activation,
                                    layer_samples=imp.layer_samples, drop_blocks=list(imp.drop_blocks),
                                    seed=seed, tp=tp, pp=pp, dtype=recipe.dtype, **_data_kwargs(recipe))
        return {"tokens": int(scores.summary.get("tokens", 0))}

    def prune(out: Path) -> dict:
        from nemo_minitron.prune.api import prune as run

        pr = rnd.prune
        run(str(paths.round_input(i)), str(paths.importance(i)), str(out), target=pr.target or None,
            target_params=pr.target_params, order=pr.order, layer_metric=pr.layer_metric,
            max_width_cut=pr.max_width_cut, max_depth_cut=pr.max_depth_cut, seed=seed, tp=tp, pp=pp)
        return {}

    def distill(out: Path) -> dict:
        from nemo_minitron.distill.api import distill as run

        d = rnd.distill
        return run(str(paths.round_teacher(i)), str(paths.prune(i)), data.train, str(out), eval_data=data.heldout,
                   tp=tp, pp=pp, dtype=recipe.dtype, seed=seed, kd_temperature=d.kd_temperature,
                   kd_loss=d.kd_loss, kd_top_k=d.kd_top_k, kd_weight=d.kd_weight, ce_weight=d.ce_weight,
                   kd_pairs=list(d.kd_pairs), kd_pair_loss=d.kd_pair_loss, kd_pair_weight=d.kd_pair_weight,
                   logit_chunk=d.logit_chunk, **_data_kwargs(recipe), **_training_kwargs(d))

    from nemo_minitron.checkpoint.store import is_checkpoint

    return [
        Stage(f"{rnd.name}-importance", paths.importance(i), lambda p: (p / "scores.safetensors").is_file(),
              importance),
        Stage(f"{rnd.name}-prune", paths.prune(i), is_checkpoint, prune),
        Stage(f"{rnd.name}-distill", paths.distill(i), _distill_done, distill),
    ]


# -------------------------------------------------------------------- runner
def _record(root: Path, name: str, entry: dict[str, Any]) -> None:
    from nemo_minitron.runtime.distributed import is_rank0

    if not is_rank0():
        return
    file = root / STAGES_FILE
    records = json.loads(file.read_text()) if file.is_file() else {}
    records[name] = entry
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=2))
    tmp.replace(file)


def run_recipe(recipe: Recipe) -> Path:
    """Run (or resume) every stage of the recipe; returns the report directory."""
    from nemo_minitron.runtime.distributed import barrier, init_distributed, is_rank0

    root = Path(recipe.output_dir)
    paths = RunPaths(root, recipe)
    descriptions = preflight(recipe, paths)
    init_distributed(recipe.parallel.tp, recipe.parallel.pp, recipe.seed)
    if is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        from nemo_minitron.pipeline.recipe import to_dict

        (root / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=2))
        chain = " -> ".join(f"{d.num_parameters() / 1e6:.1f}M" for d in descriptions)
        log.info("recipe %s: %s, output in %s", recipe.name, chain, root)
    barrier()
    for stage in _stages(recipe, paths):
        if stage.is_done(stage.directory):
            log.info("stage %s: complete in %s, skipped", stage.name, stage.directory)
            continue
        log.info("stage %s: starting -> %s", stage.name, stage.directory)
        start = time.time()
        stats = stage.work(stage.directory) or {}
        wall = time.time() - start
        tokens = int(stats.get("tokens", 0) or 0)
        _record(root, stage.name, {"directory": str(stage.directory), "wall_seconds": round(wall, 2),
                                   "tokens": tokens, "tokens_per_second": round(tokens / wall, 1) if tokens else None,
                                   "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        log.info("stage %s: done in %.0f s", stage.name, wall)
        barrier()
    return paths.report


def main(args) -> int:
    from nemo_minitron.runtime.distributed import is_rank0

    recipe = load_recipe(args.recipe, args.overrides)
    report = run_recipe(recipe)
    if is_rank0():
        print(f"report: {report / 'report.md'}")
    return 0
