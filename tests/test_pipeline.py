"""The whole pipeline on a tiny model: stages, report, resumption, and the NeMo-Run launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TESTS

RECIPE = TESTS / "recipes" / "tiny.yaml"
STAGES = ["convert", "teacher-correction", "width-importance", "width-prune", "width-sparsify", "width-distill",
          "budget-importance", "budget-search", "budget-synthetic", "budget-distill", "budget-sparsify", "export",
          "report"]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")


def _run(*overrides, check=True):
    return subprocess.run([sys.executable, "-m", "nemo_minitron", "run", str(RECIPE), *overrides], env=_env(),
                          capture_output=True, text=True, check=check)


def _steps(distill_dir: Path) -> list[int]:
    lines = (distill_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if x.strip() and json.loads(x)["kind"] == "train"]


def test_recipe_stopped_mid_distillation_resumes_and_completes(tiny_hf, tmp_path):
    """The whole recipe, stopped by SIGUSR1 (Slurm's time-limit warning) during the first
    distillation: it saves, exits 0 without a report, and started again continues: finished
    stages are not redone, no training step is lost or repeated, every training stage
    (teacher correction too) logs to TensorBoard and Megatron-style lines, the report is
    complete, and a third start finds nothing left to do."""
    out = tmp_path / "run"
    cache = tmp_path / "data-cache"
    args = [f"model.source={tiny_hf('llama')}", f"output_dir={out}", "rounds.0.distill.steps=12",
            "rounds.0.distill.save_every=100", f"data.cache_dir={cache}"]
    log = tmp_path / "first.log"  # a file, not a pipe nobody reads while it fills
    proc = subprocess.Popen([sys.executable, "-m", "nemo_minitron", "run", str(RECIPE), *args], env=_env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    metrics = out / "width-3-distill" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and _steps(out / "width-3-distill")[-1:] >= [5]) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before distillation"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGUSR1)  # every process of the run, as Slurm signals a job step
    proc.wait(timeout=300)
    text = log.read_text()
    assert proc.returncode == 0 and "recipe stopped by SIGUSR1" in text, text[-3000:]
    assert not (out / "report").exists()
    stopped_at = int((out / "width-3-distill" / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 5 <= stopped_at < 12  # saved at the step boundary after the signal, not at save_every
    before = json.loads((out / "stages.json").read_text())
    assert "width-distill" not in before and "width-prune" in before

    done = _run(*args)
    assert f"report: {out / 'report' / 'report.md'}" in done.stdout
    after = json.loads((out / "stages.json").read_text())
    for stage in ("convert", "teacher-correction", "width-importance", "width-prune"):
        assert after[stage] == before[stage]  # finished stages were not run again
        assert f"stage {stage}: complete" in done.stderr
    assert "resumed from" in done.stderr
    assert _steps(out / "width-3-distill") == list(range(1, 13))  # no step lost or repeated
    for stage in ("01-teacher-correction", "width-3-distill", "budget-3-distill"):
        assert list((out / stage / "tensorboard").glob("events.*")), stage
    assert "consumed samples" in done.stderr and "TFLOP/s per device" in done.stderr
    assert list(after) == STAGES
    # the recipe's data settings reach every stage that reads data (rounds included)
    import yaml

    configs = [out / "01-teacher-correction" / "config.yaml", *sorted(out.glob("*-importance/config.yaml")),
               *sorted(out.glob("*-distill/config.yaml"))]
    assert len(configs) == 5, configs  # teacher correction, and importance and distillation of both rounds
    for config in configs:
        assert yaml.safe_load(config.read_text())["cache_dir"] == str(cache), config

    report = json.loads((out / "report" / "report.json").read_text())
    md = (out / "report" / "report.md").read_text()
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
    assert "held-out loss" in md and "width-distillation.png" in md and (out / "report" / "width-heads.png").is_file()
    # the second round chose its shape by search: the winner has the lowest final held-out loss
    # of its candidates, is the round's pruned model, and the report shows the search
    search = report["search"]["budget"]
    finals = {c["name"]: c["final_loss"] for c in search["candidates"]}
    assert len(finals) == 2 and search["best"] == min(finals, key=finals.get)
    best = next(c for c in search["candidates"] if c["name"] == search["best"])
    assert best["params"] == params[5] and best["directory"] == "best"
    assert json.loads((out / "budget-3-distill" / "summary.json").read_text())["student"].endswith(
        "budget-2-search/best/pruned")
    assert "## Architecture search: budget" in md and (out / "report" / "budget-search.png").is_file()
    # the second round trained on the round teacher's generations too (method both)
    generations = (out / "budget-3-synthetic" / "completions.jsonl").read_text().splitlines()
    assert len(generations) == 8 and all(len(json.loads(g)["prompt_ids"]) == 8 for g in generations)
    budget = json.loads((out / "budget-3-distill" / "summary.json").read_text())
    assert budget["config"]["method"] == "both" and budget["config"]["synthetic_data"].endswith("completions.jsonl")
    assert "- budget: KD on builtin:train plus cross-entropy on the teacher's generations" in md
    assert "- width: logit distillation (KD) on builtin:train" in md
    for m in report["models"]:  # task accuracy with its standard error, for every model
        assert set(m["tasks"]) == {"minitron_lastword", "minitron_nextsentence"}
        for result in m["tasks"].values():
            assert result["samples"] == 4 and set(result["stderr"]) >= {"acc"} and 0 <= result["metrics"]["acc"] <= 1
    assert "minitron_nextsentence acc" in md and "tasks.png" in md and (out / "report" / "tasks.png").is_file()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out / "export"))
    assert sum(p.numel() for p in hf.parameters()) == params[-1]

    again = _run(*args)  # a third start finds every stage complete
    assert again.stderr.count("skipped") == len(STAGES)
    assert (out / "recipe.yaml").is_file() and not list(out.glob("recipe.previous-*.yaml"))

    # a finished stage made with other settings is not built upon silently
    changed = _run(*args, "rounds.0.importance.samples=6", check=False)
    assert changed.returncode == 2, changed.stderr[-2000:]
    error = changed.stderr.strip().splitlines()[-1]
    assert "stage width-importance" in error and "rounds.0.importance.samples 8 -> 6" in error
    assert "resume=force" in error
    forced = _run(*args, "rounds.0.importance.samples=6", "resume=force")
    assert forced.stderr.count("skipped") == len(STAGES) and "kept because resume=force" in forced.stderr
    assert (out / "recipe.previous-1.yaml").is_file()


@pytest.mark.multirank
def test_nemo_run_local_executor_two_processes(tiny_hf, tmp_path):
    out = tmp_path / "run"
    env = dict(_env(), NEMORUN_HOME=str(tmp_path / "nemo_run_home"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([sys.executable, str(ROOT / "launchers" / "nemorun_launcher.py"), str(RECIPE),
                           "--executor", "local", "--nproc", "2", f"model.source={tiny_hf('llama')}",
                           f"output_dir={out}", "rounds.1.distill.steps=1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((out / "report" / "report.json").read_text())
    assert len(report["models"]) == 6
    import yaml

    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["parallel"] == {"tp": 1, "pp": 1}
    summary = json.loads((out / "width-3-distill" / "summary.json").read_text())
    assert summary["layout"]["dp"] == 2  # two processes, data parallel
