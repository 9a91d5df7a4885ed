"""Worker: importance of CHECKPOINT (and of each ``--also CHECKPOINT OUT`` pair) at a parallel
layout (same settings as test_importance)."""

import sys

from nemo_minitron.importance.api import compute_importance
from test_importance import LAYER_SAMPLES, SAMPLES, SEED, SEQ

if __name__ == "__main__":
    checkpoint, out, *flags = sys.argv[1:]
    tp = int(flags[flags.index("--tp") + 1]) if "--tp" in flags else 1
    pp = int(flags[flags.index("--pp") + 1]) if "--pp" in flags else 1
    jobs = [(checkpoint, out)] + [(flags[i + 1], flags[i + 2]) for i, f in enumerate(flags) if f == "--also"]
    for ckpt, directory in jobs:
        compute_importance(ckpt, ["builtin:calib"], directory, samples=SAMPLES, seq_len=SEQ, micro_batch=2,
                           layer_samples=LAYER_SAMPLES, drop_blocks=[2], seed=SEED, tp=tp, pp=pp, progress=False)
