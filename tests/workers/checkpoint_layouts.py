"""Worker: checkpoints converted and/or loaded at TP/PP layouts in turn (one process group,
re-laid out), writing full logits.

    python -m torch.distributed.run --nproc-per-node N checkpoint_layouts.py SPEC.json
    SPEC.json: {"tokens": PATH, "steps": [{"tp", "pp", "logits": PATH,
                "checkpoint": CKPT | "convert_from": SRC, "save": CKPT}, ...]}
"""

import json
import sys

import common


def main() -> None:
    import torch

    from nemo_minitron.checkpoint.api import convert, open_model
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.runtime.distributed import init_distributed, is_rank0

    spec = json.loads(open(sys.argv[1]).read())
    tokens = torch.load(spec["tokens"])
    for step in spec["steps"]:
        checkpoint = step.get("checkpoint")
        if "convert_from" in step:
            checkpoint = convert(step["convert_from"], step["save"], tp=step["tp"], pp=step["pp"])
        init_distributed(step["tp"], step["pp"])
        opened = open_model(str(checkpoint))
        logits = full_logits(opened.model, tokens, opened.description.vocab_size)
        if is_rank0():
            torch.save(logits, step["logits"])


if __name__ == "__main__":
    common.run(main)
