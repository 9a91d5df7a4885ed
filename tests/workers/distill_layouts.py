"""Worker: one distillation forward-backward per test configuration at a layout; writes
losses and gradients. ``--moe``: also the mixture-of-experts configurations, with that
teacher and student.

    distill_layouts.py TEACHER STUDENT OUT_DIR [--tp N] [--pp N] [--moe MOE_TEACHER MOE_STUDENT]
"""

import sys
from pathlib import Path

import torch


def main() -> None:
    teacher, student, out, *flags = sys.argv[1:]
    tp = int(flags[flags.index("--tp") + 1]) if "--tp" in flags else 1
    pp = int(flags[flags.index("--pp") + 1]) if "--pp" in flags else 1
    from test_distill import CONFIGS, MOE_CONFIGS, one_step

    runs = {name: (teacher, student, settings) for name, settings in CONFIGS.items()}
    if "--moe" in flags:
        at = flags.index("--moe")
        runs.update({name: (flags[at + 1], flags[at + 2], settings) for name, settings in MOE_CONFIGS.items()})
    results, rank = {}, 0
    for name, (t, s, settings) in runs.items():
        logs, grads, rank = one_step(t, s, tp, pp, settings)
        results[name] = {"logs": logs, "grads": grads}
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save(results, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
