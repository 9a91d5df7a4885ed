"""``nemo-minitron distill`` and ``teacher-logits``: argument handling; the work is in
``distill.api`` and ``distill.teacher_logits``."""

from __future__ import annotations

from nemo_minitron.errors import require


def main(args) -> int:
    from nemo_minitron.commands import runtime_options
    from nemo_minitron.config import from_args
    from nemo_minitron.distill.api import distill, finetune
    from nemo_minitron.distill.config import DistillConfig, TrainingConfig

    common = dict(eval_data=args.eval_data, resume=args.resume, force=args.force, **runtime_options(args))
    require(args.teacher is not None or args.teacher_logits is not None,
            "give --teacher CKPT (or none), or --teacher-logits DIR")
    if args.teacher is not None and args.teacher.lower() == "none":  # cross-entropy fine-tuning, the baseline
        require(args.teacher_logits is None, "--teacher none with --teacher-logits: give one of them")
        finetune(args.student, args.data, args.out, from_args(TrainingConfig, args), **common)
    else:
        distill(args.teacher, args.student, args.data, args.out, from_args(DistillConfig, args),
                teacher_logits=args.teacher_logits, **common)
    return 0


def teacher_logits_main(args) -> int:
    from nemo_minitron.commands import runtime_options
    from nemo_minitron.config import from_args
    from nemo_minitron.distill.config import TeacherLogitsConfig
    from nemo_minitron.distill.teacher_logits import write_teacher_logits

    write_teacher_logits(args.teacher, args.data, args.out, from_args(TeacherLogitsConfig, args),
                         **runtime_options(args))
    return 0
