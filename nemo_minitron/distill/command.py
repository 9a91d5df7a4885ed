"""``nemo-minitron distill``: argument handling; the work is in ``distill.api``."""

from __future__ import annotations


def main(args) -> int:
    from nemo_minitron.distill.api import distill, finetune

    common = dict(eval_data=args.eval_data, steps=args.steps, global_batch=args.global_batch,
                  micro_batch=args.micro_batch, seq_len=args.seq_len, lr=args.lr, min_lr=args.min_lr,
                  warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
                  eval_every=args.eval_every, eval_samples=args.eval_samples, save_every=args.save_every,
                  logit_chunk=args.logit_chunk, seed=args.seed, tp=args.tp, pp=args.pp, dtype=args.dtype,
                  resume=args.resume, split=args.split, data_cache=args.data_cache)
    if args.teacher.lower() == "none":  # cross-entropy fine-tuning, the baseline
        finetune(args.student, args.data, args.out, **common)
    else:
        distill(args.teacher, args.student, args.data, args.out, kd_temperature=args.kd_temperature,
                kd_loss=args.kd_loss, kd_top_k=args.kd_top_k, kd_weight=args.kd_weight, ce_weight=args.ce_weight,
                kd_pairs=args.kd_pairs, kd_pair_loss=args.kd_pair_loss, kd_pair_weight=args.kd_pair_weight,
                **common)
    return 0
