#!/usr/bin/env python3
"""Distillation step time against a plain PyTorch loop, side by side in one run.

SmolLM2-135M teaches its 84.4M width-pruned student, 8 x 256 tokens per step, one rank.

A (plain loop): the same two models as Hugging Face ``transformers`` models (exported from
the same checkpoints, default attention), per step the teacher's forward under no_grad, the
student's forward, KL between the full-vocabulary log-softmaxes (float32), backward, and an
AdamW step. B (distill): ``Trainer.train`` exactly as ``nemo-minitron distill`` runs it
(megatron-core's schedule, chunked KD loss, megatron-core's optimizer with gradient
clipping, the data loader, per-step records). Both use the same torch threads. The blocks
alternate A-B-A-... (``--rounds``) after one warm-up step each, so drift of a shared
machine shows in the block medians; the ratio is plain median step / distill median step
(distill tokens/s over the plain loop's). Each dtype in ``--dtypes`` in turn.

``--floor`` adds the older breakdown: the distillation forward-backward against its floor
(the student's forward-backward with plain cross-entropy plus the teacher's forward).

Target: ratio >= 1.0 in float32 and bfloat16."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from common import builtin_samples, hf_export, parser, pruned_smollm2_width, smollm2_checkpoint, write_results

SEQ_LEN, GLOBAL_BATCH = 256, 8


def cpu_capability() -> dict:
    """What the CPU kernels run on: ATen's capability and whether bf16 matmuls are native."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    onednn_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    isa_allows = onednn_isa.upper() in ("", "ALL", "DEFAULT") or "BF16" in onednn_isa.upper() \
        or "AMX" in onednn_isa.upper()  # oneDNN does the bf16 matmuls
    native = ("avx512_bf16" in flags or "amx_bf16" in flags) and cap.startswith("AVX512") and isa_allows
    return {"cpu_capability": cap, "native_bf16": bool(native), "ONEDNN_MAX_CPU_ISA": onednn_isa or None,
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY")}


def plain_loop(teacher_dir: Path, student_dir: Path, batches, dtype):
    """One step of the plain loop, as a function (the models and AdamW built once)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=dtype).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)

    def step() -> float:
        start = time.perf_counter()
        for batch in batches:
            with torch.no_grad():
                t = teacher(input_ids=batch["tokens"]).logits
            s = student(input_ids=batch["tokens"]).logits
            loss = F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True,
                            reduction="none").sum(-1).mean() / len(batches)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def distill_trainer(teacher_ckpt: Path, student_ckpt: Path, samples, dtype, micro_batch: int):
    """``Trainer`` as ``distill`` builds it; returns (trainer, run(k) -> the k steps' seconds)."""
    from nemo_minitron.checkpoint.store import load_checkpoint, read_info
    from nemo_minitron.distill.config import DistillConfig
    from nemo_minitron.distill.train import Trainer

    student, _ = load_checkpoint(student_ckpt, dtype=dtype)
    teacher, _ = load_checkpoint(teacher_ckpt, dtype=dtype)
    cfg = DistillConfig(steps=1000, global_batch=GLOBAL_BATCH, micro_batch=micro_batch, seq_len=SEQ_LEN,
                        save_every=0)
    trainer = Trainer(student, teacher, samples, None, Path("/nonexistent"), cfg, seed=1234,
                      student_desc=read_info(student_ckpt).description,
                      teacher_desc=read_info(teacher_ckpt).description, progress=False)
    records: list[dict] = []

    class Records:  # in place of metrics.jsonl: the per-step records train() writes
        def record(self, rec: dict) -> None:
            records.append(rec)

    trainer.metrics = Records()

    def run(k: int) -> list[float]:
        cfg.steps = trainer.step + k  # train() stops there without saving
        before = len(records)
        trainer.train()
        return [r["step_seconds"] for r in records[before:]]

    return trainer, run


def compare(dtype_name: str, args, samples, teacher_hf: Path, student_hf: Path) -> dict:
    """A-B-A blocks of plain-loop and distill steps in one dtype."""
    from nemo_minitron.checkpoint.store import parse_dtype
    from nemo_minitron.model.forward import split_microbatches

    dtype = parse_dtype(dtype_name)
    plain = plain_loop(teacher_hf, student_hf, split_microbatches(samples[:GLOBAL_BATCH], args.micro_batch), dtype)
    _, distill = distill_trainer(smollm2_checkpoint(), pruned_smollm2_width(), samples, dtype, args.micro_batch)
    plain()
    distill(1)  # warm-up: first allocations, worker start
    blocks = []
    for i in range(2 * args.rounds + 1):
        side = "plain" if i % 2 == 0 else "distill"
        load, cpu = os.getloadavg()[0], time.process_time()
        secs = [plain() for _ in range(args.steps)] if side == "plain" else distill(args.steps)
        cpu = (time.process_time() - cpu) / args.steps  # this process's threads, less sensitive to load
        blocks.append({"side": side, "seconds": [round(s, 3) for s in secs], "cpu_seconds_per_step": round(cpu, 3),
                       "loadavg_1min": round(load, 2)})
        print(f"{dtype_name} {side}: {secs} s, {cpu:.1f} CPU s per step (load {load:.1f})", flush=True)
    med = {side: statistics.median(s for b in blocks if b["side"] == side for s in b["seconds"])
           for side in ("plain", "distill")}
    cpu = {side: statistics.median(b["cpu_seconds_per_step"] for b in blocks if b["side"] == side)
           for side in ("plain", "distill")}
    tokens = GLOBAL_BATCH * SEQ_LEN
    return {"blocks": blocks, "median_seconds": med,
            "tokens_per_second": {k: round(tokens / v, 1) for k, v in med.items()},
            "ratio_distill_over_plain_throughput": round(med["plain"] / med["distill"], 4),
            "median_cpu_seconds_per_step": cpu, "ratio_by_cpu_time": round(cpu["plain"] / cpu["distill"], 4)}


def floor_breakdown(args, samples) -> dict:
    """Distillation forward-backward / (student forward-backward with CE + teacher forward),
    the optimizer step timed on its own (megatron-core's schedule throughout)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_minitron.checkpoint.store import parse_dtype
    from nemo_minitron.distill.config import TrainingConfig
    from nemo_minitron.distill.losses import LogitLossConfig
    from nemo_minitron.distill.train import make_forward_step
    from nemo_minitron.model.forward import lm_forward_step, run_forward_only, split_microbatches
    from nemo_minitron.runtime.distributed import layout

    dtype = parse_dtype(args.dtypes.split(",")[0])
    batches = split_microbatches(samples[:GLOBAL_BATCH], args.micro_batch)
    trainer, _ = distill_trainer(smollm2_checkpoint(), pruned_smollm2_width(), samples, dtype, args.micro_batch)
    student, teacher, vocab = trainer.student, trainer.teacher, trainer.student_desc.vocab_size
    finetune_step = make_forward_step(LogitLossConfig.of(TrainingConfig(), vocab), layout().device, False)
    fb = get_forward_backward_func()
    common = dict(num_microbatches=len(batches), seq_length=SEQ_LEN, micro_batch_size=args.micro_batch,
                  forward_only=False)

    def distill_fb():
        trainer.ddp.zero_grad_buffer()
        trainer.module.num_microbatches = len(batches)
        fb(forward_step_func=trainer.forward_step, data_iterator=iter(batches), model=[trainer.ddp], **common)

    def student_fb():  # the same student weights (gradients land in DDP's buffers), no teacher
        trainer.ddp.zero_grad_buffer()
        finalize, student.config.finalize_model_grads_func = student.config.finalize_model_grads_func, None
        fb(forward_step_func=finetune_step, data_iterator=iter(batches), model=[student], **common)
        student.config.finalize_model_grads_func = finalize

    fns = {"distill_forward_backward": distill_fb, "student_forward_backward": student_fb,
           "teacher_forward": lambda: run_forward_only(teacher, batches, lm_forward_step(vocab, layout().device)),
           "optimizer_step": lambda: trainer.optimizer.step()}
    timings: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in timings.items()}
    floor = med["student_forward_backward"] + med["teacher_forward"]
    return {"dtype": str(dtype), "median_seconds": med, "all_seconds": timings,
            "ratio_distill_over_floor": round(med["distill_forward_backward"] / floor, 4)}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, each compared in turn")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="steps per block")
    p.add_argument("--rounds", type=int, default=1, help="A-B pairs after the first A block (1: A-B-A)")
    p.add_argument("--floor", action="store_true", help="also the forward-backward / floor breakdown")
    args = p.parse_args()

    import torch

    from nemo_minitron.checkpoint.store import load_tokenizer
    from nemo_minitron.runtime.distributed import init_distributed

    init_distributed(1, 1)
    student_ckpt = pruned_smollm2_width()
    teacher_hf, student_hf = hf_export(smollm2_checkpoint()), hf_export(student_ckpt)
    samples = builtin_samples("train", load_tokenizer(student_ckpt), SEQ_LEN,
                              num_samples=GLOBAL_BATCH * (2 + (2 * args.rounds + 1) * args.steps)).take()
    cpu = cpu_capability()
    print(cpu, "threads", torch.get_num_threads(), flush=True)
    results = {"benchmark": "distill_step_time", "teacher": "SmolLM2-135M", "student": "84.4M (width-pruned)",
               "tokens_per_step": GLOBAL_BATCH * SEQ_LEN, "micro_batch": args.micro_batch,
               "threads": torch.get_num_threads(), **cpu, "target": ">= 1.0 (distill / plain tokens per second)"}
    for name in args.dtypes.split(","):
        results[name] = compare(name, args, samples, teacher_hf, student_hf)
    if args.floor:
        results["floor"] = floor_breakdown(args, samples)
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_results(args, results)


if __name__ == "__main__":
    main()
