"""Worker: importance of each model at each layout in turn (one process group, re-laid out),
with test_importance's settings; writes OUT/LAYOUT-KIND.

    importance_layouts.py SPEC.json
    SPEC.json: {"out": DIR, "layouts": {"tp2": [2, 1], ...}, "models": {KIND: CHECKPOINT, ...},
                "options": {compute_importance keywords replacing test_importance's settings} (optional)}
"""

import json
import sys
from pathlib import Path

import common


def main() -> None:
    from nemo_minitron.importance.api import compute_importance
    from test_importance import LAYER_SAMPLES, SAMPLES, SEED, SEQ

    spec = json.loads(Path(sys.argv[1]).read_text())
    settings = {"samples": SAMPLES, "seq_len": SEQ, "micro_batch": 2, "layer_samples": LAYER_SAMPLES,
                "drop_blocks": [2], "seed": SEED, **spec.get("options", {})}
    for layout, (tp, pp) in spec["layouts"].items():
        for kind, checkpoint in spec["models"].items():
            compute_importance(checkpoint, ["builtin:calib"], str(Path(spec["out"]) / f"{layout}-{kind}"),
                               tp=tp, pp=pp, progress=False, **settings)


if __name__ == "__main__":
    common.run(main)
