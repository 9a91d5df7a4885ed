#!/usr/bin/env python3
"""Peak extra memory of the KD logit loss (forward + backward), chunked (ours) against
the naive full-tensor form (float32 log-softmax of student and teacher over [tokens,
vocab], as NVIDIA's reference computes it), at vocabularies 49152 (SmolLM2) and 128256
(Llama 3). Each variant runs in a fresh process; its extra memory is the growth of the
peak resident set size over what the inputs (bf16 logits and their gradient) already
use (the inputs are built without float32 temporaries, so the baseline peak is what
they occupy). Target: at most 25% of the naive extra memory."""

from __future__ import annotations

import json
import subprocess
import sys

from common import parser, write_results

WORKER = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[4])
variant, vocab, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
def logits():  # filled a few rows at a time, so no float32 copy raises the peak before we measure
    out = torch.empty(tokens, vocab, dtype=torch.bfloat16)
    for i in range(0, tokens, 64):
        out[i:i + 64] = torch.randn(min(64, tokens - i), vocab, generator=g) * 2
    return out
student = logits().requires_grad_(True)
teacher = logits()
student.grad = torch.zeros_like(student)          # the gradient buffer exists either way
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = peak()
T = 1.0
if variant == "naive":
    log_p = torch.log_softmax(student.float() / T, dim=-1)
    log_q = torch.log_softmax(teacher.float() / T, dim=-1)
    loss = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * T * T
else:
    from nemo_minitron.distill.config import DistillConfig
    from nemo_minitron.distill.losses import LogitLossConfig, logit_loss
    loss = logit_loss(student, teacher, None, LogitLossConfig.of(DistillConfig(), vocab, temperature=T,
                                                                 chunk_tokens=int(sys.argv[5])))[0]
loss.backward()
print(json.dumps({"extra_bytes": peak() - base, "loss": loss.item()}))
"""


def measure(variant: str, vocab: int, tokens: int, chunk: int) -> dict:
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", WORKER, variant, str(vocab), str(tokens), root, str(chunk)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=256, help="tokens per chunk of the chunked loss")
    args = p.parse_args()
    results = {"benchmark": "kd_loss_memory", "tokens": args.tokens, "chunk_tokens": args.chunk, "vocab": {}}
    for vocab in (49152, 128256):
        naive = measure("naive", vocab, args.tokens, args.chunk)
        chunked = measure("chunked", vocab, args.tokens, args.chunk)
        assert abs(naive["loss"] - chunked["loss"]) <= 1e-3 * abs(naive["loss"]), (naive, chunked)
        results["vocab"][str(vocab)] = {
            "naive_extra_MiB": round(naive["extra_bytes"] / 2**20, 1),
            "chunked_extra_MiB": round(chunked["extra_bytes"] / 2**20, 1),
            "ratio": round(chunked["extra_bytes"] / max(naive["extra_bytes"], 1), 4), "target": 0.25}
    write_results(args, results)


if __name__ == "__main__":
    main()
