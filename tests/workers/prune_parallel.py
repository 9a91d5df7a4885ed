"""Worker: at each layout in turn (one process group, re-laid out), run the prune jobs in
JOBS.json, then load each pruned checkpoint at that layout and check that the parameters
held across ranks (padding rows excluded) number exactly what the model description counts.

    python -m torch.distributed.run --nproc-per-node 2 prune_parallel.py JOBS.json
    JOBS.json: {"layouts": {"tp2": [2, 1], ...}, "jobs": [{"checkpoint", "importance", "out": "...{layout}...",
                "target": {...}, "order", "layer_metric", "seed"} or {..., "options": {prune's keywords}}, ...]}
"""

import json
import sys

import common


def count_parameters(model, desc) -> int:
    """Parameters of the model spread over this layout's ranks, each counted once."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_minitron.model.params import named_weights, tp_split_dim

    tp_rank = ps.get_tensor_model_parallel_rank()
    local = 0
    for name, param in named_weights(model):
        if not isinstance(param, torch.nn.Parameter):
            continue  # a weight that is a buffer (a router's expert bias): no parameter, as in transformers
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if name == "output_layer.weight" and desc.tie_embeddings:
                continue  # the last stage's copy of the tied embedding
            rows = param.shape[0]
            local += max(0, min(desc.vocab_size, (tp_rank + 1) * rows) - tp_rank * rows) * param.shape[1]
        elif tp_split_dim(name) is None:
            local += param.numel() if tp_rank == 0 else 0  # replicated over TP ranks
        else:
            local += param.numel()
    total = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(total)  # data parallel size is 1 here: every rank holds a distinct part
    return int(total.item())


def main() -> None:
    from nemo_minitron.checkpoint.store import load_checkpoint
    from nemo_minitron.prune.api import prune

    spec = json.loads(open(sys.argv[1]).read())
    for layout, (tp, pp) in spec["layouts"].items():
        for job in spec["jobs"]:
            options = job.get("options") or dict(target=job["target"], order=job["order"],
                                                 layer_metric=job["layer_metric"], seed=job["seed"])
            out = prune(job["checkpoint"], job["importance"], job["out"].format(layout=layout), tp=tp, pp=pp,
                        **options)
            model, info = load_checkpoint(out)
            counted, described = count_parameters(model, info.description), info.description.num_parameters()
            assert counted == described, f"{out}: {counted} parameters held, description counts {described}"


if __name__ == "__main__":
    common.run(main)
