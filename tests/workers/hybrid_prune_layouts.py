"""Worker: a hybrid (Nemotron-H) checkpoint's importance at each layout in turn, then (except
at DP=2) each prune job at that layout from the TP=1 scores; each pruned checkpoint is
loaded back at the layout and must hold as many parameters as its description counts.

    python -m torch.distributed.run --nproc-per-node 2 hybrid_prune_layouts.py JOB.json
    JOB.json: {"checkpoint", "scores", "layouts": {"tp2": [2, 1], "dp2": [1, 1], ...}, "importance": {...},
               "variants": {layout: {directory: {importance options}}},
               "prune": [{"name", "target", "order", "layer_metric"}, ...], "out": ".../{layout}"}
    writes OUT/<directory>/ (importance) and OUT/<name>/ (pruned)
"""

import json
import sys
from pathlib import Path

import common
from prune_parallel import count_parameters


def main() -> None:
    from nemo_minitron.checkpoint.store import load_checkpoint
    from nemo_minitron.importance.api import compute_importance
    from nemo_minitron.prune.api import prune

    job = json.loads(open(sys.argv[1]).read())
    for name, (tp, pp) in job["layouts"].items():
        out = Path(job["out"].format(layout=name))
        out.mkdir(parents=True, exist_ok=True)
        for variant, options in job["variants"][name].items():
            compute_importance(job["checkpoint"], ["builtin:calib"], str(out / variant), tp=tp, pp=pp, progress=False,
                               **job["importance"], **options)
        if tp * pp == 1:
            continue  # data parallel: pruning has nothing to split
        for p in job["prune"]:
            pruned = prune(job["checkpoint"], job["scores"], str(out / p["name"]), target=p["target"],
                           order=p["order"], layer_metric=p["layer_metric"], tp=tp, pp=pp)
            model, info = load_checkpoint(pruned)
            counted, described = count_parameters(model, info.description), info.description.num_parameters()
            assert counted == described, f"{pruned}: {counted} parameters held, description counts {described}"


if __name__ == "__main__":
    common.run(main)
