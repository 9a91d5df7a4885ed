"""``nemo-minitron distill``: argument handling; the work is in ``distill.api``."""

from __future__ import annotations


def main(args) -> int:
    from nemo_minitron.commands import data_options, runtime_options
    from nemo_minitron.config import from_args
    from nemo_minitron.distill.api import distill, finetune
    from nemo_minitron.distill.config import DistillConfig, TrainingConfig

    common = dict(eval_data=args.eval_data, resume=args.resume, force=args.force, **runtime_options(args),
                  **data_options(args))
    if args.config:
        _apply_kd_yaml(args)
    if args.teacher.lower() == "none":  # cross-entropy fine-tuning, the baseline
        finetune(args.student, args.data, args.out, from_args(TrainingConfig, args), **common)
    else:
        distill(args.teacher, args.student, args.data, args.out, from_args(DistillConfig, args), **common)
    return 0


def _apply_kd_yaml(args) -> None:
    """--config KD.yaml (ModelOpt's distillation settings) sets the loss options; giving one
    of them on the command line too is an error, not a silent override."""
    import dataclasses

    from nemo_minitron.config import flag_of
    from nemo_minitron.distill.config import DistillConfig
    from nemo_minitron.distill.modelopt_yaml import KDSettings, read_kd_yaml
    from nemo_minitron.errors import require

    require(args.teacher.lower() != "none", "--config needs a --teacher")
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(DistillConfig)}
    settings = read_kd_yaml(args.config)
    for f in dataclasses.fields(KDSettings):
        require(getattr(args, f.name) == defaults[f.name],
                f"--config sets the distillation losses; drop {flag_of(DistillConfig, f.name)}")
    for key, value in settings.as_kwargs().items():
        setattr(args, key, value)
