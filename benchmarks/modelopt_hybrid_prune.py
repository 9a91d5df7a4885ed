"""NVIDIA ModelOpt 0.47 ``mcore_minitron`` pruning of a hybrid (Mamba) model, as a separate
process in the Python 3.12 environment (benchmarks/py312_env.sh: megatron-core 0.19, whose
``models.hybrid`` ModelOpt's hybrid path imports; the project's environment has 0.16.1).

    benchmarks/.cache/py312/bin/python benchmarks/modelopt_hybrid_prune.py MODEL \\
        --tokens calib.pt --target '{"mamba_num_heads": 6, "mamba_head_dim": 4}' --out kept.json

MODEL is anything ``open_model`` opens (a project checkpoint written by either
environment, an HF directory); ``--tokens`` a saved LongTensor [samples, length] of
calibration tokens, run through the model in batches of ``--batch-size`` as ModelOpt's
forward loop; ``--target`` ModelOpt's export_config; ``--scores-path`` ModelOpt's score
cache (shared by the targets of one calibration set). The mixer runs nemo-minitron's CPU
kernels (runtime.cpu_fallback); benchmarks/modelopt_adapter.py adapts ModelOpt to the
local spec. The result, the units ModelOpt keeps in original indices (ascending), is
written to ``--out`` as JSON for the calling benchmark, which rebuilds the pruned model
with nemo-minitron's own pruning code in its own environment:
    {"layers": [kept layer indices], "hidden": [...],
     "mamba_heads": {layer: [...]}, "mamba_head_dim": {layer: [...]},
     "ffn": {layer: [...]}, "heads": {layer: [...]}, "seconds": ModelOpt's time,
     "loss_on_tokens": ModelOpt's pruned model's next-token loss on the calibration tokens}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import modelopt_adapter  # noqa: E402
from nemo_minitron.checkpoint.api import open_model  # noqa: E402
from nemo_minitron.runtime.distributed import init_distributed  # noqa: E402


def kept_units(model, original_index: dict[int, int], desc) -> dict:
    """ModelOpt's choice, read from its hparams before export (original indices, ascending)."""
    ascending = modelopt_adapter._ascending
    out = {"layers": [], "hidden": ascending(model.get_hparam("hidden_size").active_slice, desc.hidden_size),
           "mamba_heads": {}, "mamba_head_dim": {}, "ffn": {}, "heads": {}}
    for layer in model.decoder.layers:
        index = original_index[id(layer)]
        out["layers"].append(index)
        if hasattr(layer, "mixer"):
            out["mamba_heads"][index] = ascending(layer.mixer.get_hparam("mamba_num_heads").active_slice,
                                                  desc.mamba_num_heads)
            out["mamba_head_dim"][index] = ascending(layer.mixer.get_hparam("mamba_head_dim").active_slice,
                                                     desc.mamba_head_dim)
        if hasattr(getattr(layer, "mlp", None), "get_hparam"):
            out["ffn"][index] = ascending(layer.mlp.get_hparam("ffn_hidden_size").active_slice, desc.ffn_hidden_size)
        if hasattr(getattr(layer, "self_attention", None), "get_hparam"):
            out["heads"][index] = ascending(layer.self_attention.get_hparam("num_attention_heads").active_slice,
                                            desc.num_attention_heads)
    return out


def next_token_loss(model, tokens: torch.Tensor, vocab_size: int) -> float:
    """Mean cross-entropy of ``tokens [n, s]``' next tokens (the same in both environments)."""
    from nemo_minitron.model.forward import full_logits

    model.eval()
    with torch.no_grad():
        logits = full_logits(model, tokens[:, :-1], vocab_size, micro_batch=4)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--tokens", required=True, help="a torch.save'd LongTensor [samples, length]")
    p.add_argument("--target", required=True, help="ModelOpt's export_config, JSON")
    p.add_argument("--out", required=True, help="the kept units, JSON")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--scores-path", help="ModelOpt's own cache of activations and layer scores: the targets of "
                                         "one calibration set then share one calibration pass, as ModelOpt intends")
    args = p.parse_args(argv)

    init_distributed(1, 1, seed=1234)  # on a CPU this enables runtime.cpu_fallback, before ModelOpt imports
    opened = open_model(args.model, dtype=torch.float32)
    model, desc = opened.model, opened.description
    model.eval()
    tokens = torch.load(args.tokens, weights_only=True)
    mo = modelopt_adapter.load()
    from modelopt.torch.prune.plugins.mcore_minitron import MCoreMinitronSearcher

    def forward_loop(m):
        with torch.no_grad():
            for batch in tokens.split(args.batch_size):
                m(batch, torch.arange(batch.shape[1]).expand_as(batch), None)

    original_index = {id(layer): layer.layer_number - 1 for layer in model.decoder.layers}
    kept: dict = {}
    original_prune = MCoreMinitronSearcher._prune

    def _prune(searcher, config):
        original_prune(searcher, config)
        kept.update(kept_units(searcher.model, original_index, desc))

    MCoreMinitronSearcher._prune = _prune
    start = time.perf_counter()
    try:
        pruned, _ = mo.mtp.prune(model, mode=[("mcore_minitron", mo.config)], dummy_input=None,
                     constraints={"export_config": json.loads(args.target)},
                     config={"forward_loop": forward_loop, **({"scores_path": args.scores_path} if args.scores_path else {})})
    finally:
        MCoreMinitronSearcher._prune = original_prune
    assert kept, "ModelOpt did not prune"
    kept["seconds"] = round(time.perf_counter() - start, 2)
    # ModelOpt's own pruned model, for the caller's check that our pruning code rebuilds it
    kept["loss_on_tokens"] = next_token_loss(pruned, tokens, desc.vocab_size)
    tmp = f"{args.out}.tmp"
    Path(tmp).write_text(json.dumps(kept, indent=1))
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
