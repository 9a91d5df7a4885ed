#!/usr/bin/env python3
"""Pruning quality right after pruning on a small trained hybrid (Nemotron-H-like).

The model is benchmarks/hybrid_model.py's (trained from scratch on ``builtin:train``).
Rows cut Mamba heads, Mamba head dim, hidden, depth, and all together; each is pruned
from importance computed on ``--samples`` calibration sequences of ``builtin:calib`` per
seed (``--seeds``), and scored by held-out loss on ``builtin:heldout`` and
``builtin:docs`` (``--eval`` sequences of 256 tokens each, the trained model's tokenizer),
mean over seeds; the magnitude order (no calibration) is the floor. Layers are chosen by
the loss drop of each (``--layer-metric loss``, one calibration sequence): greedy
elimination costs 69 passes here, more than this shared CPU allowed.

ModelOpt 0.47 is not run here yet: its hybrid path imports ``megatron.core.models.hybrid``,
which megatron-core 0.16.1 lacks, and megatron-core 0.17-0.19 need Python >= 3.12. It runs
in the separate Python 3.12 environment (benchmarks/py312_env.sh, megatron-core 0.19):
benchmarks/modelopt_hybrid_prune.py prunes a checkpoint there and writes the units it
keeps, for this benchmark to rebuild with our pruning code and score (docs/hybrid.md).
``print_modelopt_check`` repeats the pip check of the project's environment.

    python benchmarks/hybrid_pruning_quality.py [--seeds 1 2] [--samples 16] [--eval 16] [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import CACHE, parser, write_results
from hybrid_model import SEQ, sequences, trained_hybrid_checkpoint

OUT = CACHE / "hybrid_pruning_quality"
# the trained model: hidden 384, ffn 1536, 24 Mamba heads x 32 in 4 groups, 14 layers (6 M, 2 *, 6 -)
ROWS = {
    "Mamba heads 16 (of 24)": {"mamba_heads": 16},
    "Mamba head dim 24 (of 32)": {"mamba_head_dim": 24},
    "hidden 320 (of 384)": {"hidden": 320},
    "depth 11 layers (of 14)": {"layers": 11},
    "combined: Mamba heads 16, head dim 24, hidden 320, ffn 1024, 12 layers": {
        "mamba_heads": 16, "mamba_head_dim": 24, "hidden": 320, "ffn": 1024, "layers": 12},
}


def modelopt_check() -> str:
    """Whether pip finds a megatron-core newer than 0.16.1 for this Python (one line)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(OUT / "pip-check"),
                           "megatron-core>0.16.1"], capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return "pip found a megatron-core newer than 0.16.1 for this Python"
    lines = [line for line in proc.stderr.splitlines() if "Requires-Python" in line]
    return lines[0][:300] if lines else proc.stderr.strip().splitlines()[-1][:300]


def heldout_loss(path: Path, data) -> float:
    from nemo_minitron.checkpoint.store import load_checkpoint
    from nemo_minitron.model.forward import full_logits

    model, info = load_checkpoint(str(path))
    model.eval()
    x, y = data
    with torch.no_grad():
        logits = full_logits(model, x, info.description.vocab_size).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--samples", type=int, default=16, help="calibration sequences per seed")
    p.add_argument("--eval", type=int, default=16, help="held-out sequences per split")
    p.add_argument("--quick", action="store_true", help="the 3-step model, one seed, 2 + 2 sequences, two rows")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.samples, args.eval = [1], 2, 2

    from nemo_minitron.checkpoint.store import load_tokenizer, read_info
    from nemo_minitron.importance.api import compute_importance
    from nemo_minitron.prune.api import prune
    from nemo_minitron.runtime.distributed import init_distributed

    ckpt = trained_hybrid_checkpoint(quick=args.quick)
    out = OUT / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(ckpt))
    data = {split: tuple(t[: args.eval] for t in sequences(tokenizer, split)) for split in ("heldout", "docs")}
    init_distributed(1, 1)
    rows = dict(list(ROWS.items())[:2]) if args.quick else ROWS
    results = {"model": str(ckpt), "description": read_info(ckpt).description.summary(), "seeds": args.seeds,
               "calibration": f"{args.samples} x {SEQ} tokens of builtin:calib per seed",
               "eval": f"{args.eval} x {SEQ} tokens each of builtin:heldout / builtin:docs",
               "teacher": {s: heldout_loss(ckpt, d) for s, d in data.items()},
               "modelopt": modelopt_check(), "rows": {}}
    start = time.time()
    for name, target in rows.items():
        row = {"target": target, "importance": {}, "magnitude": {}}
        for seed in args.seeds:
            imp = out / f"importance-seed{seed}"
            if not (imp / "importance.pt").exists() and not imp.exists():
                compute_importance(str(ckpt), ["builtin:calib"], str(imp), samples=args.samples, seq_len=SEQ,
                                   micro_batch=2, layer_samples=1, greedy_layers=False, seed=seed,
                                   progress=False)
            tag = "-".join(f"{k}{v}" for k, v in target.items())
            pruned = out / f"pruned-{tag}-seed{seed}"
            if not pruned.exists():
                prune(str(ckpt), str(imp), str(pruned), target=target, layer_metric="loss")
            row["importance"][seed] = {s: heldout_loss(pruned, d) for s, d in data.items()}
            row["parameters"] = read_info(pruned).description.num_parameters()
        mag = out / f"magnitude-{'-'.join(f'{k}{v}' for k, v in target.items())}"
        if not mag.exists():
            prune(str(ckpt), str(out / f"importance-seed{args.seeds[0]}"), str(mag), target=target, order="magnitude",
                  layer_metric="loss")
        row["magnitude"] = {s: heldout_loss(mag, d) for s, d in data.items()}
        results["rows"][name] = row
        print(name, json.dumps(row), flush=True)
    results["seconds"] = time.time() - start
    lines = ["| row | parameters | ours (importance), mean over seeds | magnitude order | ModelOpt 0.47 |",
             "|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        mean = {s: sum(r[s] for r in row["importance"].values()) / len(row["importance"]) for s in data}
        lines.append(f"| {name} | {row['parameters'] / 1e6:.2f}M | {mean['heldout']:.3f} / {mean['docs']:.3f} | "
                     f"{row['magnitude']['heldout']:.3f} / {row['magnitude']['docs']:.3f} | not run (see below) |")
    results["table"] = lines
    print("\n".join(lines))
    write_results(args, results)


if __name__ == "__main__":
    main()
