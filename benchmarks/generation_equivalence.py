#!/usr/bin/env python3
"""Generation and scoring of SmolLM2-135M against transformers, on its Hugging Face export.

1. Greedy generation: 32 prompts (5 to 36 words of held-out docstrings), 32 new tokens,
   with ``nemo-minitron generate`` (one batch of 32, KV cache) at TP=1, TP=3 (3 gloo
   processes) and PP=2 (2 processes); the reference is transformers' ``generate`` on
   each prompt alone. Reported: prompts whose tokens all equal the reference, and
   generation throughput (new tokens/s of the whole batch, from the log).
2. Scoring: the log-likelihoods of the built-in tasks' requests (first ``--task-limit``
   examples of each) through our lm-eval ``LM`` and through lm-eval's own HF model;
   reported: largest absolute difference, and each task's accuracy through both.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, parser, smollm2_checkpoint, write_results


def _generate(checkpoint: Path, prompts: Path, out: Path, nproc: int, *layout: str) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port=29533"] \
        if nproc > 1 else [sys.executable]
    if nproc > 1:
        env["OMP_NUM_THREADS"] = "1"
    cmd = [*launcher, "-m", "nemo_minitron", "generate", str(checkpoint), "--prompts", str(prompts), "--out", str(out),
           "--max-new-tokens", "32", "--batch-size", "32",
           # the reference is transformers in float32; --dtype auto would be bf16 on CPUs with native bf16
           "--dtype", "float32", *layout]
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    rate = re.findall(r"new tokens, ([0-9.]+) tokens/s", proc.stderr)
    return time.time() - start, float(rate[-1]) if rate else float("nan")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--task-limit", type=int, default=64)
    args = p.parse_args()

    import torch

    from nemo_minitron.checkpoint.api import export, open_model
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.data.builtin import builtin_documents
    from nemo_minitron.runtime.distributed import init_distributed

    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_models import hf_greedy

    ckpt = smollm2_checkpoint()
    work = Path(tempfile.mkdtemp(prefix="generation_equivalence-"))
    init_distributed(1, 1)
    hf_dir = export(str(ckpt), str(work / "hf"))
    hf = load_hf_model(hf_dir)
    opened = open_model(str(ckpt))
    tok, desc = opened.tokenizer, opened.description
    docs = builtin_documents("heldout")
    texts = [" ".join(docs[3 * i].split()[:5 + i]) for i in range(args.prompts)]
    prompts_file = work / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    tokens = [tok(t)["input_ids"] for t in texts]
    start = time.time()
    expected = hf_greedy(hf, tokens, 32, desc.eos_token_id)
    hf_seconds = time.time() - start

    results: dict = {"prompts": len(texts), "new_tokens": 32,
                     "prompt_tokens": [min(map(len, tokens)), max(map(len, tokens))],
                     "transformers_one_prompt_at_a_time_seconds": round(hf_seconds, 1)}
    for name, nproc, layout in (("tp1", 1, ()), ("tp3", 3, ("--tp", "3")), ("pp2", 2, ("--pp", "2"))):
        out = work / f"{name}.jsonl"
        wall, rate = _generate(ckpt, prompts_file, out, nproc, *layout)
        got = [json.loads(line)["completion_ids"] for line in out.read_text().splitlines()]
        same = sum(g == e for g, e in zip(got, expected))
        first = next((i for i, (g, e) in enumerate(zip(got, expected)) if g != e), None)
        results[name] = {"prompts_equal_to_transformers": same, "first_mismatch": first,
                         "tokens_per_second": rate, "wall_seconds_with_startup": round(wall, 1)}
        print(name, results[name], flush=True)

    # scoring: our LM against lm-eval's HF model, on the same requests
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from nemo_minitron.tasks.api import resolve_tasks, run_tasks
    from nemo_minitron.tasks.builtin import lastword_examples, nextsentence_examples
    from nemo_minitron.tasks.lm import MegatronLM

    ours = MegatronLM(opened.model, desc, tok, batch_size=16)
    theirs = HFLM(pretrained=str(hf_dir), batch_size=16, device="cpu")
    pairs = [(e["context"], e["target"]) for e in lastword_examples()[:args.task_limit]]
    pairs += [(e["context"], " " + c) for e in nextsentence_examples()[:args.task_limit] for c in e["choices"]]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(pairs)]
    a = ours.loglikelihood(requests)
    b = theirs.loglikelihood(requests)
    diffs = torch.tensor([x[0] - y[0] for x, y in zip(a, b)]).abs()
    results["loglikelihood_vs_lm_eval_hf"] = {
        "requests": len(pairs), "max_abs_diff": float(diffs.max()), "mean_abs_diff": float(diffs.mean()),
        "greedy_flags_equal": sum(x[1] == y[1] for x, y in zip(a, b))}
    tasks = resolve_tasks(["minitron_lastword", "minitron_nextsentence"])
    for label, lm in (("ours", ours), ("lm_eval_hf", theirs)):
        scores = run_tasks(lm, tasks, limit=args.task_limit)
        results[f"task_accuracy_{label}"] = {t: r.metrics for t, r in scores.items()}
    write_results(args, results)


if __name__ == "__main__":
    main()
