"""Worker (2 ranks): Megatron-LM / Megatron-Bridge checkpoints of a hybrid (Nemotron-H) model
and of mixtures of experts in and out at TP=2 and PP=2; writes what
tests/test_megatron_hybrid.py and tests/test_megatron_moe.py compare.

    megatron_hybrid.py SPEC.json   (SPEC: hf, moe_hf, gpt_moe_hf, tokenizer, tokens, out)

1. TP=2: the hybrid HF model as megatron-core's MambaModel, saved as Megatron-LM saves it
   (common.pt args, TE-spec keys; tests/megatron_layouts.py); the GPT mixture of experts
   (Qwen2-MoE) as Megatron-LM builds and saves it from its args (megatron-core's GPTModel
   with SequentialMLP experts, stacked keys) into moe/, and the same saved with
   singleton_local_shards.
2. PP=2: the hybrid as Megatron-Bridge saves it (run_config.yaml HybridModelProvider), the
   hybrid MoE (Nemotron 3) likewise (Nemotron3NanoProvider) into moe/; the Megatron-LM
   checkpoints read here (logits) and exported with --megatron-out at PP=2.
3. TP=2: the Bridge checkpoints read here (logits) and exported at TP=2.
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
        hybrid_bridge_model_section,
        hybrid_megatron_lm_args,
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
    hf, moe_hf, gpt_moe_hf = Path(spec["hf"]), Path(spec["moe_hf"]), Path(spec["gpt_moe_hf"])
    tokens = torch.load(spec["tokens"])
    results = {}

    def logits(path: Path):
        opened = open_model(str(path))
        return full_logits(opened.model, tokens, opened.description.vocab_size)

    def ours(hf_dir: Path):
        return unwrap(build_from_source(resolve_source(str(hf_dir)), dtype=torch.float32))

    init_distributed(2, 1, seed=1)
    args = hybrid_megatron_lm_args(hf, tp=2, pp=1, tokenizer_model=str(tok))
    save_megatron_lm(ours(hf), args, out / "megatron_lm", 3, latest=True, keys=te_keyed)
    args = moe_megatron_lm_args(gpt_moe_hf, tp=2, pp=1, tokenizer_model=str(tok))
    model = gpt_from_args(args)
    fill_from_hf(model, gpt_moe_hf, seed=7)
    save_megatron_lm(model, args, out / "moe" / "megatron_lm", 3, latest=True, keys=te_keyed)
    save_megatron_lm(model, args, out / "moe" / "singleton", 3, latest=True, keys=te_keyed,
                     content={"singleton_local_shards": True})

    init_distributed(1, 2, seed=1)
    save_bridge(ours(hf), hybrid_bridge_model_section(hf, tp=1, pp=2), out / "bridge", 4, tok, keys=te_keyed)
    save_bridge(ours(moe_hf), hybrid_moe_bridge_model_section(moe_hf, tp=1, pp=2), out / "moe" / "bridge", 4, tok,
                keys=te_keyed)
    for ckpt in ("megatron_lm", "moe/megatron_lm"):
        results[f"{ckpt}@pp2"] = logits(out / ckpt)
        export(str(out / ckpt), megatron_out=str(out / ckpt.replace("megatron_lm", "export_pp2")), tp=1, pp=2)

    init_distributed(2, 1, seed=1)
    for ckpt in ("bridge", "moe/bridge"):
        results[f"{ckpt}@tp2"] = logits(out / ckpt)
        export(str(out / ckpt), megatron_out=str(out / ckpt.replace("bridge", "export_tp2")), tp=2, pp=1)
    torch.save(results, out / f"results-rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    common.run(main)
