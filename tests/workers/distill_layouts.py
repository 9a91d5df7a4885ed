"""Worker: one distillation forward-backward per test configuration at each layout in
turn (one process group, re-laid out); writes losses and gradients to OUT_DIR/LAYOUT/.
``--moe``: also the mixture-of-experts configurations, with that teacher and student.

    distill_layouts.py TEACHER STUDENT OUT_DIR LAYOUT... [--moe MOE_TEACHER MOE_STUDENT]
    LAYOUT: tp2 | pp2 | dp2
"""

import sys
from pathlib import Path

import torch

import common

LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}


def main() -> None:
    teacher, student, out, *flags = sys.argv[1:]
    from test_distill import CONFIGS, MOE_CONFIGS, one_step

    runs = {name: (teacher, student, settings) for name, settings in CONFIGS.items()}
    if "--moe" in flags:
        at = flags.index("--moe")
        runs.update({name: (flags[at + 1], flags[at + 2], settings) for name, settings in MOE_CONFIGS.items()})
        flags = flags[:at] + flags[at + 3:]
    for layout in flags:
        results, rank = {}, 0
        for name, (t, s, settings) in runs.items():
            logs, grads, rank = one_step(t, s, *LAYOUTS[layout], settings)
            results[name] = {"logs": logs, "grads": grads}
        (Path(out) / layout).mkdir(exist_ok=True)
        torch.save(results, Path(out) / layout / f"rank{rank}.pt")


if __name__ == "__main__":
    common.run(main)
