"""Distillation on tiny models: layouts, resumption after a kill, and bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, cli_in_process, frozen_when, run_workers, torch_threads, train_records
from tolerances import fp32, transformer_logits

# At PP=2 (student layers 0-1 | 2, teacher 0-1 | 2-3): student layer 0 sits on the first stage
# and teacher layer 3 on the second (the student state is carried); student layer 2 /
# teacher layer 1 the other way round; 1:0 is computed on the first stage and enters the
# backward pass through the stage's output.
PAIRS = ["0:3", "2:1", "1:0"]
SEED = 5
#: one forward-backward step with intermediate pairs, and one with the teacher's top-k logits
#: (at TP=2 the top-k threshold comes from an all-gather over the vocabulary shards) and the
#: contrastive term (its similarities summed over the vocabulary shards)
CONFIGS = {
    "pairs": dict(global_batch=4, micro_batch=2, seq_len=16, lr=1e-3, kd_pairs=PAIRS, kd_temperature=2.0,
                  ce_weight=0.25, logit_chunk=7),
    "top_k": dict(global_batch=4, micro_batch=2, seq_len=16, lr=1e-3, kd_top_k=5, kd_temperature=1.5,
                  ce_weight=0.5, logit_chunk=5, contrastive_weight=0.5, contrastive_temperature=0.8),
    # float16 with megatron-core's loss scale: the pair on the first stage enters the backward
    # pass at PP=2 through the stage output and must be scaled like the last stage's loss
    "fp16": dict(global_batch=4, micro_batch=2, seq_len=16, lr=1e-3, kd_pairs=PAIRS, kd_temperature=2.0,
                 ce_weight=0.25, logit_chunk=7, dtype="float16"),
}
#: a mixture-of-experts student (mixtral_small, 2 layers) taught by a mixture of experts (mixtral,
#: 3 layers), its load-balancing loss weighted 0.05; at TP=2 both train with sequence
#: parallelism (each rank holds half of the sequence: pair losses and router gradients
#: come in parts), at PP=2 student layer 0 / teacher layer 2 and student 1 / teacher 0 sit on
#: different stages
MOE_PAIR = ("mixtral", "mixtral_small")
AUX_TOL = fp32(32 * 4 * 64 * (2 * 3 + 1), 1.0)
MOE_CONFIGS = {
    "moe": dict(global_batch=4, micro_batch=2, seq_len=16, lr=1e-3, kd_pairs=["0:2", "1:0"], kd_temperature=1.5,
                ce_weight=0.25, logit_chunk=7, moe_aux_loss_coeff=0.05),
}


def make_trainer(teacher: str, student: str, tp: int, pp: int, settings: dict, steps: int = 1):
    """A trainer at a layout on 16 built-in training samples (any rank), for ``steps`` steps."""
    from nemo_minitron.checkpoint.store import load_tokenizer, read_info
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.distill.api import _projection_init, load_training_models, parse_pairs
    from nemo_minitron.distill.config import DistillConfig
    from nemo_minitron.distill.train import Trainer
    from nemo_minitron.runtime.distributed import init_distributed

    from nemo_minitron.checkpoint.store import parse_dtype

    settings = dict(settings)
    dtype = parse_dtype(settings.pop("dtype")) if "dtype" in settings else None
    s_desc, t_desc = read_info(student).description, read_info(teacher).description
    cfg = DistillConfig(steps=steps, **settings)
    init_distributed(tp, pp, SEED)
    samples = check_corpus(["builtin:train"]).dataset(load_tokenizer(student), seq_len=cfg.seq_len, seed=0,
                                                      num_samples=16)
    s_model, t_model = load_training_models(student, teacher, dtype, s_desc)
    pairs = parse_pairs(cfg.kd_pairs, s_desc, t_desc)
    return Trainer(s_model, t_model, samples, None, Path("/nonexistent"), cfg, seed=SEED, student_desc=s_desc,
                   teacher_desc=t_desc, pairs=pairs, progress=False,
                   projection_init=_projection_init(student, s_desc, t_desc) if pairs else None)


def one_step(teacher: str, student: str, tp: int, pp: int, settings: dict):
    """Losses and full gradients of one forward-backward pass at a layout (any rank)."""
    import torch.distributed as dist

    trainer = make_trainer(teacher, student, tp, pp, settings)
    logs, grads = trainer.gradients(step=0)
    return logs, grads, dist.get_rank() if dist.is_initialized() else 0


def reference_step(teacher_hf: Path, student_hf: Path, microbatches, settings: dict, projections: dict,
                   pair_weights: list[float]):
    """The step's losses and projection gradients written out directly, in float64, from the
    Hugging Face models (layer outputs captured with hooks): the definitions of
    docs/design.md, independent of the training code. A mixture-of-experts student adds
    its load-balancing loss per layer (Switch Transformer's, as megatron-core normalises it):
    coeff * E / (k T^2) * sum_e (sum_t softmax(router logits)_te) * (tokens routed to e), and
    its routers' gradients are returned too."""
    from nemo_minitron.checkpoint.verify import load_hf_model

    T, ce_w = settings["kd_temperature"], settings["ce_weight"]
    pairs = [tuple(int(x) for x in p.split(":")) for p in settings.get("kd_pairs", [])]
    models = {side: load_hf_model(d).double().eval() for side, d in (("teacher", teacher_hf), ("student", student_hf))}
    for model in models.values():
        if hasattr(model, "set_experts_implementation"):  # transformers 5: grouped_mm has no float64
            model.set_experts_implementation("eager")
    proj = {k: v.detach().double().clone().requires_grad_(True) for k, v in projections.items()}
    student_layers = models["student"].model.layers
    moe = hasattr(student_layers[0].mlp, "gate")
    routers = {f"decoder.layers.{i}.mlp.router.weight": layer.mlp.gate.weight
               for i, layer in enumerate(student_layers)} if moe else {}
    config = models["student"].config
    coeff = settings.get("moe_aux_loss_coeff", getattr(config, "router_aux_loss_coef", 0.0))
    totals = {"loss": 0.0, "kd_loss": 0.0, "ce_loss": 0.0, "pair_losses": [0.0] * len(pairs), "moe_aux_loss": 0.0,
              "contrastive_loss": 0.0}
    objective = 0.0
    for mb in microbatches:
        states, logits, router_logits = {}, {}, []
        for side, model in models.items():
            wanted = {s if side == "student" else t for s, t in pairs}
            hooks = [model.model.layers[i].register_forward_hook(
                lambda m, a, o, i=i, side=side: states.__setitem__((side, i), o[0] if isinstance(o, tuple) else o))
                for i in wanted]
            if side == "student" and moe:
                hooks += [layer.mlp.gate.register_forward_hook(lambda m, a, o: router_logits.append(o[0]))
                          for layer in student_layers]
            with torch.set_grad_enabled(side == "student"):
                logits[side] = model(mb["tokens"]).logits.double()
            for h in hooks:
                h.remove()
        z, y = logits["student"] / T, logits["teacher"] / T
        if settings.get("kd_top_k"):
            kth = y.topk(settings["kd_top_k"], dim=-1).values[..., -1:]
            y = y.masked_fill(y < kth, float("-inf"))
        q, log_q, log_p = y.softmax(-1), y.log_softmax(-1), z.log_softmax(-1)
        kd = T * T * torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1).mean()
        ce = torch.nn.functional.cross_entropy(logits["student"].flatten(0, 1), mb["labels"].flatten())
        # contrastive: InfoNCE over the positions of each chunk of the micro-batch's tokens,
        # similarity of student i and teacher j = sum_v q_jv log p_iv
        con, tau, chunk = 0.0, settings.get("contrastive_temperature", 1.0), settings.get("logit_chunk", 1024)
        if settings.get("contrastive_weight"):
            lp, qq = log_p.flatten(0, 1), q.flatten(0, 1)
            con = T * T * torch.cat([-(lp[i:i + chunk] @ qq[i:i + chunk].T / tau).log_softmax(-1).diagonal()
                                     for i in range(0, lp.shape[0], chunk)]).mean()
        pair_losses = []
        for i, (s, t) in enumerate(pairs):
            projected = states[("student", s)] @ proj[str(i)].T if str(i) in proj else states[("student", s)]
            cos = torch.nn.functional.cosine_similarity(projected, states[("teacher", t)].detach(), dim=-1)
            pair_losses.append((1 - cos).mean())
        aux = 0.0
        for z_router in router_logits:  # [tokens, experts], one per student layer
            n_tokens, experts = z_router.shape
            k = config.num_experts_per_tok
            routed = torch.zeros_like(z_router).scatter(1, z_router.topk(k, dim=-1).indices, 1.0)
            aux = aux + coeff * experts / (k * n_tokens ** 2) * (z_router.softmax(-1).sum(0) * routed.sum(0)).sum()
        loss = kd + ce_w * ce + settings.get("contrastive_weight", 0.0) * con \
            + sum(w * p for w, p in zip(pair_weights, pair_losses)) + aux
        objective = objective + loss / len(microbatches)
        totals["loss"] += loss.item() / len(microbatches)
        totals["kd_loss"] += kd.item() / len(microbatches)
        totals["ce_loss"] += ce.item() / len(microbatches)
        totals["contrastive_loss"] += float(con) / len(microbatches)
        totals["moe_aux_loss"] += float(aux) / len(microbatches)
        for i, p in enumerate(pair_losses):
            totals["pair_losses"][i] += p.item() / len(microbatches)
    wrt = {**{f"kd_projection.{k}": v for k, v in proj.items()}, **routers}
    grads = torch.autograd.grad(objective, list(wrt.values())) if wrt else []
    return totals, dict(zip(wrt, grads)), max(logits["student"].abs().max().item(),
                                              logits["teacher"].abs().max().item())


