"""``nemo-minitron distill``: argument handling; the work is in ``distill.api``."""

from __future__ import annotations


def main(args) -> int:
    from nemo_minitron.commands import data_options, runtime_options
    from nemo_minitron.config import from_args
    from nemo_minitron.distill.api import distill, finetune
    from nemo_minitron.distill.config import DistillConfig, TrainingConfig

    common = dict(eval_data=args.eval_data, resume=args.resume, force=args.force, **runtime_options(args),
                  **data_options(args))
    if args.teacher.lower() == "none":  # cross-entropy fine-tuning, the baseline
        finetune(args.student, args.data, args.out, from_args(TrainingConfig, args), **common)
    else:
        distill(args.teacher, args.student, args.data, args.out, from_args(DistillConfig, args), **common)
    return 0
