"""Worker: at TP=2, write a teacher-logit cache (K = vocabulary) into CACHE; at TP=2 or PP=2,
one distillation step from the live teacher and one from CACHE (losses and gradients); at
PP=2 also write a K=8 cache at DP=2 into OUT/cache-dp2.

    teacher_logits_layouts.py TEACHER STUDENT DATA CACHE OUT_DIR (--tp 2 | --pp 2)
"""

import sys
from pathlib import Path

import torch


def main() -> None:
    teacher, student, data, cache, out, *flags = sys.argv[1:]
    tp = int(flags[flags.index("--tp") + 1]) if "--tp" in flags else 1
    pp = int(flags[flags.index("--pp") + 1]) if "--pp" in flags else 1
    import torch.distributed as dist

    from test_teacher_logits import VOCAB, one_step, write_cache

    if tp == 2:
        write_cache(teacher, data, cache, VOCAB, tp=2)
    results = {"live": one_step(teacher, student, data, tp, pp),
               "cached": one_step(teacher, student, data, tp, pp, cache)}
    rank = dist.get_rank()
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    if pp == 2:
        write_cache(teacher, data, Path(out) / "cache-dp2", 8, tp=1, pp=1)


if __name__ == "__main__":
    main()
