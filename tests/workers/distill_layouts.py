"""Worker: one distillation forward-backward at a layout; writes losses and gradients.

    distill_layouts.py TEACHER STUDENT OUT_DIR [--tp N] [--pp N]
"""

import sys
from pathlib import Path

import torch

from test_distill import PAIRS, SETTINGS


def main() -> None:
    teacher, student, out, *flags = sys.argv[1:]
    tp = int(flags[flags.index("--tp") + 1]) if "--tp" in flags else 1
    pp = int(flags[flags.index("--pp") + 1]) if "--pp" in flags else 1
    from test_distill import one_step

    logs, grads, rank = one_step(teacher, student, tp, pp)
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save({"logs": logs, "grads": grads}, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