#: the wider model's largest inner dimension and depth (tiny_models.py)
WIDTH, LAYERS = 96, 4


def _runs(tiny_checkpoint) -> dict[str, tuple]:
    """name -> (teacher, student, teacher kind, student kind, settings) of every configuration."""
    teacher, student = str(tiny_checkpoint("llama")), str(tiny_checkpoint("llama_small"))
    moe_teacher, moe_student = (str(tiny_checkpoint(k)) for k in MOE_PAIR)
    runs = {name: (teacher, student, "llama", "llama_small", settings) for name, settings in CONFIGS.items()}
    runs.update({name: (moe_teacher, moe_student, *MOE_PAIR, settings) for name, settings in MOE_CONFIGS.items()})
    return runs


@pytest.fixture(scope="module")
def tp1_steps(tiny_checkpoint):
    """name -> (logs, gradients, trainer) of each configuration's step at TP=1, in process."""
    steps = {}
    for name, (t_ckpt, s_ckpt, _, _, settings) in _runs(tiny_checkpoint).items():
        trainer = make_trainer(t_ckpt, s_ckpt, 1, 1, settings)
        steps[name] = (*trainer.gradients(step=0), trainer)
    return steps


@pytest.fixture(scope="module")
def layout_steps(tiny_checkpoint, tmp_path_factory):
    """The same steps at TP=2, PP=2 and DP=2 (one 2-process run): layout -> its directory."""
    runs = _runs(tiny_checkpoint)
    (teacher, student, *_), (moe_teacher, moe_student, *_) = runs["pairs"], runs["moe"]
    out = tmp_path_factory.mktemp("distill_layouts") / "out"
    run_workers("distill_layouts.py", teacher, student, out, "tp2", "pp2", "dp2", "--moe", moe_teacher, moe_student,
                out=out)
    return {layout: out / layout for layout in ("tp2", "pp2", "dp2")}


