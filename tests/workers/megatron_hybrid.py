"""Worker (2 ranks): Megatron-LM / Megatron-Bridge checkpoints of a hybrid (Nemotron-H)
model in and out at TP=2 and PP=2; writes what tests/test_megatron_hybrid.py compares.

    megatron_hybrid.py SPEC.json   (SPEC: hf, tokenizer, tokens, out)

1. TP=2: the HF model as megatron-core's MambaModel, saved as Megatron-LM saves it
   (common.pt args, TE-spec keys; tests/megatron_layouts.py).
2. PP=2: the same as Megatron-Bridge saves it (run_config.yaml HybridModelProvider); the
   Megatron-LM checkpoint read here (logits) and exported with --megatron-out at PP=2.
3. TP=2: the Bridge checkpoint read here (logits) and exported at TP=2.
"""

import json
import sys
from pathlib import Path

import common


def main() -> None:
    import torch
    import torch.distributed as dist
    from megatron_layouts import (
        hybrid_bridge_model_section,
        hybrid_megatron_lm_args,
        save_bridge,
        save_megatron_lm,
        te_keyed,
    )

    from nemo_minitron.checkpoint.api import export, open_model
    from nemo_minitron.checkpoint.hf_import import build_from_source, resolve_source
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.model.params import unwrap
    from nemo_minitron.runtime.distributed import init_distributed

    spec = json.loads(Path(sys.argv[1]).read_text())
    out, hf, tok = Path(spec["out"]), Path(spec["hf"]), Path(spec["tokenizer"])
    tokens = torch.load(spec["tokens"])
    results = {}

    def logits(path: Path):
        opened = open_model(str(path))
        return full_logits(opened.model, tokens, opened.description.vocab_size)

    init_distributed(2, 1, seed=1)
    model = unwrap(build_from_source(resolve_source(str(hf)), dtype=torch.float32))
    args = hybrid_megatron_lm_args(hf, tp=2, pp=1, tokenizer_model=str(tok))
    save_megatron_lm(model, args, out / "megatron_lm", 3, latest=True, keys=te_keyed)

    init_distributed(1, 2, seed=1)
    model = unwrap(build_from_source(resolve_source(str(hf)), dtype=torch.float32))
    save_bridge(model, hybrid_bridge_model_section(hf, tp=1, pp=2), out / "bridge", 4, tok, keys=te_keyed)
    results["megatron_lm@pp2"] = logits(out / "megatron_lm")
    export(str(out / "megatron_lm"), megatron_out=str(out / "export_pp2"), tp=1, pp=2)

    init_distributed(2, 1, seed=1)
    results["bridge@tp2"] = logits(out / "bridge")
    export(str(out / "bridge"), megatron_out=str(out / "export_tp2"), tp=2, pp=1)
    torch.save(results, out / f"results-rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    common.run(main)
