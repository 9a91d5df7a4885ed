"""Worker (2 ranks): Megatron-LM / Megatron-Bridge checkpoints of mixtures of experts in and
out at TP=2 and PP=2; writes what tests/test_megatron_moe.py compares.

    megatron_moe.py SPEC.json   (SPEC: gpt_hf, hybrid_hf, tokenizer, tokens, out)

1. TP=2: the GPT mixture of experts (Qwen2-MoE) as Megatron-LM builds and saves it from its
   args (megatron-core's GPTModel with SequentialMLP experts, stacked keys, TE-spec norm
   names; tests/megatron_layouts.py), and the same saved with singleton_local_shards.
2. PP=2: the hybrid MoE (Nemotron 3) as Megatron-Bridge saves it (Nemotron3NanoProvider,
   per-layer keys); the Megatron-LM checkpoint read here (logits) and exported with
   --megatron-out at PP=2.
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
        fill_from_hf,
        gpt_from_args,
        hybrid_moe_bridge_model_section,
        moe_megatron_lm_args,
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
    out, tok = Path(spec["out"]), Path(spec["tokenizer"])
    gpt_hf, hybrid_hf = Path(spec["gpt_hf"]), Path(spec["hybrid_hf"])
    tokens = torch.load(spec["tokens"])
    results = {}

    def logits(path: Path):
        opened = open_model(str(path))
        return full_logits(opened.model, tokens, opened.description.vocab_size)

    init_distributed(2, 1, seed=1)
    args = moe_megatron_lm_args(gpt_hf, tp=2, pp=1, tokenizer_model=str(tok))
    model = gpt_from_args(args)
    fill_from_hf(model, gpt_hf, seed=7)
    save_megatron_lm(model, args, out / "megatron_lm", 3, latest=True, keys=te_keyed)
    save_megatron_lm(model, args, out / "singleton", 3, latest=True, keys=te_keyed,
                     content={"singleton_local_shards": True})

    init_distributed(1, 2, seed=1)
    model = unwrap(build_from_source(resolve_source(str(hybrid_hf)), dtype=torch.float32))
    save_bridge(model, hybrid_moe_bridge_model_section(hybrid_hf, tp=1, pp=2), out / "bridge", 4, tok, keys=te_keyed)
    results["megatron_lm@pp2"] = logits(out / "megatron_lm")
    export(str(out / "megatron_lm"), megatron_out=str(out / "export_pp2"), tp=1, pp=2)

    init_distributed(2, 1, seed=1)
    results["bridge@tp2"] = logits(out / "bridge")
    export(str(out / "bridge"), megatron_out=str(out / "export_tp2"), tp=2, pp=1)
    torch.save(results, out / f"results-rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    common.run(main)