@pytest.mark.parametrize("name", [n for n, s in {**CONFIGS, **MOE_CONFIGS}.items() if s.get("dtype") != "float16"])
def test_step_equals_a_float64_reference_at_tp1(tiny_hf, tiny_checkpoint, tp1_steps, name):
    """At TP=1 the step's KD, CE and pair losses (and a mixture-of-experts student's
    load-balancing loss) and the projections' (and routers') gradients equal a float64
    reference written out from the HF models (float16 is checked across layouts only)."""
    from tolerances import fp32, log_softmax_sum, transformer_logits

    *_, t_kind, s_kind, settings = _runs(tiny_checkpoint)[name]
    logs, grads, trainer = tp1_steps[name]
    projections = {k: p.weight for k, p in trainer.module.projections.items()}
    ref, ref_grads, max_logit = reference_step(tiny_hf(t_kind), tiny_hf(s_kind), trainer.step_batches(0),
                                               settings, projections, trainer.module.pair_weights.tolist())
    # the load-balancing loss sums, over 32 tokens x 4 experts, router probabilities whose inputs
    # carry a float32 forward pass's rounding (matrix products <= 64 wide, 3 layers)
    assert abs(logs.get("moe_aux_loss", 0.0) - ref["moe_aux_loss"]) <= AUX_TOL * (1 + ref["moe_aux_loss"])
    T = settings["kd_temperature"]
    # float32 (megatron) against float64 (HF): the logits differ by a forward pass's rounding;
    # KD and CE are per-token log-softmax sums over the vocabulary of those logits (T^2 KL
    # moves by at most 2 T times the logit error); pair losses are 1 - cos of hidden states
    # carrying a forward pass's relative rounding.
    logit_err = transformer_logits(WIDTH, LAYERS, torch.tensor(max_logit))
    loss_tol = T * T * log_softmax_sum(1000, max_logit / T) + 2 * T * logit_err
    # the contrastive term: log-softmaxes over a chunk of similarities, each a sum of those
    # log-probabilities weighted by probabilities (so within their error), divided by tau
    keys = ("kd_loss", "ce_loss", "loss") + (("contrastive_loss",) if settings.get("contrastive_weight") else ())
    tau = settings.get("contrastive_temperature", 1.0)
    for key in keys:
        assert abs(logs[key] - ref[key]) <= loss_tol * (1 + len(PAIRS)) * 2 / min(tau, 1.0), (key, logs[key], ref[key])
    pair_tol = fp32(WIDTH * (2 * LAYERS + 1), 2.0)
    assert len(logs["pair_losses"]) == len(ref["pair_losses"])
    for ours, want in zip(logs["pair_losses"], ref["pair_losses"]):
        assert abs(ours - want) <= pair_tol, (ours, want)
    for key, want in ref_grads.items():
        got = grads[key].double()
        assert (got - want).abs().max().item() <= fp32(WIDTH * (2 * LAYERS + 1) * 32, want.abs().max().item()), key


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_every_layout_equals_tp1(tiny_checkpoint, tp1_steps, layout_steps, layout):
    """At TP=2 and PP=2 (with pairs whose states cross pipeline stages, with top-k under a
    split vocabulary, in float16 with the loss scale, and an MoE student and teacher under
    sequence parallelism) losses and every gradient equal TP=1's; at every layout, DP=2
    included, the step reads the same samples (token fingerprint) and has the same losses."""
    from tolerances import fp16_same_ops, fp32, log_softmax_sum

    for name, (*_, settings) in _runs(tiny_checkpoint).items():
        fp16 = settings.get("dtype") == "float16"
        if fp16 and layout == "tp2":
            continue  # float16 sums in another order (TP) bound nothing useful; PP and DP keep the order
        logs, grads, _ = tp1_steps[name]
        merged: dict[str, torch.Tensor] = {}
        parts = sorted(layout_steps[layout].glob("rank*.pt"))
        assert len(parts) == 2, parts  # every rank writes its part
        for part in parts:
            saved = torch.load(part)[name]
            assert saved["logs"]["samples_fingerprint"] == logs["samples_fingerprint"], name
            # another split of the same float32 arithmetic: row-parallel sums and vocabulary
            # shards reduced in another order; the loss terms are log-softmax sums
            tol = log_softmax_sum(1000, 10.0) * settings["kd_temperature"] ** 2
            for key in ("loss", "kd_loss", "ce_loss"):
                assert abs(saved["logs"][key] - logs[key]) <= tol, (name, key)
            assert ("moe_aux_loss" in saved["logs"]) == ("moe_aux_loss" in logs)
            if "moe_aux_loss" in logs:  # the same sums, split over ranks
                assert abs(saved["logs"]["moe_aux_loss"] - logs["moe_aux_loss"]) <= AUX_TOL
            for a, b in zip(saved["logs"]["pair_losses"], logs["pair_losses"]):
                assert abs(a - b) <= fp32(WIDTH * (2 * LAYERS + 1), 2.0), name
            merged.update(saved["grads"])
        if layout == "dp2":
            continue  # the distributed optimizer leaves each rank only its shard of the reduced gradients
        assert merged.keys() == grads.keys(), name
        for key, ref in grads.items():
            # float32: each gradient is a sum over the step's 64 tokens of products that passed
            # through the layers (accumulation over tokens x widths x layers); float16 at PP=2:
            # the same operations, the first stage's pair gradient joining at another point
            scale = ref.abs().max().item()
            tol = fp16_same_ops(LAYERS, scale) if fp16 else fp32(64 * WIDTH * (2 * LAYERS + 1), scale)
            assert (merged[key] - ref).abs().max().item() <= tol, (name, key)


