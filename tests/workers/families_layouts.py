"""Worker: at each TP/PP layout in turn (one process group, re-laid out), for each family
load a tiny HF model into megatron-core (every rank reads its own shard), write the full
logits, and export the model back to Hugging Face from that layout (every stage writes
its layers, TP slices gathered).

    python -m torch.distributed.run --nproc-per-node 2 families_layouts.py JOBS.json
    JOBS.json: {"tokens": PATH, "layouts": {"tp2": [2, 1], ...},
                "jobs": [{"src", "logits": "...{layout}...", "hf_out": "...{layout}..."}, ...]}
"""

import json
import sys

import common


def main() -> None:
    import torch

    from nemo_minitron.checkpoint.hf_export import export_hf
    from nemo_minitron.checkpoint.hf_import import build_from_source, resolve_source
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.runtime.distributed import init_distributed, is_rank0

    spec = json.loads(open(sys.argv[1]).read())
    tokens = torch.load(spec["tokens"])
    for name, (tp, pp) in spec["layouts"].items():
        init_distributed(tp, pp)
        for job in spec["jobs"]:
            source = resolve_source(job["src"])
            model = build_from_source(source, dtype=torch.float32)
            logits = full_logits(model, tokens, source.description.vocab_size)
            if is_rank0():
                torch.save(logits, job["logits"].format(layout=name))
            export_hf(model, source.description, job["hf_out"].format(layout=name), tokenizer_dir=None,
                      dtype=torch.float32)


if __name__ == "__main__":
    common.run(main)
