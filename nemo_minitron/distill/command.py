"""``nemo-minitron distill`` and ``teacher-logits``: argument handling; the work is in
``distill.api`` and ``distill.teacher_logits``.

A handler checks what it can without torch, then imports its stage once (megatron-core
takes seconds to import; a usage error should not wait for it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nemo_minitron.commands import data_options, runtime_options
from nemo_minitron.config import default_of, flag_of, from_args
from nemo_minitron.distill.config import DistillConfig, TeacherLogitsConfig, TrainingConfig
from nemo_minitron.distill.modelopt_yaml import KDSettings, read_kd_yaml
from nemo_minitron.errors import require
from nemo_minitron.files import check_model, check_new_output, check_output_dir


def main(args) -> int:
    common = dict(eval_data=args.eval_data, resume=args.resume, force=args.force, **runtime_options(args),
                  **data_options(args))
    require(args.teacher is not None or args.teacher_logits is not None,
            "give --teacher CKPT (or none), or --teacher-logits DIR")
    if args.config:
        _apply_kd_yaml(args)
    finetuning = args.teacher is not None and args.teacher.lower() == "none"  # cross-entropy, the baseline
    if finetuning:
        require(args.teacher_logits is None, "--teacher none with --teacher-logits: give one of them")
        require(args.synthetic_data is None, "--synthetic-data goes with a --teacher (--method synthetic or both)")
        require(args.data is not None, "--data is required for fine-tuning")
    cfg = from_args(TrainingConfig if finetuning else DistillConfig, args)
    check_model(args.student, "--student")
    if args.teacher is not None and not finetuning:
        check_model(args.teacher, "--teacher")
    if args.teacher_logits is not None:
        require(Path(args.teacher_logits).is_dir(), f"--teacher-logits '{args.teacher_logits}' does not exist")
    check_output_dir(args.out, "--out")
    from nemo_minitron.distill import api  # deferred: start-up time of the error path

    if finetuning:
        api.finetune(args.student, args.data, args.out, cfg, **common)
    else:
        api.distill(args.teacher, args.student, args.data, args.out, cfg, teacher_logits=args.teacher_logits,
                    synthetic_data=args.synthetic_data, **common)
    return 0


def teacher_logits_main(args) -> int:
    cfg = from_args(TeacherLogitsConfig, args)
    check_model(args.teacher, "--teacher")
    check_new_output(args.out, "--out")
    from nemo_minitron.distill.teacher_logits import write_teacher_logits  # deferred: start-up time

    write_teacher_logits(args.teacher, args.data, args.out, cfg, **runtime_options(args), **data_options(args))
    return 0


def _apply_kd_yaml(args) -> None:
    """--config KD.yaml (ModelOpt's distillation settings) sets the loss options; giving one
    of them on the command line too is an error, not a silent override."""
    require(args.teacher_logits is not None or args.teacher.lower() != "none",
            "--config needs a --teacher or --teacher-logits")
    settings = read_kd_yaml(args.config)
    for f in dataclasses.fields(KDSettings):
        require(getattr(args, f.name) == default_of(DistillConfig, f.name),
                f"--config sets the distillation losses; drop {flag_of(DistillConfig, f.name)}")
    for key, value in settings.as_kwargs().items():
        setattr(args, key, value)
