"""Worker, in one process group re-laid out: at TP=2, write a teacher-logit cache (K =
vocabulary) into OUT/cache-tp2; at TP=2 and at PP=2, one distillation step from the live
teacher and one from that cache (losses and gradients, OUT/LAYOUT/rankR.pt); at DP=2,
write a K=8 cache into OUT/cache-dp2.

    teacher_logits_layouts.py TEACHER STUDENT DATA OUT
"""

import sys
from pathlib import Path

import common


def main() -> None:
    teacher, student, data, out = sys.argv[1:]
    import torch
    import torch.distributed as dist

    from test_teacher_logits import VOCAB, one_step, write_cache

    out = Path(out)
    cache = write_cache(teacher, data, out / "cache-tp2", VOCAB, tp=2)
    for layout, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2)}.items():
        results = {"live": one_step(teacher, student, data, tp, pp),
                   "cached": one_step(teacher, student, data, tp, pp, cache)}
        (out / layout).mkdir(exist_ok=True)
        torch.save(results, out / layout / f"rank{dist.get_rank()}.pt")
    write_cache(teacher, data, out / "cache-dp2", 8, tp=1, pp=1)


if __name__ == "__main__":
    common.run(main)
