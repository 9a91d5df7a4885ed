"""What a training run keeps in OUT besides its training checkpoints (``checkpointing.py``):

    OUT/config.yaml     the resolved settings of the latest (forced) start, checked on resume
    OUT/resumes.jsonl   forced resumes: the step and the settings that changed there
    OUT/final/          the trained student, a normal project checkpoint
    OUT/summary.json    steps, tokens, losses, held-out loss and perplexity, throughput

Files are written by rank 0 under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from nemo_minitron.checkpoint.store import CheckpointInfo, save_checkpoint
from nemo_minitron.config import flatten, yaml_text
from nemo_minitron.distill.checkpointing import latest_checkpoint

log = logging.getLogger("nemo_minitron")

CONFIG_FILE = "config.yaml"        # the resolved settings of the run, checked on resume
RESUMES_FILE = "resumes.jsonl"     # forced resumes: the step and the settings that changed
SUMMARY_FILE = "summary.json"
FINAL_DIR = "final"


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def saved_config(out: Path) -> dict[str, Any] | None:
    """The resolved config a resumable run in ``out`` was started (or last forced) with."""
    if latest_checkpoint(out) is None or not (out / CONFIG_FILE).is_file():
        return None
    return yaml.safe_load((out / CONFIG_FILE).read_text())


def flat_get(tree: dict[str, Any] | None, key: str) -> Any:
    return flatten(tree or {}).get(key)


def record_forced_resume(out: Path, step: int, changed: list[str], saved: dict[str, Any] | None,
                         resolved: dict[str, Any]) -> None:
    """Rank 0: append which settings changed at ``step`` to resumes.jsonl, and say so."""
    record = {"step": step, "changed": {k: [flat_get(saved, k), flat_get(resolved, k)] for k in changed}}
    with open(out / RESUMES_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
    log.warning("resuming at step %d with changed settings (forced): %s", step,
                ", ".join(f"{k} {a} -> {b}" for k, (a, b) in record["changed"].items()))


def forced_resumes(out: Path) -> list[dict[str, Any]]:
    """Every forced resume of the run in ``out``, in order."""
    file = out / RESUMES_FILE
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def save_config(out: Path, resolved: dict[str, Any]) -> None:
    """Rank 0: the settings a resume is checked against."""
    _replace_text(out / CONFIG_FILE, yaml_text(resolved))


def save_final(student_model, student_info: CheckpointInfo, out: Path, *, provenance: dict[str, Any],
               compute_dtype: torch.dtype, tokenizer) -> Path:
    """Collective: the trained student as OUT/final, in the dtype its checkpoint had, its
    provenance extended by this run's (``provenance``: one key, the run's kind)."""
    kept = {k: v for k, v in student_info.provenance.items() if k != "created"}
    info = CheckpointInfo(student_info.description, student_info.dtype, {**kept, **provenance})
    if compute_dtype != torch.float32 and student_info.dtype == "float32":
        student_model.float()
    return save_checkpoint(student_model, info, out / FINAL_DIR, tokenizer=tokenizer)


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """Rank 0: summary.json, written last: its presence marks a finished run."""
    _replace_text(out / SUMMARY_FILE, json.dumps(summary, indent=2))
