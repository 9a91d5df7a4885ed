"""Worker: prune CHECKPOINT with IMPORTANCE to OUT at a parallel layout."""

import sys

from nemo_minitron.prune.api import prune

if __name__ == "__main__":
    checkpoint, importance, out, target, *flags = sys.argv[1:]
    tp = int(flags[flags.index("--tp") + 1]) if "--tp" in flags else 1
    pp = int(flags[flags.index("--pp") + 1]) if "--pp" in flags else 1
    prune(checkpoint, importance, out, target={k: int(v) for k, v in (kv.split("=") for kv in target.split(","))},
          tp=tp, pp=pp, progress=False)
