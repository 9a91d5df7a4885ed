"""The real SmolLM2-135M pruned by activation importance beats weight magnitude and random
choice on held-out loss right after pruning (the full measurement: benchmarks/prune_order.py)."""

from __future__ import annotations

import pytest

TARGET = {"hidden": 480, "ffn": 1024, "heads": 6, "query_groups": 3}


@pytest.mark.slow
@pytest.mark.smollm2
def test_importance_beats_magnitude_and_random(smollm2, smollm2_importance, tmp_path):
    from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.evaluate import evaluate
    from nemo_minitron.prune.api import prune

    ckpt = str(smollm2["checkpoint"])
    importance = smollm2_importance[0]
    tokenizer = load_tokenizer(ckpt)
    heldout = check_corpus(["builtin:heldout"]).dataset(tokenizer, seq_len=128, seed=0, part="valid").take(8)
    loss = {}
    for order in ("importance", "magnitude", "random"):
        out = prune(ckpt, str(importance), str(tmp_path / order), target=TARGET, order=order)
        model, info = load_checkpoint(out)
        assert (info.description.hidden_size, info.description.heads_per_group) == (480, 2)
        loss[order] = evaluate(model, info.description.vocab_size, heldout, micro_batch=8).loss
    assert loss["importance"] < loss["magnitude"] and loss["importance"] < loss["random"], loss