STEPS = 12  # checkpoints at 3, 6 and 9: a signal seen anywhere before step 8 leaves a later one


def _distill_args(teacher, student, out, *extra) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--student", str(student), "--data", "builtin:train", "--out",
            str(out), "--steps", str(STEPS), "--global-batch", "4", "--micro-batch", "2", "--seq-len", "16", "--lr",
            "1e-3", "--warmup-steps", "0", "--save-every", "3", "--eval-every", "4", "--eval-samples", "4",
            "--kd-pairs", "1:2,0:1", "--ce-weight", "0.5", "--dtype", "float32",
            # DataLoader processes, as on a GPU (a CPU's default is none): the stop and kill
            # tests then show that they survive the signals and resume the same samples
            "--data-workers", "2", *map(str, extra)]


def _distill_here(*args) -> None:
    """``nemo-minitron ARGS`` in this process, with one torch thread as the runs started as
    processes have (OMP_NUM_THREADS=1): the same kernels, the same last bits."""
    from nemo_minitron.cli import main

    with torch_threads(1):
        assert main(list(args)) == 0


def _start(args, log: Path) -> subprocess.Popen:
    """``nemo-minitron ARGS`` as a process group of its own (as Slurm signals a job step: the
    run and its checkpoint writer's helper process), logging to a file, not a pipe."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "nemo_minitron", *args], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _latest(out: Path) -> int:
    marker = out / "checkpoints" / "latest"
    return int(marker.read_text().strip().split("_")[1]) if marker.exists() else 0


@pytest.fixture(scope="module")
def straight(tiny_checkpoint, tmp_path_factory):
    """The training records of an uninterrupted run."""
    out = tmp_path_factory.mktemp("straight") / "run"
    _distill_here(*_distill_args(tiny_checkpoint("llama"), tiny_checkpoint("llama_small"), out))
    return train_records(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def interrupted(tiny_checkpoint, tmp_path_factory):
    """The same run stopped by SIGTERM right after its first step, started again and killed
    (SIGKILL) right after its next checkpoint, then finished; and a copy of the killed run."""
    root = tmp_path_factory.mktemp("interrupted")
    out = root / "run"
    args = _distill_args(tiny_checkpoint("llama"), tiny_checkpoint("llama_small"), out)
    proc = _start(args, root / "stopped.log")
    with frozen_when(proc, lambda: train_records(out / "metrics.jsonl"), "its first step"):
        signalled_after = train_records(out / "metrics.jsonl")[-1]["step"]
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=300)
    stopped = {"returncode": proc.returncode, "log": (root / "stopped.log").read_text(), "at": _latest(out),
               "signalled_after": signalled_after, "steps": [r["step"] for r in train_records(out / "metrics.jsonl")],
               "summary": (out / "summary.json").exists()}
    assert stopped["at"] < 9, stopped  # a later checkpoint is still to come

    proc = _start(args, root / "killed.log")
    with frozen_when(proc, lambda: _latest(out) > stopped["at"], "its next checkpoint"):
        assert not (out / "summary.json").exists(), "the run finished before it was killed"
        killed_at = _latest(out)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    shutil.copytree(out, root / "killed-copy")
    _distill_here(*args)
    return {"stopped": stopped, "killed_at": killed_at, "out": out, "killed_copy": root / "killed-copy",
            "args": args}


def test_auto_pair_weights_follow_their_definition(straight):
    """After each step every pair is weighted so that the pairs' weighted mean equals that
    step's logit loss (kd + 0.5 ce): w_i = logit / (2 pair_i); 1/2 each at the start."""
    assert [r["step"] for r in straight] == list(range(1, STEPS + 1))
    assert straight[0]["pair_weights"] == [0.5, 0.5]
    for before, after in zip(straight, straight[1:]):
        logit = before["kd_loss"] + 0.5 * before["ce_loss"]
        want = [logit / (2 * p) for p in before["pair_losses"]]
        assert all(abs(w - v) <= 1e-6 * v for w, v in zip(after["pair_weights"], want)), (after, want)
        logit_part = after["kd_loss"] + 0.5 * after["ce_loss"]
        total = logit_part + sum(w * p for w, p in zip(after["pair_weights"], after["pair_losses"]))
        assert abs(after["loss"] - total) <= 1e-6 * total


