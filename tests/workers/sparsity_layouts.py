"""Worker: sparsify the tiny Llama and distil a sparse student at TP=2, PP=2 and DP=2 (the
settings of test_sparsity); writes each rank's distillation results.

    sparsity_layouts.py CKPT TEACHER SPARSE_STUDENT OUT_DIR
"""

import sys
from pathlib import Path

import common


def main() -> None:
    ckpt, teacher, student, out = sys.argv[1:]
    import torch
    import torch.distributed as dist

    from nemo_minitron.sparsity.api import sparsify
    from test_sparsity import CALIB, LAYOUTS, RUNS, SEED, distill_results

    results = {}
    for layout, (tp, pp, runs) in LAYOUTS.items():
        for name in runs:
            sparsify(ckpt, str(Path(out) / f"{layout}-{name}"), ["builtin:calib"], tp=tp, pp=pp, seed=SEED,
                     progress=False, **CALIB, **RUNS[name])
        results[layout] = distill_results(teacher, student, tp, pp)
    torch.save(results, Path(out) / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    common.run(main)
