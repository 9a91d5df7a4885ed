"""Worker: one distillation forward-backward per test configuration at a layout; writes
losses and gradients.

    distill_layouts.py TEACHER STUDENT OUT_DIR [--tp N] [--pp N]
"""

import sys
from pathlib import Path

import torch


def main() -> None:
    teacher, student, out, *flags = sys.argv[1:]
    tp = int(flags[flags.index("--tp") + 1]) if "--tp" in flags else 1
    pp = int(flags[flags.index("--pp") + 1]) if "--pp" in flags else 1
    from test_distill import CONFIGS, one_step

    results, rank = {}, 0
    for name, settings in CONFIGS.items():
        logs, grads, rank = one_step(teacher, student, tp, pp, settings)
        results[name] = {"logs": logs, "grads": grads}
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save(results, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
