"""Generation, scoring and task evaluation of the real SmolLM2-135M across layouts, in one
3-process run: tensor parallel 3 (its 3 query groups), pipeline parallel 3 (first,
middle and last stage) and data parallel 3. benchmarks/generation_equivalence.py runs
the full check (32 prompts x 32 new tokens at TP=1, TP=3 and PP=2)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_workers
from tiny_models import hf_continuation_logprob, hf_greedy

pytestmark = [pytest.mark.smollm2, pytest.mark.multirank]

# SmolLM2's fp32 logits differ from transformers' by up to ~1e-3 after 30 layers (see
# test_layouts); a log-probability is a logit minus a log-sum-exp, each off by that much,
# and a continuation sums 8 of them, errors of either sign: sqrt(8) * 2e-3 ~ 6e-3.
SMOLLM2_TOL = 6e-3


def test_smollm2_generation_scoring_and_tasks_at_tp3_pp3_dp3(smollm2, smollm2_hf, runtime, tmp_path):
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.data.builtin import builtin_documents
    from nemo_minitron.tasks.api import resolve_tasks, run_tasks
    from nemo_minitron.tasks.lm import MegatronLM

    opened = open_model(str(smollm2["checkpoint"]))
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
    run_workers("inference_layouts.py", "--checkpoint", smollm2["checkpoint"], "--inputs", tmp_path / "inputs.pt",
                "--out", tmp_path / "results.pt", "--prompts", prompts_file, "--generated-dir", tmp_path, nproc=3)
    results = torch.load(tmp_path / "results.pt")

    hf = smollm2_hf["model"]
    expected = hf_greedy(hf, prompts, 12, desc.eos_token_id)
    scores = [hf_continuation_logprob(hf, c, x) for c, x in pairs]
    for layout in ("tp3-pp1", "tp1-pp3"):
        got = results[layout]
        assert got["generated"] == expected[:4], layout
        for (lp, greedy), (ref, ref_greedy) in zip(got["loglikelihoods"], scores):
            assert abs(lp - ref) < SMOLLM2_TOL and greedy == ref_greedy, (layout, lp, ref)

    records = [json.loads(line) for line in (tmp_path / "dp3.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(7))
    assert [r["completion_ids"] for r in records] == expected

    lm = MegatronLM(opened.model, desc, tok, batch_size=4)
    single = run_tasks(lm, resolve_tasks(["minitron_nextsentence"]), limit=12)["minitron_nextsentence"]
    assert results["dp3-task"]["samples"] == single.samples == 12
    assert results["dp3-task"]["metrics"] == pytest.approx(single.metrics, abs=1e-12)
