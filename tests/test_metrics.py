"""What a training run reports: metrics.jsonl, TensorBoard scalars, the optional Weights &
Biases run and the Megatron-style log line."""

from __future__ import annotations

import json
import logging
import sys
import types

RECORD = {"kind": "train", "step": 10, "consumed_samples": 80, "tokens": 2_621_440, "loss": 2.5, "kd_loss": 2.25,
          "ce_loss": 0.5, "pair_losses": [0.125, 0.25], "lr": 1e-4, "grad_norm": 0.75, "loss_scale": None,
          "skipped": False, "step_seconds": 0.5, "tokens_per_second": 524288.0, "tflops_per_device": 12.5,
          "peak_memory_gb": 1.5}


def _fake_wandb(calls: list):
    """Records what would be sent to Weights & Biases (it is not a dependency)."""
    module = types.ModuleType("wandb")

    class Run:
        def log(self, data, step):
            calls.append(("log", step, dict(data)))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    module.init = init
    return module


def test_records_reach_jsonl_tensorboard_wandb_and_the_log(tmp_path, monkeypatch, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nemo_minitron.distill.metrics import MetricsLog

    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    monkeypatch.setenv("WANDB_PROJECT", "minitron-tests")
    metrics = MetricsLog(tmp_path, kind="distillation", total_steps=20, log_every=5, config={"lr": 1e-4})
    with caplog.at_level(logging.INFO, logger="nemo_minitron"):
        metrics.record(RECORD)
        metrics.record({**RECORD, "step": 11})  # not a multiple of log_every: no log line
        metrics.record({"kind": "eval", "step": 11, "heldout_loss": 3.0, "heldout_perplexity": 20.09})
    metrics.close()

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == RECORD and [x["step"] for x in lines] == [10, 11, 11]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [2.5, 2.5]
    assert [e.step for e in events.Scalars("train/tflops_per_device")] == [10, 11]
    assert [e.value for e in events.Scalars("train/pair_loss_1")] == [0.25, 0.25]
    assert [e.value for e in events.Scalars("eval/heldout_loss")] == [3.0]

    assert calls[0][0] == "init" and calls[0][1]["project"] == "minitron-tests"
    kind, step, sent = calls[1]
    assert (kind, step) == ("log", 10) and calls[-1] == ("finish",)
    assert sent["train/loss"] == 2.5 and sent["train/pair_loss_1"] == 0.25 and sent["train/tokens_per_second"] == 524288.0

    text = [r.getMessage() for r in caplog.records]
    line = next(t for t in text if t.startswith("step 10/20"))
    for part in ("consumed samples 80", "consumed tokens 2.62M", "loss 2.5000", "kd 2.2500", "ce 0.5000",
                 "pairs 0.1250,0.2500", "lr 1.000E-04", "grad norm 0.750", "500.0 ms/step", "524,288 tokens/s",
                 "12.5 TFLOP/s per device", "peak memory 1.5 GB"):
        assert part in line, part
    assert not any(t.startswith("step 11/20 |") and "consumed" in t for t in text)
    assert any("held-out loss 3.0000" in t for t in text)


def test_without_wandb_installed_tensorboard_still_logs(tmp_path, monkeypatch):
    from nemo_minitron.distill.metrics import MetricsLog

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    monkeypatch.setenv("WANDB_PROJECT", "minitron-tests")
    metrics = MetricsLog(tmp_path, kind="fine-tuning", total_steps=1, log_every=1, config={})
    metrics.record({**RECORD, "step": 1})
    metrics.close()
    assert metrics.wandb is None and (tmp_path / "tensorboard").is_dir()


def test_training_flops_per_token_counts_backward_twice_and_the_teacher_once():
    from nemo_minitron.distill.metrics import training_flops_per_token

    class Stub:
        def __init__(self, f):
            self.f = f

        def flops_per_token(self, seq_len):
            return self.f * seq_len

    assert training_flops_per_token(Stub(2), Stub(5), 10) == 3 * 20 + 50
    assert training_flops_per_token(Stub(2), None, 10) == 60
