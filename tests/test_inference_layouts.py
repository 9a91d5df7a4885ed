"""Generation, scoring and task evaluation across layouts, in one N-process run: tensor
parallel N, pipeline parallel N and data parallel N. A tiny Llama at N=2; the real
SmolLM2-135M at N=3 (its 3 query groups; first, middle and last stage) in the slow tier.
benchmarks/generation_equivalence.py runs the full check (32 prompts x 32 new tokens at
TP=1, TP=3 and PP=2)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_workers
from tiny_models import hf_continuation_logprob, hf_greedy
from tolerances import log_softmax_sum, transformer_logits

pytestmark = pytest.mark.multirank

# SmolLM2's fp32 logits differ from transformers' by up to ~1e-3 after 30 layers (see
# test_layouts); a log-probability is a logit minus a log-sum-exp, each off by that much,
# and a continuation sums 8 of them, errors of either sign: sqrt(8) * 2e-3 ~ 6e-3.
SMOLLM2_TOL = 6e-3


def _check_layouts(checkpoint, hf, tmp_path, nproc: int, tol: float | None = None) -> None:
    """Run the worker on ``checkpoint`` with ``nproc`` processes and compare with ``hf``
    (transformers, the same weights): greedy tokens at TP=N and PP=N and from ``generate``
    at DP=N; continuation log-likelihoods within ``tol`` (None: the tiny-model bound from the
    logits); the task's metrics at DP=N equal those of one process."""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.data.builtin import builtin_documents
    from nemo_minitron.tasks.api import resolve_tasks, run_tasks
    from nemo_minitron.tasks.lm import MegatronLM

    opened = open_model(str(checkpoint))
    tok, desc = opened.tokenizer, opened.description
    texts = [" ".join(d.split()[:3 + 2 * i]) for i, d in enumerate(builtin_documents("heldout")[10:17])]
    prompts = [tok(t)["input_ids"] for t in texts]
    long_docs = [d for d in builtin_documents("heldout") if len(d.split()) >= 40][:3]
    windows = [tok(" ".join(d.split()[:40]))["input_ids"] for d in long_docs]
    pairs = [(w[:12 + 3 * i], w[12 + 3 * i:20 + 3 * i]) for i, w in enumerate(windows)]
    inputs = {"prompts": prompts[:4], "max_new_tokens": 12, "pairs": pairs, "task": "minitron_nextsentence",
              "limit": 12}
    torch.save(inputs, tmp_path / "inputs.pt")
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    run_workers("inference_layouts.py", "--checkpoint", checkpoint, "--inputs", tmp_path / "inputs.pt",
                "--prompts", prompts_file, "--out", out, out=out, nproc=nproc)
    results = torch.load(out / "results.pt")

    expected = hf_greedy(hf, prompts, 12, desc.eos_token_id)
    scores = [hf_continuation_logprob(hf, c, x) for c, x in pairs]
    if tol is None:
        # float32 logits of two implementations (widest product 96, 4 layers: tiny_models.py)
        # minus a log-sum-exp over the 1000-token vocabulary, summed over 8 tokens
        with torch.no_grad():
            top = max(hf(torch.tensor([c + x])).logits.abs().max().item() for c, x in pairs)
        tol = 8 * (transformer_logits(96, 4, torch.tensor(top)) + log_softmax_sum(1000, top))
    for layout in (f"tp{nproc}-pp1", f"tp1-pp{nproc}"):
        got = results[layout]
        assert got["generated"] == expected[:4], layout
        for (lp, greedy), (ref, ref_greedy) in zip(got["loglikelihoods"], scores):
            assert abs(lp - ref) < tol and greedy == ref_greedy, (layout, lp, ref)

    records = [json.loads(line) for line in (out / f"dp{nproc}.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(7))
    assert [r["completion_ids"] for r in records] == expected

    lm = MegatronLM(opened.model, desc, tok, batch_size=4)
    single = run_tasks(lm, resolve_tasks(["minitron_nextsentence"]), limit=12)["minitron_nextsentence"]
    assert results[f"dp{nproc}-task"]["samples"] == single.samples == 12
    assert results[f"dp{nproc}-task"]["metrics"] == pytest.approx(single.metrics, abs=1e-12)


def test_generation_scoring_and_tasks_at_tp2_pp2_dp2(tiny_hf, tiny_checkpoint, runtime, one_thread, tmp_path):
    from nemo_minitron.checkpoint.verify import load_hf_model

    _check_layouts(tiny_checkpoint("llama"), load_hf_model(tiny_hf("llama")).eval(), tmp_path, nproc=2)


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_generation_scoring_and_tasks_at_tp3_pp3_dp3(smollm2, smollm2_hf, runtime, tmp_path):
    _check_layouts(smollm2["checkpoint"], smollm2_hf["model"], tmp_path, nproc=3, tol=SMOLLM2_TOL)