def test_sigterm_saves_at_the_next_step_boundary_and_exits_0(interrupted):
    """The signal reached the run (held stopped) after step N: it finishes the step it is in
    (N + 1) or stops at N, saves a training checkpoint there, logs why, and exits 0 with
    nothing final written."""
    stopped = interrupted["stopped"]
    assert stopped["returncode"] == 0 and "stop requested (SIGTERM)" in stopped["log"], stopped["log"][-3000:]
    assert stopped["at"] in (stopped["signalled_after"], stopped["signalled_after"] + 1), stopped
    assert stopped["steps"] == list(range(1, stopped["at"] + 1)) and not stopped["summary"]


def test_data_workers_default_to_none_on_a_cpu_and_two_with_a_gpu():
    from nemo_minitron.distill.config import DistillConfig, resolved_data_workers

    assert DistillConfig().data_workers is None  # unset: the device decides
    assert resolved_data_workers(None, gpu=False) == 0 and resolved_data_workers(None, gpu=True) == 2
    assert resolved_data_workers(3, gpu=False) == 3 and resolved_data_workers(0, gpu=True) == 0


def test_killed_run_resumes_with_the_losses_and_samples_of_an_uninterrupted_run(interrupted, straight):
    """Killed (SIGKILL) after a checkpoint and started again, the run ends with the losses
    and the samples (token fingerprints) of an uninterrupted run."""
    out = interrupted["out"]
    got = train_records(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in straight]  # no step lost or repeated
    for a, b in zip(got, straight):
        # the same float32 operations on bit-identical restored state: equal up to the last bits
        assert abs(a["loss"] - b["loss"]) <= 4 * 2.0 ** -24 * abs(b["loss"]), (a, b)
        # the same tokens in the same positions of each step's samples
        assert a["samples_fingerprint"] == b["samples_fingerprint"] and a["consumed_samples"] == 4 * a["step"]
    assert len({r["samples_fingerprint"] for r in straight}) == len(straight)  # every step reads new samples
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["student_after"]["heldout_loss"] > 0
    assert not summary["forced_resumes"]
    assert (out / "final" / "nemo_minitron.json").is_file() and (out / "tensorboard").is_dir()


