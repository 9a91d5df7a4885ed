"""``nemo-minitron distill``: argument handling; the work is in ``distill.api``."""

from __future__ import annotations


_KD_FLAGS = {"kd_temperature": "--kd-temperature", "kd_loss": "--kd-loss", "kd_top_k": "--kd-top-k",
             "kd_weight": "--kd-weight", "ce_weight": "--ce-weight", "kd_pairs": "--kd-pairs",
             "kd_pair_loss": "--kd-pair-loss", "kd_pair_weight": "--kd-pair-weight"}


def _kd_settings(args) -> dict:
    """The loss settings: from the flags, or from a ModelOpt distillation YAML (--config),
    which may not be combined with a loss flag."""
    import inspect

    from nemo_minitron.distill.api import distill
    from nemo_minitron.errors import require

    flags = {k: getattr(args, k) for k in _KD_FLAGS}
    if not args.config:
        return flags
    from nemo_minitron.distill.modelopt_yaml import read_kd_yaml

    defaults = inspect.signature(distill).parameters
    for key, flag in _KD_FLAGS.items():
        require(flags[key] == defaults[key].default or (key == "kd_pairs" and not flags[key]),
                f"--config sets the distillation losses; drop {flag}")
    require(args.teacher.lower() != "none", "--config needs a --teacher")
    return read_kd_yaml(args.config).as_kwargs()


def main(args) -> int:
    from nemo_minitron.distill.api import distill, finetune

    common = dict(eval_data=args.eval_data, steps=args.steps, global_batch=args.global_batch,
                  micro_batch=args.micro_batch, seq_len=args.seq_len, lr=args.lr, min_lr=args.min_lr,
                  warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
                  eval_every=args.eval_every, eval_samples=args.eval_samples, save_every=args.save_every,
                  logit_chunk=args.logit_chunk, seed=args.seed, tp=args.tp, pp=args.pp, dtype=args.dtype,
                  resume=args.resume)
    kd = _kd_settings(args)
    if args.teacher.lower() == "none":  # cross-entropy fine-tuning, the baseline
        finetune(args.student, args.data, args.out, **common)
    else:
        distill(args.teacher, args.student, args.data, args.out, **kd, **common)
    return 0
