#!/usr/bin/env python3
"""The Llama-3.1 8B -> 4B width recipe, scaled down to run end to end on a CPU.

`recipes/llama3.1-8b-4b-width.yaml` as published, with only sizes overridden: the model
is a tiny random Llama-3-style model (8 layers, hidden 64, ffn 224, 4 heads in 2 groups,
vocabulary 32,000) pruned in the recipe's proportions (hidden x 0.75, ffn x 0.643); the
data is a synthetic blend of two Megatron data sets (``--tokens``, default 2B tokens:
0.7 x 1.4B + 0.3 x 0.6B) split 99,1,0 into training and held-out documents; teacher
correction, importance, pruning, distillation, export and report run a few steps each.
Reports the wall time of each stage, peak RSS and whether the run completed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, parser, write_results

ROOT = HERE.parent
VOCAB = 32000


def _tiny_llama(path: Path) -> Path:
    import torch
    import transformers

    if (path / "config.json").is_file():
        return path
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=224, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256}, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(path), safe_serialization=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import byte_tokenizer

    byte_tokenizer().save_pretrained(str(path))
    return path


def _synthetic(prefix: Path, tokens: int, seed: int) -> None:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    pool = rng.integers(3, VOCAB, 1 << 24, dtype=np.uint16)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    written = 0
    while written < tokens:
        for length, offset in zip(rng.integers(200, 3800, 4096).tolist(), rng.integers(0, len(pool) - 4000, 4096).tolist()):
            length = min(length, tokens - written)
            doc = pool[offset:offset + length].copy()
            doc[-1] = 2
            builder.add_document(doc, [length])
            written += length
            if written >= tokens:
                break
    builder.finalize(str(prefix) + ".idx")


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=float, default=2.0, help="billions of tokens in the blend")
    p.add_argument("--scratch", default=str(HERE / ".cache" / "scaled-recipe"))
    args = p.parse_args()

    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        model = _tiny_llama(scratch / "hf")
        total = int(args.tokens * 1e9)
        start = time.time()
        _synthetic(scratch / "web_text_document", int(0.7 * total), 1)
        _synthetic(scratch / "code_text_document", total - int(0.7 * total), 2)
        write_seconds = time.time() - start
        blend = f"0.7 {scratch / 'web_text_document'} 0.3 {scratch / 'code_text_document'}"
        training = ("steps={s} global_batch=4 micro_batch=2 seq_len=256 warmup_steps=1 eval_every={e} "
                    "eval_samples=4 save_every={e}")
        overrides = [
            f"model.source={model}", f"output_dir={scratch / 'run'}", "parallel.tp=1", "dtype=float32",
            f"data.calib={blend}", f"data.train={blend}", "data.heldout=null", "data.split=99,1,0",
            f"data.cache_dir={scratch / 'cache'}",
            *[f"teacher_correction.{kv}" for kv in training.format(s=2, e=1).split()],
            "rounds.0.importance.samples=8", "rounds.0.importance.seq_len=256", "rounds.0.importance.micro_batch=4",
            "rounds.0.prune.target={hidden: 48, ffn: 144}",
            *[f"rounds.0.distill.{kv}" for kv in training.format(s=4, e=2).split()],
            "report.eval_samples=8", "report.seq_len=256", "report.micro_batch=4",
            # the recipe's hub tasks (hellaswag, ...) need a download: only the built-in ones here
            "report.tasks=[minitron_lastword,minitron_nextsentence]", "report.task_limit=8",
        ]
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, "-m", "nemo_minitron", "run", str(ROOT / "recipes" / "llama3.1-8b-4b-width.yaml"),
               *overrides]
        start = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        stages = json.loads((scratch / "run" / "stages.json").read_text()) if (scratch / "run" / "stages.json").is_file() else {}
        results = {
            "blend_tokens": total, "write_seconds": round(write_seconds, 1), "exit_status": code,
            "completed": code == 0 and (scratch / "run" / "report" / "report.md").is_file(),
            "wall_seconds": round(time.time() - start, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3),
            "stages": {k: v["wall_seconds"] for k, v in stages.items()},
        }
        if code:
            results["log_tail"] = out[-3000:]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_results(args, results)
    return 0 if results["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
