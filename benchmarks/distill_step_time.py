#!/usr/bin/env python3
"""Step time of distillation against its floor, measured side by side in one run.

Floor: the student's forward and backward (with a plain cross-entropy loss) plus the
teacher's forward, each timed on its own over the same micro-batches. Distillation: the
same micro-batches through the teacher-student model (chunked KD loss). Both go through
megatron-core's schedule; the optimizer step is timed separately and excluded from the
ratio (it is the same for both). SmolLM2-135M teaches its pruned 84.5M student.
Target: ratio at most 1.10."""

from __future__ import annotations

from pathlib import Path

from common import builtin_samples, parser, pruned_smollm2, smollm2_checkpoint, time_side_by_side, write_results


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()

    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer, parse_dtype, read_info
    from nemo_minitron.distill.config import DistillConfig, TrainingConfig
    from nemo_minitron.distill.losses import LogitLossConfig
    from nemo_minitron.distill.train import Trainer, make_forward_step
    from nemo_minitron.model.forward import lm_forward_step, run_forward_only, split_microbatches
    from nemo_minitron.runtime.distributed import init_distributed, layout

    teacher_ckpt, student_ckpt = smollm2_checkpoint(), pruned_smollm2()
    init_distributed(1, 1)
    dtype = parse_dtype(args.dtype)
    s_desc = read_info(student_ckpt).description
    gb = args.micro_batch * args.microbatches
    samples = builtin_samples("train", load_tokenizer(student_ckpt), args.seq_len, num_samples=gb).take()
    batches = split_microbatches(samples, args.micro_batch)
    student, _ = load_checkpoint(student_ckpt, dtype=dtype)
    teacher, _ = load_checkpoint(teacher_ckpt, dtype=dtype)
    cfg = DistillConfig(steps=10, global_batch=gb, micro_batch=args.micro_batch, seq_len=args.seq_len,
                        logit_chunk=256)
    trainer = Trainer(student, teacher, samples, None, Path("/nonexistent"), cfg, seed=1234, student_desc=s_desc,
                      teacher_desc=read_info(teacher_ckpt).description, progress=False)
    finetune_step = make_forward_step(LogitLossConfig.of(TrainingConfig(steps=10, logit_chunk=256), s_desc.vocab_size),
                                      layout().device, False)
    fb = get_forward_backward_func()
    common = dict(num_microbatches=len(batches), seq_length=args.seq_len, micro_batch_size=args.micro_batch,
                  forward_only=False)

    def distill_fb():
        trainer.ddp.zero_grad_buffer()
        trainer.module.num_microbatches = len(batches)
        fb(forward_step_func=trainer.forward_step, data_iterator=iter(batches), model=[trainer.ddp], **common)

    def student_fb():
        # the same student weights (their gradients still land in DDP's buffers), no teacher
        trainer.ddp.zero_grad_buffer()
        finalize, student.config.finalize_model_grads_func = student.config.finalize_model_grads_func, None
        fb(forward_step_func=finetune_step, data_iterator=iter(batches), model=[student], **common)
        student.config.finalize_model_grads_func = finalize

    def teacher_fwd():
        run_forward_only(teacher, batches, lm_forward_step(s_desc.vocab_size, layout().device))

    def optimizer_step():
        trainer.optimizer.step()

    fns = {"distill_forward_backward": distill_fb, "student_forward_backward": student_fb,
           "teacher_forward": teacher_fwd, "optimizer_step": optimizer_step}
    med, timings = time_side_by_side(fns, args.repeats)
    floor = med["student_forward_backward"] + med["teacher_forward"]
    write_results(args, {"benchmark": "distill_step_time", "teacher": "SmolLM2-135M", "student": s_desc.summary(),
                         "tokens_per_step": gb * args.seq_len, "dtype": args.dtype,
                         "threads": torch.get_num_threads(), "median_seconds": med, "all_seconds": timings,
                         "ratio_distill_over_floor": round(med["distill_forward_backward"] / floor, 4),
                         "target": 1.10})


if __name__ == "__main__":
    main()
