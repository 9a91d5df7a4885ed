"""Worker: a hybrid (Nemotron-H) model at each TP/PP layout in turn: built from the HF
source (logits, then exported back to HF from the layout), the TP=1 checkpoint loaded at
the layout (logits), and the HF source converted to a checkpoint at the layout.

    python -m torch.distributed.run --nproc-per-node 2 hybrid_layouts.py JOB.json
    JOB.json: {"models": [{"src", "checkpoint", "out": ".../{layout}"}, ...], "tokens",
               "layouts": {"tp2": [2, 1], ...}}
    writes OUT/from_hf.pt, OUT/hf/, OUT/from_checkpoint.pt, OUT/converted/ for each model
"""

import json
import sys
from pathlib import Path

import common


def main() -> None:
    import torch

    from nemo_minitron.checkpoint.api import convert, open_model
    from nemo_minitron.checkpoint.hf_export import export_hf
    from nemo_minitron.checkpoint.hf_import import build_from_source, resolve_source
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.runtime.distributed import init_distributed, is_rank0

    job = json.loads(open(sys.argv[1]).read())
    tokens = torch.load(job["tokens"])
    for (name, (tp, pp)), model_job in ((layout, m) for layout in job["layouts"].items() for m in job["models"]):
        out = Path(model_job["out"].format(layout=name))
        init_distributed(tp, pp)
        source = resolve_source(model_job["src"])
        model = build_from_source(source, dtype=torch.float32)
        logits = full_logits(model, tokens, source.description.vocab_size)
        if is_rank0():
            out.mkdir(parents=True, exist_ok=True)
            torch.save(logits, out / "from_hf.pt")
        export_hf(model, source.description, out / "hf", tokenizer_dir=None, dtype=torch.float32)

        opened = open_model(model_job["checkpoint"])
        logits = full_logits(opened.model, tokens, opened.description.vocab_size)
        if is_rank0():
            torch.save(logits, out / "from_checkpoint.pt")
        convert(model_job["src"], str(out / "converted"), tp=tp, pp=pp)


if __name__ == "__main__":
    common.run(main)
