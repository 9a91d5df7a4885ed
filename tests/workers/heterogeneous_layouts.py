"""Worker: a heterogeneous (nemotron-nas) model converted at a TP/PP layout, exported to
Hugging Face and Megatron from there, the Megatron export read back in place; full logits
of each model written.

    python -m torch.distributed.run --nproc-per-node 2 heterogeneous_layouts.py SPEC.json
    SPEC.json: {"tokens": PATH, "source": HF_DIR, "out": DIR, "layouts": [[tp, pp], ...],
                "load_at": [tp, pp]}   (load_at: the first layout's checkpoint loaded again there)
Writes DIR/{tag}-{converted,megatron,reloaded}.pt and DIR/{tag}-hf/ (tag: tp{T}pp{P}).
"""

import json
import sys
from pathlib import Path

import common


def main() -> None:
    import torch

    from nemo_minitron.checkpoint.api import convert, export, open_model
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.runtime.distributed import init_distributed, is_rank0

    spec = json.loads(open(sys.argv[1]).read())
    tokens, out = torch.load(spec["tokens"]), Path(spec["out"])

    def logits_of(path: Path, tp: int, pp: int, name: str) -> None:
        init_distributed(tp, pp)
        opened = open_model(str(path))
        logits = full_logits(opened.model, tokens, opened.description.vocab_size)
        if is_rank0():
            torch.save(logits, out / name)

    for tp, pp in spec["layouts"]:
        tag = f"tp{tp}pp{pp}"
        checkpoint = convert(spec["source"], str(out / f"{tag}-ckpt"), tp=tp, pp=pp)
        logits_of(checkpoint, tp, pp, f"{tag}-converted.pt")
        export(str(checkpoint), str(out / f"{tag}-hf"), megatron_out=str(out / f"{tag}-megatron"), tp=tp, pp=pp,
               verify=False)
        logits_of(out / f"{tag}-megatron", tp, pp, f"{tag}-megatron.pt")
    tp, pp = spec["load_at"]
    first = spec["layouts"][0]
    logits_of(out / f"tp{first[0]}pp{first[1]}-ckpt", tp, pp, "reloaded.pt")


if __name__ == "__main__":
    common.run(main)
