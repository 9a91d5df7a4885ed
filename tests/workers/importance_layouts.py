"""Worker: importance of each model at each layout in turn (one process group, re-laid out),
with test_importance's settings; writes OUT/LAYOUT-KIND.

    importance_layouts.py SPEC.json
    SPEC.json: {"out": DIR, "layouts": {"tp2": [2, 1], ...}, "models": {KIND: CHECKPOINT, ...},
                "options": {compute_importance keywords replacing test_importance's settings} (optional),
                "kill_block_micro_batch": N (optional: every rank stops at its N-th block-scoring
                micro-batch, as a killed run would)}
    Writes OUT/block-micro-batches.json: the block-scoring micro-batches each rank began.
"""

import json
import sys
from pathlib import Path

import common


class Killed(Exception):
    pass


def main() -> None:
    import torch.distributed as dist

    from nemo_minitron.importance import blocks
    from nemo_minitron.importance.api import compute_importance
    from test_importance import LAYER_SAMPLES, SAMPLES, SEED, SEQ

    spec = json.loads(Path(sys.argv[1]).read_text())
    settings = {"samples": SAMPLES, "seq_len": SEQ, "micro_batch": 2, "layer_samples": LAYER_SAMPLES,
                "drop_blocks": [2], "seed": SEED, **spec.get("options", {})}
    parent, began = blocks._Parent, [0]

    def counted(*args):  # one parent per block-scoring micro-batch
        began[0] += 1
        if began[0] == spec.get("kill_block_micro_batch"):
            raise Killed
        return parent(*args)

    blocks._Parent = counted
    for layout, (tp, pp) in spec["layouts"].items():
        for kind, checkpoint in spec["models"].items():
            try:
                compute_importance(checkpoint, ["builtin:calib"], str(Path(spec["out"]) / f"{layout}-{kind}"),
                                   tp=tp, pp=pp, progress=False, **settings)
            except Killed:
                pass
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, began[0])
    if dist.get_rank() == 0:
        (Path(spec["out"]) / "block-micro-batches.json").write_text(json.dumps(counts))


if __name__ == "__main__":
    common.run(main)
