"""Distillation on tiny models: layouts, resumption after a kill, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, cli_in_process, run_cli, run_workers

# student layer 0 sits on the first stage at PP=2 and teacher layer 3 on the second (the
# student state is carried); student layer 2 / teacher layer 1 the other way round.
PAIRS = "0:3,2:1"
SETTINGS = dict(global_batch=4, micro_batch=2, seq_len=16, lr=1e-3, seed=5)


def one_step(teacher: str, student: str, tp: int, pp: int):
    """Losses and full gradients of one forward-backward pass at a layout (any rank)."""
    import torch.distributed as dist

    from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer, read_info
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.distill.api import parse_pairs
    from nemo_minitron.distill.losses import LogitLossConfig
    from nemo_minitron.distill.train import TrainConfig, Trainer
    from nemo_minitron.runtime.distributed import init_distributed

    s_desc, t_desc = read_info(student).description, read_info(teacher).description
    cfg = TrainConfig(steps=1, pairs=parse_pairs(PAIRS, s_desc, t_desc), pair_weight="auto",
                      logit=LogitLossConfig(temperature=2.0, ce_weight=0.25, vocab_size=s_desc.vocab_size,
                                            chunk_tokens=7), **SETTINGS)
    init_distributed(tp, pp, cfg.seed)
    tokenizer = load_tokenizer(student)
    samples = check_corpus(["builtin:train"]).dataset(tokenizer, seq_len=cfg.seq_len, seed=0, num_samples=16)
    s_model, _ = load_checkpoint(student)
    t_model, _ = load_checkpoint(teacher)
    trainer = Trainer(s_model, t_model, Path(student) / "tokenizer", samples, None, Path("/nonexistent"), cfg,
                      student_desc=s_desc, teacher_desc=t_desc, progress=False)
    logs, grads = trainer.gradients(step=0)
    return logs, grads, dist.get_rank() if dist.is_initialized() else 0


@pytest.mark.multirank
def test_loss_and_gradients_equal_at_tp2_and_pp2(tiny_checkpoint, tmp_path):
    teacher, student = str(tiny_checkpoint("llama")), str(tiny_checkpoint("llama_small"))
    logs, grads, _ = one_step(teacher, student, 1, 1)
    assert len(logs["pair_losses"]) == 2 and all(p > 0 for p in logs["pair_losses"])
    assert logs["kd_loss"] > 0 and logs["ce_loss"] > 0
    for name, flags in (("tp2", ["--tp", "2"]), ("pp2", ["--pp", "2"])):
        out = tmp_path / name
        run_workers("distill_layouts.py", teacher, student, out, *flags)
        merged: dict[str, torch.Tensor] = {}
        for part in sorted(out.glob("rank*.pt")):
            saved = torch.load(part)
            for key in ("loss", "kd_loss", "ce_loss"):
                assert abs(saved["logs"][key] - logs[key]) <= 1e-5 * abs(logs[key]), (name, key)
            assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(saved["logs"]["pair_losses"], logs["pair_losses"]))
            merged.update(saved["grads"])
        assert merged.keys() == grads.keys(), name
        for key, ref in grads.items():
            scale = ref.abs().max().item()
            assert (merged[key] - ref).abs().max().item() <= 1e-5 * max(scale, 1e-8), (name, key)


def _distill_cmd(teacher, student, out, steps=8, save_every=3):
    return [sys.executable, "-m", "nemo_minitron", "distill", "--teacher", str(teacher), "--student", str(student),
            "--data", "builtin:train", "--out", str(out), "--steps", str(steps), "--global-batch", "4",
            "--micro-batch", "2", "--seq-len", "16", "--lr", "1e-3", "--save-every", str(save_every),
            "--eval-every", "4", "--eval-samples", "4", "--kd-pairs", "1:2", "--dtype", "float32"]


def _train_losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def test_killed_run_resumes_with_identical_losses(tiny_checkpoint, tmp_path):
    teacher, student = tiny_checkpoint("llama"), tiny_checkpoint("llama_small")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    straight = tmp_path / "straight"
    subprocess.run(_distill_cmd(teacher, student, straight), env=env, check=True, capture_output=True)
    expected = _train_losses(straight)
    assert [s for s, _ in expected] == list(range(1, 9))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_distill_cmd(teacher, student, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (marker.exists() and marker.read_text().strip() == "step_0000003") and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its checkpoint writer's helper process
    proc.wait()
    assert not (killed / "summary.json").exists()
    resumed = subprocess.run(_distill_cmd(teacher, student, killed), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _train_losses(killed)
    assert [s for s, _ in got] == [s for s, _ in expected]  # no step lost or repeated
    for (_, a), (_, b) in zip(got, expected):
        assert abs(a - b) <= 1e-6 * abs(b)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["student_after"]["heldout_loss"] > 0
    assert (killed / "final" / "nemo_minitron.json").is_file() and (killed / "tensorboard").is_dir()


def test_finetune_and_distill_lower_the_heldout_loss(tiny_checkpoint, tmp_path):
    """The tiny student learns something from either objective, and the final student is a
    checkpoint the other commands read."""
    teacher, student = tiny_checkpoint("llama"), tiny_checkpoint("llama_small")
    for name, teacher_arg in (("kd", teacher), ("ce", "none")):
        out = tmp_path / name
        proc = run_cli("distill", "--teacher", teacher_arg, "--student", student, "--data", "builtin:train",
                       "--out", out, "--steps", "12", "--global-batch", "4", "--micro-batch", "4",
                       "--seq-len", "32", "--lr", "3e-3", "--eval-samples", "8", "--warmup-steps", "1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["student_after"]["heldout_loss"] < summary["student_before"]["heldout_loss"], name
        proc = run_cli("eval", out / "final", "--data", "builtin:heldout", "--seq-len", "32", "--max-tokens", "256")
        assert proc.returncode == 0, proc.stderr[-2000:]


def _with_other_tokenizer(checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "other_tokenizer"
    shutil.copytree(checkpoint, copy)
    tok = json.loads((copy / "tokenizer" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (copy / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    return copy


@pytest.mark.parametrize("case, words", [
    ("vocab", ["different vocabularies"]),
    ("tokenizer", ["different tokenizers"]),
    ("not_descendant", ["not a descendant", "exceeds the teacher's"]),
    ("seq_len", ["--seq-len 100000 is longer than the models allow"]),
    ("pairs", ["--kd-pairs 1:9", "teacher layer 9 is out of range 0..3"]),
])
def test_bad_input(tiny_checkpoint, tmp_path, capsys, case, words):
    teacher, student = tiny_checkpoint("llama"), tiny_checkpoint("llama_small")
    flags = []
    if case == "vocab":
        student = tiny_checkpoint("mistral_vocab")
    elif case == "tokenizer":
        student = _with_other_tokenizer(student, tmp_path)
    elif case == "not_descendant":
        teacher, student = student, teacher
    elif case == "seq_len":
        flags = ["--seq-len", "100000"]
    else:
        flags = ["--kd-pairs", "1:9"]
    out = tmp_path / "out"
    code, stderr = cli_in_process(capsys, "distill", "--teacher", teacher, "--student", student, "--data",
                                  "builtin:train", "--out", out, "--steps", "2", "--seq-len", "16", *flags)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert all(w in stderr for w in words), stderr
    assert not out.exists()
