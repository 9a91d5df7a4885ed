"""``nemo-minitron distill`` and ``teacher-logits``: argument handling; the work is in
``distill.api`` and ``distill.teacher_logits``."""

from __future__ import annotations

from nemo_minitron.errors import require


def main(args) -> int:
    from nemo_minitron.commands import data_options, runtime_options
    from nemo_minitron.config import from_args
    from nemo_minitron.distill.api import distill, finetune
    from nemo_minitron.distill.config import DistillConfig, TrainingConfig

    common = dict(eval_data=args.eval_data, resume=args.resume, force=args.force, **runtime_options(args),
                  **data_options(args))
    require(args.teacher is not None or args.teacher_logits is not None,
            "give --teacher CKPT (or none), or --teacher-logits DIR")
    if args.config:
        _apply_kd_yaml(args)
    if args.teacher is not None and args.teacher.lower() == "none":  # cross-entropy fine-tuning, the baseline
        require(args.teacher_logits is None, "--teacher none with --teacher-logits: give one of them")
        require(args.synthetic_data is None, "--synthetic-data goes with a --teacher (--method synthetic or both)")
        require(args.data is not None, "--data is required for fine-tuning")
        finetune(args.student, args.data, args.out, from_args(TrainingConfig, args), **common)
    else:
        distill(args.teacher, args.student, args.data, args.out, from_args(DistillConfig, args),
                teacher_logits=args.teacher_logits, synthetic_data=args.synthetic_data, **common)
    return 0


def teacher_logits_main(args) -> int:
    from nemo_minitron.commands import data_options, runtime_options
    from nemo_minitron.config import from_args
    from nemo_minitron.distill.config import TeacherLogitsConfig
    from nemo_minitron.distill.teacher_logits import write_teacher_logits

    write_teacher_logits(args.teacher, args.data, args.out, from_args(TeacherLogitsConfig, args),
                         **runtime_options(args), **data_options(args))
    return 0


def _apply_kd_yaml(args) -> None:
    """--config KD.yaml (ModelOpt's distillation settings) sets the loss options; giving one
    of them on the command line too is an error, not a silent override."""
    import dataclasses

    from nemo_minitron.config import flag_of
    from nemo_minitron.distill.config import DistillConfig
    from nemo_minitron.distill.modelopt_yaml import KDSettings, read_kd_yaml
    from nemo_minitron.errors import require

    require(args.teacher_logits is not None or args.teacher.lower() != "none",
            "--config needs a --teacher or --teacher-logits")
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(DistillConfig)}
    settings = read_kd_yaml(args.config)
    for f in dataclasses.fields(KDSettings):
        require(getattr(args, f.name) == defaults[f.name],
                f"--config sets the distillation losses; drop {flag_of(DistillConfig, f.name)}")
    for key, value in settings.as_kwargs().items():
        setattr(args, key, value)