def _changed_run(interrupted, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the killed run, and its arguments with another learning rate."""
    out = tmp_path / "run"
    shutil.copytree(interrupted["killed_copy"], out)
    args = [str(out) if a == str(interrupted["out"]) else a for a in interrupted["args"]]
    args[args.index("--lr") + 1] = "5e-4"
    return out, args


def test_a_resume_with_changed_settings_is_refused_naming_the_key(interrupted, tmp_path, capsys):
    out, args = _changed_run(interrupted, tmp_path)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, stderr = cli_in_process(capsys, *args)
    assert code == 2 and "lr 0.001 -> 0.0005" in stderr and "--force" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written


def test_a_forced_resume_follows_the_new_schedule(interrupted, tmp_path):
    out, args = _changed_run(interrupted, tmp_path)
    _distill_here(*args, "--force")
    at = interrupted["killed_at"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["forced_resumes"] == [{"step": at, "changed": {"lr": [0.001, 0.0005]}}]
    assert summary["config"]["lr"] == 5e-4
    # the schedule is the new one from the checkpoint on: cosine from 5e-4 to 5e-5 (no warm-up)
    records = train_records(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records[at:]:
        progress = (record["step"] - 1) / STEPS
        want = 5e-5 + 0.5 * (5e-4 - 5e-5) * (1 + math.cos(math.pi * progress))
        assert abs(record["lr"] - want) <= 1e-9, record


def _kl_to_teacher(teacher, student, samples) -> float:
    """Mean KL(teacher || student) per token over ``samples``, from the two models' full
    float32 logits, written out directly."""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.model.forward import full_logits

    logits = {}
    for side, path in (("teacher", teacher), ("student", student)):
        opened = open_model(str(path))
        logits[side] = full_logits(opened.model, samples[:, :-1], opened.description.vocab_size).double()
    log_q, log_p = logits["teacher"].log_softmax(-1), logits["student"].log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean().item()


def test_distillation_moves_the_student_to_the_teacher(tiny_checkpoint, tmp_path, runtime, one_thread, capsys):
    """Distillation with the logit loss alone makes the student's next-token distributions
    approach the teacher's on held-out text; cross-entropy training on the same data does
    not (so a broken KD term, replaced by or reduced to CE, fails here). Fine-tuning lowers
    the held-out loss, and both final students are checkpoints the other commands read."""
    from nemo_minitron.checkpoint.store import load_tokenizer
    from nemo_minitron.data.dataset import check_corpus

    teacher, student = tiny_checkpoint("llama"), tiny_checkpoint("llama_small")
    heldout = check_corpus(["builtin:heldout"]).dataset(load_tokenizer(student), seq_len=32, seed=3,
                                                        num_samples=16).take()
    before = _kl_to_teacher(teacher, student, heldout)
    kl = {}
    for name, teacher_arg in (("kd", teacher), ("ce", "none")):
        out = tmp_path / name
        code, stderr = cli_in_process(capsys, "distill", "--teacher", teacher_arg, "--student", student, "--data",
                                      "builtin:train", "--out", out, "--steps", "12", "--global-batch", "4",
                                      "--micro-batch", "4", "--seq-len", "32", "--lr", "3e-3", "--eval-samples", "8",
                                      "--warmup-steps", "1")
        assert code == 0, stderr[-3000:]
        kl[name] = _kl_to_teacher(teacher, out / "final", heldout)
        summary = json.loads((out / "summary.json").read_text())
        if name == "ce":
            assert summary["student_after"]["heldout_loss"] < summary["student_before"]["heldout_loss"]
    # the teacher is a random model: the data does not resemble it, so only KD can approach it
    assert kl["kd"] < 0.5 * before and kl["kd"] < 0.5 * kl["ce"], (before, kl)
    # started again into the same --out: a finished run, said so, with what to do
    code, err = cli_in_process(capsys, "distill", "--teacher", teacher, "--student", student, "--data",
                               "builtin:train", "--out", tmp_path / "kd", "--steps", "12", "--seq-len", "32")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"holds a finished run (summary.json; its model is '{tmp_path / 'kd' / 'final'}')" in err
    assert f"--student {tmp_path / 'kd' / 'final'}" in err
    code, stderr = cli_in_process(capsys, "eval", tmp_path / "kd" / "final", "--data", "builtin:heldout", "--seq-len",
                                  "32", "--max-tokens", "256")
    assert code == 0, stderr[-2000:]


def test_projection_starts_as_the_channel_selection(tiny_checkpoint, tmp_path, runtime):
    """A student whose hidden channels were pruned from the teacher's starts each pair's
    projection as the map from each student channel to the teacher channel it was cut
    from: found here by matching embedding columns, not from the pruning record."""
    from test_prune import synthetic_scores

    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.distill.api import _projection_init
    from nemo_minitron.model.params import named_weights
    from nemo_minitron.prune.api import prune

    teacher = tiny_checkpoint("llama")
    imp = tmp_path / "imp"
    imp.mkdir()
    synthetic_scores(read_info(teacher).description, imp, seed=9)
    student = prune(str(teacher), str(imp), str(tmp_path / "pruned"), target={"hidden": 40})
    emb = {side: dict(named_weights(open_model(str(path)).model))["embedding.word_embeddings.weight"].detach()
           for side, path in (("teacher", teacher), ("student", student))}
    expected = torch.zeros(64, 40)
    for c in range(40):
        matches = [j for j in range(64) if torch.equal(emb["teacher"][:, j], emb["student"][:, c])]
        assert len(matches) == 1
        expected[matches[0], c] = 1.0
    init = _projection_init(str(student), read_info(student).description, read_info(teacher).description)
    assert torch.equal(init, expected)
    small = tiny_checkpoint("llama_small")
    assert _projection_init(str(small), read_info(small).description, read_info(teacher).description) is None


def test_distillation_model_returns_the_output_layers_logits_uncopied(tiny_checkpoint, runtime):
    """Both models' logits leave the distillation model as the output layers' own tensors,
    [b, s, vocab] and contiguous (GPTModel's [s, b] -> [b, s] transpose copies nothing), and
    they, the student's gradients and the loss equal those of the student and teacher
    called directly, within float32 rounding."""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.distill.model import DistillationModel
    from nemo_minitron.model.forward import position_ids

    teacher = open_model(str(tiny_checkpoint("llama")), dtype=torch.float32)
    opened = open_model(str(tiny_checkpoint("llama_small")), dtype=torch.float32)
    student, desc = opened.model, opened.description
    model = DistillationModel(student, teacher.model, [])
    tokens = torch.randint(0, desc.vocab_size, (3, 20), generator=torch.Generator().manual_seed(6))
    mix = torch.randn(3, 20, desc.padded_vocab_size, generator=torch.Generator().manual_seed(7))
    raw = {}
    for side, m in (("student", student), ("teacher", teacher.model)):
        m.output_layer.register_forward_hook(lambda module, args, output, side=side: raw.__setitem__(side, output[0]))

    def run(fn):
        student.zero_grad(set_to_none=True)
        out, teacher_out = fn()
        ((out + teacher_out) * mix).sum().backward()
        return out.detach(), teacher_out, {n: p.grad.clone() for n, p in student.named_parameters()}

    def through_model():
        out = model(tokens, position_ids(tokens), None)
        return out, model.last_teacher_logits

    def direct():
        with torch.no_grad():
            teacher_out = teacher.model(tokens, position_ids(tokens), None)
        return student(tokens, position_ids(tokens), None), teacher_out

    out, teacher_out, grads = run(through_model)
    for side, logits in (("student", out), ("teacher", teacher_out)):
        assert logits.shape == (3, 20, desc.padded_vocab_size) and logits.is_contiguous()
        assert logits.data_ptr() == raw[side].data_ptr(), side  # no copy after the output layer
    want, want_teacher, want_grads = run(direct)
    assert raw["student"].data_ptr() != want.data_ptr()  # called directly, GPTModel copies
    widest = lambda d: max(d.hidden_size, d.ffn_hidden_size, d.num_attention_heads * d.head_dim)  # noqa: E731
    width = widest(desc)
    for got, ref, d in ((out, want, desc), (teacher_out, want_teacher, teacher.description)):
        assert (got - ref).abs().max().item() <= transformer_logits(widest(d), d.num_layers, ref)
    for name, ref in want_grads.items():
        # the output layer's gradient sums over the tokens in another order
        tol = fp32(tokens.numel() * width * (2 * desc.num_layers + 1), ref.abs().max().item())
        assert (grads[name] - ref).abs().max().item() <= tol, name


def test_optimizer_steps_are_adamw_with_clipping_in_torchs_fused_kernel(tiny_checkpoint, runtime):
    """On a CPU megatron-core's optimizer runs torch's fused AdamW kernel, and two steps move
    every weight as AdamW written out in float64 does (decoupled weight decay, bias
    corrections, the gradients clipped to the configured total norm first)."""
    trainer = make_trainer(str(tiny_checkpoint("llama")), str(tiny_checkpoint("llama_small")), 1, 1,
                           dict(global_batch=2, micro_batch=2, seq_len=16, lr=2e-2, warmup_steps=0, clip_grad=0.5),
                           steps=2)
    groups = [g for inner in trainer.optimizer.chained_optimizers for g in inner.optimizer.param_groups]
    assert all(g["fused"] for g in groups)
    beta1, beta2, eps = 0.9, 0.95, 1e-8  # the trainer's AdamW settings
    weights = {p: p.detach().double().clone() for g in groups for p in g["params"]}
    moments = {p: (torch.zeros_like(w), torch.zeros_like(w)) for p, w in weights.items()}
    for step in range(1, 3):
        trainer.ddp.zero_grad_buffer()
        trainer.optimizer.zero_grad()
        trainer._forward_backward(iter(trainer.step_batches(step - 1)))
        grads = {p: p.main_grad.double().clone() for p in weights}
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
        clip = min(1.0, 0.5 / (norm + 1e-6))
        settings = [(g["lr"], g["weight_decay"], g["params"]) for g in groups]
        trainer.optimizer.step()
        trainer.scheduler.step(increment=1)
        for lr, wd, params in settings:
            for p in params:
                g, (m, v), w = grads[p] * clip, moments[p], weights[p]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).add_(g.square(), alpha=1 - beta2)
                update = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + eps)
                w.mul_(1 - lr * wd).sub_(lr * update)
    n = sum(w.numel() for w in weights.values())
    for p, want in weights.items():
        # float32 rounding of a few operations per weight, and of the clipping factor: the
        # total norm sums the squares of all n gradients
        tol = fp32(16, want.abs().max().item()) + fp32(n, 2e-2)  # 2e-2: the largest learning rate
        assert (p.detach().double() - want).abs().max().item() <= tol


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
    ("reverse_top_k", ["--kd-top-k needs --kd-loss forward"]),
    ("weights", ["--kd-weight, --ce-weight and --contrastive-weight are all 0"]),
    ("contrastive_synthetic", ["--contrastive-weight needs --method logits"]),
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
    elif case == "reverse_top_k":
        flags = ["--kd-loss", "reverse", "--kd-top-k", "5"]
    elif case == "weights":
        flags = ["--kd-weight", "0"]
    elif case == "contrastive_synthetic":
        flags = ["--contrastive-weight", "0.5", "--method", "both", "--synthetic-data", str(tmp_path)]
    else:
        flags = ["--kd-pairs", "1:9"]
    out = tmp_path / "out"
    code, stderr = cli_in_process(capsys, "distill", "--teacher", teacher, "--student", student, "--data",
                                  "builtin:train", "--out", out, "--steps", "2", "--seq-len", "16", *flags)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert all(w in stderr for w in words), stderr
    assert not out.exists()
