#!/usr/bin/env python3
"""CPU step time of a hybrid (Nemotron-H) student's distillation step against transformers.

Teacher: benchmarks/hybrid_model.py's trained hybrid; student: it pruned by magnitude
(Mamba heads 16, hidden 320, ffn 1024, 12 layers). Ours: the teacher-student model through
megatron-core's schedule (teacher forward, student forward and backward, chunked KD loss;
megatron-core's MambaModel with the PyTorch Mamba-2 kernels of model/ssm_kernels.py).
transformers: the same two models as ``NemotronHForCausalLM`` (their PyTorch Mamba-2 path),
teacher forward without gradients, student forward and backward of the same KL loss on
full logits. Same micro-batches, float32, one process, alternated repeats, medians; the
CPU's capability (ATen's dispatch level) is printed with the results.

    python benchmarks/hybrid_kd_step_time.py [--seq-len 256] [--micro-batch 4] [--repeats 3] [--quick]
"""

from __future__ import annotations

from pathlib import Path

from common import CACHE, builtin_samples, parser, time_side_by_side, write_results
from hybrid_model import trained_hybrid_checkpoint

STUDENT = {"mamba_heads": 16, "hidden": 320, "ffn": 1024, "layers": 12}


def student_checkpoint(teacher: Path, quick: bool) -> tuple[Path, Path]:
    """The magnitude-pruned student (project checkpoint, Hugging Face export), made once."""
    from nemo_minitron.checkpoint.api import export
    from nemo_minitron.importance.api import compute_importance
    from nemo_minitron.prune.api import prune

    root = CACHE / "hybrid_kd_step_time" / ("quick" if quick else "full")
    ckpt, hf = root / "student", root / "student-hf"
    if not hf.exists():
        root.mkdir(parents=True, exist_ok=True)
        imp = root / "importance"  # magnitude order: the importance file only carries the layer choice
        if not imp.exists():
            compute_importance(str(teacher), ["builtin:calib"], str(imp), samples=2, seq_len=64, layer_samples=1,
                               greedy_layers=False, progress=False)
        if not ckpt.exists():
            prune(str(teacher), str(imp), str(ckpt), target=STUDENT, order="magnitude", layer_metric="loss")
        export(str(ckpt), str(hf))
    return ckpt, hf


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="the 3-step model, 64 tokens, one repeat")
    args = p.parse_args()
    if args.quick:
        args.seq_len, args.micro_batch, args.microbatches, args.repeats = 64, 2, 1, 1

    import torch
    import torch.nn.functional as F
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer, read_info
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.distill.config import DistillConfig
    from nemo_minitron.distill.train import Trainer
    from nemo_minitron.model.forward import split_microbatches
    from nemo_minitron.runtime.distributed import init_distributed

    teacher_ckpt = trained_hybrid_checkpoint(quick=args.quick)
    student_ckpt, student_hf = student_checkpoint(teacher_ckpt, args.quick)
    teacher_hf = teacher_ckpt.parent / ("quick" if args.quick else "hf")
    init_distributed(1, 1)
    s_desc, t_desc = read_info(student_ckpt).description, read_info(teacher_ckpt).description
    gb = args.micro_batch * args.microbatches
    samples = builtin_samples("train", load_tokenizer(student_ckpt), args.seq_len, num_samples=gb).take()
    batches = split_microbatches(samples, args.micro_batch)
    student, _ = load_checkpoint(str(student_ckpt))
    teacher, _ = load_checkpoint(str(teacher_ckpt))
    cfg = DistillConfig(steps=10, global_batch=gb, micro_batch=args.micro_batch, seq_len=args.seq_len, logit_chunk=256)
    trainer = Trainer(student, teacher, samples, None, Path("/nonexistent"), cfg, seed=1234, student_desc=s_desc,
                      teacher_desc=t_desc, progress=False)
    fb = get_forward_backward_func()

    def ours():
        trainer.ddp.zero_grad_buffer()
        trainer.module.num_microbatches = len(batches)
        fb(forward_step_func=trainer.forward_step, data_iterator=iter(batches), model=[trainer.ddp],
           num_microbatches=len(batches), seq_length=args.seq_len, micro_batch_size=args.micro_batch, forward_only=False)

    hf_teacher, hf_student = load_hf_model(teacher_hf).float().eval(), load_hf_model(student_hf).float().train()
    vocab = s_desc.vocab_size

    def transformers_step():
        hf_student.zero_grad(set_to_none=True)
        for batch in batches:
            tokens = batch["tokens"]
            with torch.no_grad():
                target = F.log_softmax(hf_teacher(tokens, use_cache=False).logits[..., :vocab].float(), -1)
            log_q = F.log_softmax(hf_student(tokens, use_cache=False).logits[..., :vocab].float(), -1)
            loss = F.kl_div(log_q, target, log_target=True, reduction="sum") / tokens.numel() / len(batches)
            loss.backward()

    med, timings = time_side_by_side({"ours_kd_forward_backward": ours, "transformers_kd_forward_backward":
                                      transformers_step}, args.repeats)
    write_results(args, {"benchmark": "hybrid_kd_step_time", "teacher": t_desc.summary(), "student": s_desc.summary(),
                         "tokens_per_step": gb * args.seq_len, "dtype": "float32",
                         "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                         "median_seconds": med, "all_seconds": timings,
                         "ratio_ours_over_transformers": round(med["ours_kd_forward_backward"]
                                                               / med["transformers_kd_forward_backward"], 4)})


if __name__ == "__main__":
    main()
