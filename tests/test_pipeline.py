"""The whole pipeline on a tiny model: stages, report, resumption, and the NeMo-Run launcher.

One recipe run (stopped during its first distillation, then finished) is shared by the
tests of what it did; later starts of the finished run are made in process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TESTS, cli_in_process, frozen_when, train_records

RECIPE = TESTS / "recipes" / "tiny.yaml"
STAGES = ["convert", "teacher-correction", "width-importance", "width-prune", "width-sparsify", "width-distill",
          "budget-importance", "budget-search", "budget-synthetic", "budget-distill", "budget-sparsify", "export",
          "report"]


def _env():
    # one torch thread: a tiny model's small products would wait at thread barriers on a busy machine
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS="1")


def _run(*overrides) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "nemo_minitron", "run", str(RECIPE), *overrides], env=_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


WIDTH_STEPS = 12  # the first distillation: a signal seen after any of its first 10 steps stops it


@pytest.fixture(scope="module")
def recipe_run(tiny_hf, tmp_path_factory):
    """The whole recipe, stopped by SIGUSR1 (Slurm's time-limit warning) right after the
    first distillation's first step, then started again and run to the end."""
    root = tmp_path_factory.mktemp("recipe")
    out, cache = root / "run", root / "data-cache"
    args = [f"model.source={tiny_hf('llama')}", f"output_dir={out}", f"rounds.0.distill.steps={WIDTH_STEPS}",
            "rounds.0.distill.save_every=100", f"data.cache_dir={cache}"]
    log = root / "first.log"  # a file, not a pipe nobody reads while it fills
    proc = subprocess.Popen([sys.executable, "-m", "nemo_minitron", "run", str(RECIPE), *args], env=_env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    metrics = out / "width-3-distill" / "metrics.jsonl"
    with frozen_when(proc, lambda: train_records(metrics), "the first distillation step"):
        signalled_after = train_records(metrics)[-1]["step"]
        os.killpg(proc.pid, signal.SIGUSR1)  # every process of the run, as Slurm signals a job step
    proc.wait(timeout=300)
    latest = out / "width-3-distill" / "checkpoints" / "latest"
    first = {"returncode": proc.returncode, "log": log.read_text(), "signalled_after": signalled_after,
             "stopped_at": int(latest.read_text().strip().split("_")[1]) if latest.exists() else None,
             "report": (out / "report").exists(), "stages": json.loads((out / "stages.json").read_text()),
             "unfinished": json.loads((out / "stages-unfinished.json").read_text())}
    assert signalled_after < WIDTH_STEPS - 1, first  # the signal had a step boundary left to stop at
    done = _run(*args)
    return {"out": out, "cache": cache, "args": args, "first": first, "done": done,
            "stages": json.loads((out / "stages.json").read_text()),
            "report": json.loads((out / "report" / "report.json").read_text()),
            "md": (out / "report" / "report.md").read_text()}


def test_sigusr1_stops_the_recipe_at_a_step_boundary_with_exit_0_and_no_report(recipe_run):
    """The signal reached the run (held stopped) after distillation step N: the run saves at
    N or N + 1 (the step it was in), not at save_every, says why, exits 0, and writes no
    report; the stages before the distillation are recorded as finished."""
    first = recipe_run["first"]
    assert first["returncode"] == 0 and "recipe stopped by SIGUSR1" in first["log"], first["log"][-3000:]
    assert first["stopped_at"] in (first["signalled_after"], first["signalled_after"] + 1), first
    assert not first["report"]
    assert "width-distill" not in first["stages"] and "width-prune" in first["stages"]
    (run,) = first["unfinished"]["width-distill"]
    assert run["stopped_by"] == "SIGUSR1"


def test_started_again_it_redoes_no_finished_stage_and_loses_no_step(recipe_run):
    done, before, after = recipe_run["done"], recipe_run["first"]["stages"], recipe_run["stages"]
    assert f"report: {recipe_run['out'] / 'report' / 'report.md'}" in done.stdout
    for stage in ("convert", "teacher-correction", "width-importance", "width-prune"):
        assert after[stage] == before[stage]  # finished stages were not run again
        assert f"stage {stage}: complete" in done.stderr
    assert "resumed from" in done.stderr
    steps = [r["step"] for r in train_records(recipe_run["out"] / "width-3-distill" / "metrics.jsonl")]
    assert steps == list(range(1, WIDTH_STEPS + 1))  # no step lost or repeated
    assert list(after) == STAGES


def test_a_resumed_stage_counts_the_time_and_tokens_of_both_runs(recipe_run):
    done, after = recipe_run["done"], recipe_run["stages"]
    (first_run,) = recipe_run["first"]["unfinished"]["width-distill"]
    distill = after["width-distill"]
    second = float(re.search(r"stage width-distill: done in (\d+) s \((\d+) s over 2 runs\)", done.stderr)[1])
    # the log line rounds to whole seconds, the records to hundredths
    wall, tokens = distill["wall_seconds"], distill["tokens"]
    assert distill["runs"] == 2 and abs(wall - first_run["wall_seconds"] - second) <= 0.5 + 0.01
    # tokens/s from the unrounded time: off by at most tokens / wall^2 x 0.005 s, and 0.05 of its own rounding
    assert abs(distill["tokens_per_second"] - tokens / wall) <= tokens / (wall - 0.005) ** 2 * 0.005 + 0.05
    assert "width-distill" not in json.loads((recipe_run["out"] / "stages-unfinished.json").read_text())
    assert f"| width-distill | {distill['wall_seconds']:.0f} s (2 runs) |" in recipe_run["md"]


def test_each_models_task_lines_follow_the_line_naming_it(recipe_run):
    stderr = recipe_run["done"].stderr
    for model in ("teacher (input)", "width: distilled with the masks", "budget: distilled"):
        named = stderr.index(f"report: {model}: loss")
        assert named < stderr.index(f"report: {model}: minitron_lastword: acc"), stderr[-3000:]


def test_every_training_stage_logs_to_tensorboard_and_megatron_style_lines(recipe_run):
    out = recipe_run["out"]
    for stage in ("01-teacher-correction", "width-3-distill", "budget-3-distill"):
        assert list((out / stage / "tensorboard").glob("events.*")), stage
    assert "consumed samples" in recipe_run["done"].stderr and "TFLOP/s per device" in recipe_run["done"].stderr


def test_the_recipe_data_settings_reach_every_stage_that_reads_data(recipe_run):
    import yaml

    out = recipe_run["out"]
    configs = [out / "01-teacher-correction" / "config.yaml", *sorted(out.glob("*-importance/config.yaml")),
               *sorted(out.glob("*-distill/config.yaml"))]
    assert len(configs) == 5, configs  # teacher correction, and importance and distillation of both rounds
    for config in configs:
        assert yaml.safe_load(config.read_text())["cache_dir"] == str(recipe_run["cache"]), config



def test_the_report_follows_every_model_and_the_corrected_teacher_teaches(recipe_run):
    """Eight models, each smaller after pruning and the same size after distillation and
    sparsity; the corrected teacher is the one the student learns from; the report has the
    generation, the loss curves and the pruned heads."""
    out, report, md = recipe_run["out"], recipe_run["report"], recipe_run["md"]
    names = [m["model"] for m in report["models"]]
    assert names == ["teacher (input)", "teacher (corrected)", "width: pruned", "width: sparse (2:4 sparsegpt)",
                     "width: distilled with the masks", "budget: pruned", "budget: distilled",
                     "budget: sparse (unstructured:0.5 wanda)"]
    params = [m["parameters"] for m in report["models"]]
    assert params[0] == params[1] > params[2] == params[3] == params[4] > params[5] == params[6] == params[7]
    # sparsity before distillation: the student distils the sparse model and keeps its record;
    # after: the distilled model is sparsified, and is what the run exports
    assert json.loads((out / "width-3-distill" / "summary.json").read_text())["student"].endswith("width-2b-sparsify")
    kept = json.loads((out / "width-3-distill" / "final" / "nemo_minitron.json").read_text())["provenance"]
    assert kept["sparsity"]["pattern"] == "2:4" and len(kept["sparsity"]["weights"]) == 4 * 4
    for name, record in report["sparsity"].items():  # zero fraction per layer and module, table and plot
        want = {"width": 0.5, "budget": 0.5}[name]
        assert record["per_layer"] and all(abs(v - want) < 1e-6 for layer in record["per_layer"].values()
                                           for v in layer.values()), (name, record["per_layer"])
        assert f"## Sparsity: {name}" in md and (out / "report" / record["plot"]).is_file()
    assert json.loads((out / "export" / "sparsity.json").read_text())["pattern"] == "unstructured:0.5"
    # the corrected teacher teaches (recorded in the student's summary)
    assert json.loads((out / "width-3-distill" / "summary.json").read_text())["teacher"].endswith(
        "01-teacher-correction/final")
    assert report["generation"].startswith("The Python standard library")
    assert "Compute dtype float32 (set by recipe key 'dtype')" in md and report["dtype"]["name"] == "float32"
    assert "held-out loss" in md and "width-distillation.png" in md and (out / "report" / "width-heads.png").is_file()


def test_the_second_round_chose_its_shape_by_search(recipe_run):
    """The winner has the lowest final held-out loss of its candidates, is the round's
    pruned model, and the report shows the search."""
    out, report = recipe_run["out"], recipe_run["report"]
    search = report["search"]["budget"]
    finals = {c["name"]: c["final_loss"] for c in search["candidates"]}
    assert len(finals) == 2 and search["best"] == min(finals, key=finals.get)
    best = next(c for c in search["candidates"] if c["name"] == search["best"])
    assert best["params"] == report["models"][5]["parameters"] and best["directory"] == "best"
    assert json.loads((out / "budget-3-distill" / "summary.json").read_text())["student"].endswith(
        "budget-2-search/best/pruned")
    assert "## Architecture search: budget" in recipe_run["md"] and (out / "report" / "budget-search.png").is_file()


def test_the_second_round_trained_on_the_teachers_generations_too(recipe_run):
    out, md = recipe_run["out"], recipe_run["md"]
    generations = (out / "budget-3-synthetic" / "completions.jsonl").read_text().splitlines()
    assert len(generations) == 8 and all(len(json.loads(g)["prompt_ids"]) == 8 for g in generations)
    budget = json.loads((out / "budget-3-distill" / "summary.json").read_text())
    assert budget["config"]["method"] == "both" and budget["config"]["synthetic_data"].endswith("completions.jsonl")
    assert "- budget: KD on builtin:train plus cross-entropy on the teacher's generations" in md
    assert "- width: logit distillation (KD) on builtin:train" in md


def test_every_model_has_task_accuracy_with_its_standard_error(recipe_run):
    out, md = recipe_run["out"], recipe_run["md"]
    for m in recipe_run["report"]["models"]:
        assert set(m["tasks"]) == {"minitron_lastword", "minitron_nextsentence"}
        for result in m["tasks"].values():
            assert result["samples"] == 4 and set(result["stderr"]) >= {"acc"} and 0 <= result["metrics"]["acc"] <= 1
    assert "minitron_nextsentence acc" in md and "tasks.png" in md and (out / "report" / "tasks.png").is_file()


def test_the_export_is_the_last_model(recipe_run):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(recipe_run["out"] / "export"))
    assert sum(p.numel() for p in hf.parameters()) == recipe_run["report"]["models"][-1]["parameters"]


def test_a_stop_signal_in_the_report_stage_writes_nothing_and_a_new_start_redoes_it(recipe_run, tmp_path):
    import shutil

    out, args = recipe_run["out"], recipe_run["args"]
    shutil.rmtree(out / "report")
    log = tmp_path / "report.log"
    proc = subprocess.Popen([sys.executable, "-m", "nemo_minitron", "run", str(RECIPE), *args], env=_env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    with frozen_when(proc, lambda: "stage report: starting" in log.read_text(), "the report stage"):
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "recipe stopped by SIGTERM in stage report, before the report was written; start it again to redo the " \
           "report" in text, text[-3000:]
    assert not (out / "report").exists() and not list(out.glob(".report.tmp-*"))
    redo = _run(*args)
    assert "stage report: starting" in redo.stderr and (out / "report" / "report.md").is_file()


def _run_here(capsys, caplog, recipe_run, *overrides) -> tuple[int, str, list[str]]:
    """``nemo-minitron run`` of the finished recipe in this process (its runtime already set
    up: the tests take the ``runtime`` fixture): (exit status, stderr, the log's messages)."""
    caplog.clear()
    caplog.set_level("INFO", logger="nemo_minitron")
    code, stderr = cli_in_process(capsys, "run", RECIPE, *recipe_run["args"], *overrides)
    return code, stderr, [r.getMessage() for r in caplog.records]


def test_a_third_start_finds_nothing_left_to_do(recipe_run, runtime, capsys, caplog):
    out = recipe_run["out"]
    previous = sorted(out.glob("recipe.previous-*.yaml"))
    code, stderr, messages = _run_here(capsys, caplog, recipe_run)
    assert code == 0, stderr
    assert sum(m.startswith(f"stage {s}: complete") and m.endswith("skipped") for s in STAGES for m in messages) == \
        len(STAGES), messages
    assert not any(m.startswith("stage ") and ": starting" in m for m in messages), messages
    assert (out / "recipe.yaml").is_file() and sorted(out.glob("recipe.previous-*.yaml")) == previous


def test_a_finished_stage_made_with_other_settings_is_refused(recipe_run, runtime, capsys, caplog):
    out = recipe_run["out"]
    previous = sorted(out.glob("recipe.previous-*.yaml"))
    code, stderr, _ = _run_here(capsys, caplog, recipe_run, "rounds.0.importance.samples=6")
    assert code == 2, stderr[-2000:]
    error = stderr.strip().splitlines()[-1]
    assert "stage width-importance" in error and "rounds.0.importance.samples 8 -> 6" in error
    assert "resume=force" in error
    assert sorted(out.glob("recipe.previous-*.yaml")) == previous  # nothing recorded


def test_resume_force_keeps_finished_stages_made_with_other_settings(recipe_run, runtime, capsys, caplog):
    out = recipe_run["out"]
    previous = len(list(out.glob("recipe.previous-*.yaml")))
    code, stderr, messages = _run_here(capsys, caplog, recipe_run, "rounds.0.importance.samples=6", "resume=force")
    assert code == 0, stderr[-2000:]
    assert sum(m.endswith("skipped") for m in messages) == len(STAGES), messages
    assert any("kept because resume=force" in m for m in messages), messages
    assert (out / f"recipe.previous-{previous + 1}.yaml").is_file()


def _nemo_run(recipe: Path, tiny_hf, tmp_path, *overrides) -> tuple[Path, dict]:
    """``recipe`` launched by launchers/nemorun_launcher.py with NeMo-Run's local executor on
    2 processes (data parallel): its output directory and report."""
    out = tmp_path / "run"
    env = dict(_env(), NEMORUN_HOME=str(tmp_path / "nemo_run_home"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([sys.executable, str(ROOT / "launchers" / "nemorun_launcher.py"), str(recipe),
                           "--executor", "local", "--nproc", "2", f"model.source={tiny_hf('llama')}",
                           f"output_dir={out}", *overrides], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    import yaml

    assert yaml.safe_load((out / "recipe.yaml").read_text())["parallel"] == {"tp": 1, "pp": 1}
    summary = json.loads((out / "width-3-distill" / "summary.json").read_text())
    assert summary["layout"]["dp"] == 2  # two processes, data parallel
    return out, json.loads((out / "report" / "report.json").read_text())


@pytest.mark.multirank
def test_nemo_run_local_executor_runs_a_round_on_two_processes(tiny_hf, tmp_path):
    """The tiny recipe cut to what a launcher test needs: its first round (one distillation
    step) and the report, no teacher correction, no export."""
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["teacher_correction"]["enabled"] = recipe["export"]["enabled"] = False
    recipe["rounds"] = recipe["rounds"][:1]
    del recipe["rounds"][0]["sparsify"]
    recipe["rounds"][0]["distill"].update(steps=1, eval_every=0, save_every=0)
    (tmp_path / "one-round.yaml").write_text(yaml.safe_dump(recipe))
    _, report = _nemo_run(tmp_path / "one-round.yaml", tiny_hf, tmp_path)
    assert [m["model"] for m in report["models"]] == ["teacher (input)", "width: pruned", "width: distilled"]


@pytest.mark.slow
@pytest.mark.multirank
def test_nemo_run_local_executor_runs_the_whole_recipe_on_two_processes(tiny_hf, tmp_path):
    _, report = _nemo_run(RECIPE, tiny_hf, tmp_path, "rounds.1.distill.steps=1")
    # the recipe's eight models (teacher, corrected teacher, and both rounds' pruned, sparse
    # and distilled models: test_the_report_follows_every_model... names them)
    assert len(report["models"]) == 8


def test_distillation_plot_has_an_axis_per_loss():
    """KD loss (~0.003) and held-out loss (~6) on separate, labelled y axes: each curve spans
    most of its own axis, instead of the KD curve lying flat at the bottom of a 0..6 axis."""
    from nemo_minitron.pipeline.report import distillation_figure

    train = [{"step": s, "loss": 0.004 - 0.0001 * s} for s in range(1, 21)]
    evals = [{"step": s, "heldout_loss": 6.2 - 0.01 * s} for s in (0, 10, 20)]
    fig = distillation_figure("width: distillation", train, evals)
    kd_axis, heldout_axis = fig.axes
    assert kd_axis.get_shared_x_axes().joined(kd_axis, heldout_axis)  # one step axis
    assert "KD" in kd_axis.get_ylabel() and "held-out" in heldout_axis.get_ylabel()
    for ax, values in ((kd_axis, [r["loss"] for r in train]), (heldout_axis, [r["heldout_loss"] for r in evals])):
        (line,) = ax.get_lines()
        assert list(line.get_ydata()) == values
        lo, hi = ax.get_ylim()
        assert lo <= min(values) and max(values) <= hi and (max(values) - min(values)) / (hi - lo) > 0.5, (lo, hi)
    legend = [t.get_text() for t in kd_axis.get_legend().get_texts()]
    assert legend == ["training loss (KD)", "held-out LM loss"]
