#!/usr/bin/env python3
"""Memory and start-up time of `importance` and `distill` on Megatron data sets of growing size.

For each size (default 0.5B, 2B and 8B tokens) a synthetic indexed data set is written
with megatron-core's IndexedDatasetBuilder (uint16 tokens, documents of 200 to 3,800
tokens), then, as separate processes like a user would run them:
- `importance --samples 16` and a 2-step `distill` (``--split 99,1,0``: train on the
  first part, evaluate on the second), first with an empty data cache (cold: the
  sample index is built) and then again (warm: the cached index is memory-mapped);
- the time to build the sample index alone (a fresh cache).
Reported per run: wall and CPU seconds, the seconds spent opening the data sets (from the
data layer's log) and peak RSS (the process's ru_maxrss). Start-up and memory must not
grow with the corpus (warm runs), each under 4 GB. The model is a tiny
random Llama (vocabulary 32,000), so the wall time is start-up and data, not compute.
Each data set is deleted after its runs (8B tokens take 16 GB of disk).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, parser, write_results

VOCAB = 32000
ROOT = HERE.parent


def _run(cmd: list[str], env: dict) -> dict:
    """Run a command; wall seconds and the peak resident memory of that process."""
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{out[-3000:]}")
    # the data layer logs how long each data set took to open ("... sample index built in 1.23 s)")
    data = [float(m) for m in re.findall(r"sample index (?:built|loaded) in ([0-9.]+) s", out)]
    return {"seconds": round(wall, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "data_seconds": round(sum(data), 2), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3), "output": out}


def _tiny_model(scratch: Path, env: dict) -> Path:
    import torch
    import transformers

    ckpt = scratch / "model"
    if (ckpt / "nemo_minitron.json").is_file():
        return ckpt
    hf = scratch / "hf"
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(hf), safe_serialization=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import byte_tokenizer

    byte_tokenizer().save_pretrained(str(hf))
    subprocess.run([sys.executable, "-m", "nemo_minitron", "convert", "--hf", str(hf), "--out", str(ckpt)],
                   env=env, check=True, capture_output=True)
    return ckpt


def _write_dataset(prefix: Path, tokens: int) -> dict:
    """Synthetic documents (random ids from a fixed pool, random lengths) via megatron-core's builder."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    start = time.time()
    rng = np.random.default_rng(0)
    pool = rng.integers(3, VOCAB, 1 << 24, dtype=np.uint16)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    written = docs = 0
    while written < tokens:
        lengths = rng.integers(200, 3800, 4096)
        offsets = rng.integers(0, len(pool) - 4000, 4096)
        for length, offset in zip(lengths.tolist(), offsets.tolist()):
            length = min(length, tokens - written)
            doc = pool[offset:offset + length].copy()
            doc[-1] = 2  # end of document
            builder.add_document(doc, [length])
            written += length
            docs += 1
            if written >= tokens:
                break
    builder.finalize(str(prefix) + ".idx")
    return {"tokens": written, "documents": docs, "write_seconds": round(time.time() - start, 1),
            "bin_gb": round(Path(str(prefix) + ".bin").stat().st_size / 1e9, 2)}


INDEX_ONLY = """
import sys, time
from nemo_minitron.runtime.distributed import init_distributed
from nemo_minitron.data.dataset import check_corpus
init_distributed(1, 1, 1234)
corpus = check_corpus([sys.argv[1]], vocab_size={vocab}, split="99,1,0")
start = time.time()
ds = corpus.dataset(None, seq_len=int(sys.argv[2]), seed=1234, part="train", num_samples=8)
print("INDEX_SECONDS", time.time() - start, len(ds))
"""


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="0.5,2,8", help="data set sizes in billions of tokens")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--scratch", default=str(HERE / ".cache" / "data-scale"))
    args = p.parse_args()

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    model = _tiny_model(scratch, env)
    cli = [sys.executable, "-m", "nemo_minitron"]
    results: dict = {"seq_len": args.seq_len, "model": "tiny random Llama, vocabulary 32,000", "sizes": {}}
    for size in (float(s) for s in args.sizes.split(",")):
        tokens = int(size * 1e9)
        need = 2 * tokens * 1.05
        free = shutil.disk_usage(scratch).free
        label = f"{size:g}B"
        if free < need + 4e9:
            results["sizes"][label] = {"skipped": f"{free / 1e9:.0f} GB free, {need / 1e9:.0f} GB needed"}
            continue
        data_dir = scratch / label
        # a killed run leaves its directory (the rmtree below never ran): start clean, or
        # the outputs collide and the "cold" cache is warm
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir()
        prefix = data_dir / "synthetic_text_document"
        try:
            row = _write_dataset(prefix, tokens)
            print(f"{label}: written {row}", flush=True)
            cache = data_dir / "cache"
            run_env = dict(env, NEMO_MINITRON_DATA_CACHE=str(cache))
            out = _run([sys.executable, "-c", INDEX_ONLY.format(vocab=VOCAB), str(prefix), str(args.seq_len)],
                       dict(env, NEMO_MINITRON_DATA_CACHE=str(data_dir / "index-only-cache")))
            seconds = float(next(line for line in out.pop("output").splitlines() if "INDEX_SECONDS" in line).split()[1])
            row["index_build"] = {"seconds": round(seconds, 2), "peak_rss_gb": out["peak_rss_gb"]}
            for phase in ("cold", "warm"):
                row[f"importance_{phase}"] = _run(cli + [
                    "importance", str(model), "--data", str(prefix), "--split", "99,1,0", "--samples", "16",
                    "--seq-len", str(args.seq_len), "--micro-batch", "4", "--layer-samples", "4",
                    "--out", str(data_dir / f"imp-{phase}")], run_env)
                row[f"importance_{phase}"].pop("output")
                row[f"distill_{phase}"] = _run(cli + [
                    "distill", "--teacher", str(model), "--student", str(model), "--data", str(prefix),
                    "--split", "99,1,0", "--steps", "2", "--global-batch", "4", "--micro-batch", "2",
                    "--seq-len", str(args.seq_len), "--eval-samples", "4", "--out", str(data_dir / f"kd-{phase}")],
                    run_env)
                row[f"distill_{phase}"].pop("output")
                print(f"{label} {phase}: importance {row[f'importance_{phase}']}, distill {row[f'distill_{phase}']}",
                      flush=True)
            results["sizes"][label] = row
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
    write_results(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
