"""Worker: one distillation forward-backward of each hybrid run at each layout in turn;
writes losses and gradients to OUT/LAYOUT/rank{r}.pt.

    hybrid_distill_layouts.py JOB.json
    JOB.json: {"runs": {name: [teacher, student, settings]}, "layouts": {"tp2": [2, 1], ...}, "out"}
"""

import json
import sys
from pathlib import Path

import torch

import common


def main() -> None:
    from test_distill import one_step

    job = json.loads(Path(sys.argv[1]).read_text())
    for layout, (tp, pp) in job["layouts"].items():
        results, rank = {}, 0
        for name, (teacher, student, settings) in job["runs"].items():
            logs, grads, rank = one_step(teacher, student, tp, pp, settings)
            results[name] = {"logs": logs, "grads": grads}
        (Path(job["out"]) / layout).mkdir(exist_ok=True)
        torch.save(results, Path(job["out"]) / layout / f"rank{rank}.pt")


if __name__ == "__main__":
    common.run(main)
