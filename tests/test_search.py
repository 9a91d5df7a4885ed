"""Architecture search: which candidates, successive halving, resumption and clean-up on a
tiny model; bad input; and the real SmolLM2-135M searched for 90M parameters."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import cli_in_process, fast_dtype

STEPS = 4
TINY_SEARCH = dict(target_params="0.22M", candidates=3, candidate=[{"ffn": 32}], halving=True, steps=STEPS,
                   global_batch=4, micro_batch=2, seq_len=16, lr=1e-3, warmup_steps=1, eval_every=1, eval_samples=4,
                   cache_top_k=16, seed=3, layer_metric="loss")  # synthetic scores: no greedy order, no blocks


def heldout_samples(checkpoint, seq_len: int, seed: int, count: int) -> torch.Tensor:
    """The held-out samples a distillation evaluates on (builtin:heldout read whole, in
    megatron-core's order for the seed), built here through the data layer."""
    from nemo_minitron.checkpoint.store import load_tokenizer
    from nemo_minitron.data.dataset import check_corpus

    return check_corpus(["builtin:heldout"], flag="--eval-data").dataset(
        load_tokenizer(checkpoint), seq_len=seq_len, seed=seed, part="valid").take(count)


def test_candidates_differ_and_meet_the_budget():
    """For SmolLM2-135M -> 90M the planner's candidates come one of each kind in turn (width,
    depth, mixed), each within the tolerance of the budget and at least MIN_DISTANCE from the
    others on some axis; explicit shapes are added once."""
    from test_plan import SMOLLM2_135M, _desc

    from nemo_minitron.config import build, cli_names
    from nemo_minitron.search.candidates import search_candidates
    from nemo_minitron.search.config import MIN_DISTANCE, SearchConfig

    original = _desc(SMOLLM2_135M)
    cfg = build(SearchConfig, target_params="90M", candidates=4,
                candidate=[{"layers": 20}, {"hidden": 448, "ffn": 1152}])  # the second is the planner's first
    picked = search_candidates(original, cfg, names=cli_names(SearchConfig))
    assert [c.name for c in picked] == ["c1", "c2", "c3", "c4", "c5"]
    assert [c.kind for c in picked] == ["width", "depth", "mixed", "width", "depth"]
    assert [c.source for c in picked] == ["planner"] * 4 + ["explicit"]
    axes = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "num_layers")
    for c in picked[:4]:
        assert abs(c.description.num_parameters() / 90e6 - 1) <= 0.05
        d = c.description
        widths_kept = all(getattr(d, a) == getattr(original, a) for a in axes[:4])
        assert (c.kind == "depth") == widths_kept and (c.kind == "width") == (d.num_layers == original.num_layers)
    for i, a in enumerate(picked[:4]):
        for b in picked[i + 1:4]:
            gap = max(abs(getattr(a.description, x) - getattr(b.description, x)) / getattr(original, x) for x in axes)
            assert gap >= MIN_DISTANCE, (a, b)
    assert picked[4].target()["layers"] == 20 and picked[0].target()["hidden"] == 448


@pytest.fixture(scope="module")
def tiny_importance(tiny_checkpoint, tmp_path_factory):
    from test_prune import synthetic_scores

    from nemo_minitron.checkpoint.store import read_info

    directory = tmp_path_factory.mktemp("search_importance") / "imp"
    directory.mkdir()
    synthetic_scores(read_info(tiny_checkpoint("llama")).description, directory, seed=4)
    return directory


@pytest.fixture(scope="module")
def halving_search(tiny_checkpoint, tiny_importance, tmp_path_factory, runtime):
    """Four candidates (three of the planner's, one explicit) distilled from one teacher-logit
    cache with successive halving; killed during its fourth distillation, then started
    again. What the two runs pruned, cached and distilled (the calls, with stop_at), the
    second run's result and log."""
    import nemo_minitron.distill.api as distill_api
    import nemo_minitron.distill.teacher_logits as cache_api
    import nemo_minitron.prune.api as prune_api

    from nemo_minitron.search.api import search

    teacher = str(tiny_checkpoint("llama"))
    out = tmp_path_factory.mktemp("halving") / "search"
    calls: dict[str, list] = {"prune": [], "distill": [], "cache": []}
    real = {"prune": prune_api.prune, "distill": distill_api.distill, "cache": cache_api.write_teacher_logits}

    def spy(kind, kill_at=None):
        def wrapped(*args, **kwargs):
            calls[kind].append((Path(args[2] if kind != "distill" else args[3]).parent.name, kwargs.get("stop_at")))
            if kill_at is not None and len(calls[kind]) == kill_at:
                raise KeyboardInterrupt  # the search is killed here
            return real[kind](*args, **kwargs)
        return wrapped

    log = io.StringIO()
    handler = logging.StreamHandler(log)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prune_api, "prune", spy("prune"))
        mp.setattr(cache_api, "write_teacher_logits", spy("cache"))
        mp.setattr(distill_api, "distill", spy("distill", kill_at=4))
        with pytest.raises(KeyboardInterrupt):
            search(teacher, str(tiny_importance), ["builtin:train"], str(out), progress=False, **TINY_SEARCH)
        killed = {"calls": {k: list(v) for k, v in calls.items()}, "search_json": (out / "search.json").exists()}
        for v in calls.values():
            v.clear()
        mp.setattr(distill_api, "distill", spy("distill"))
        logger = logging.getLogger("nemo_minitron")
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            result = search(teacher, str(tiny_importance), ["builtin:train"], str(out), progress=False, **TINY_SEARCH)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
    return {"teacher": teacher, "out": out, "killed": killed, "calls": calls, "result": result, "log": log.getvalue(),
            "rows": {r["name"]: r for r in result["candidates"]}}


def test_a_killed_search_resumes_without_doing_anything_twice(halving_search):
    """Killed during its fourth distillation (no search.json yet), the search started again
    prunes and caches nothing again, runs the killed distillation again to half the steps,
    then the two survivors the rest of the way."""
    first, calls = halving_search["killed"]["calls"], halving_search["calls"]
    assert not halving_search["killed"]["search_json"]
    assert len(first["prune"]) == 4 and len(first["cache"]) == 1 and len(first["distill"]) == 4
    assert calls["prune"] == [] and calls["cache"] == []  # pruned candidates and the cache were reused
    assert calls["distill"][0] == first["distill"][3] and calls["distill"][0][1] == STEPS // 2
    assert len(calls["distill"]) == 3 and all(stop is None for _, stop in calls["distill"][1:])


def test_successive_halving_keeps_the_two_best_at_half_and_the_best_wins(halving_search):
    result, rows = halving_search["result"], halving_search["rows"]
    assert result["rungs"] == [STEPS // 2, STEPS] and len(rows) == 4 and rows["c4"]["source"] == "explicit"
    at_half = {n: r["rung_losses"][str(STEPS // 2)] for n, r in rows.items()}
    ahead = sorted(at_half, key=at_half.get)[:2]
    assert {n for n, r in rows.items() if r["final_loss"] is not None} == set(ahead)
    assert all(rows[n]["stopped_at"] == STEPS // 2 for n in rows if n not in ahead)
    finals = {n: rows[n]["final_loss"] for n in ahead}
    assert result["best"] == min(finals, key=finals.get)


def test_the_log_ranks_every_candidate_best_first(halving_search):
    rows = halving_search["rows"]
    table = halving_search["log"].split("search ranking")[1].splitlines()
    ranked = sorted(rows, key=lambda n: (rows[n]["final_loss"] is None, rows[n]["final_loss"] or 0,
                                         rows[n]["rung_losses"][str(STEPS // 2)]))
    assert [line.split()[1] for line in table[3:7]] == ranked and table[3].split()[2] == "*"


def test_each_candidate_has_its_heldout_curve_from_step_0(halving_search):
    """eval_every 1: the held-out loss at every step trained, from step 0 (right after
    pruning) to where the candidate stopped; the training loss at every step."""
    for r in halving_search["rows"].values():
        last = r["stopped_at"] or STEPS
        assert [s for s, _ in r["heldout_curve"]] == list(range(last + 1))
        assert r["heldout_curve"][0][1] == r["loss_after_pruning"]
        assert r["heldout_curve"][-1][1] == r["rung_losses"][str(last)]
        assert [s for s, _ in r["train_curve"]] == list(range(1, last + 1))


def test_only_the_winner_is_kept_and_its_final_loss_is_its_own(halving_search):
    """The winner's pruned checkpoint (the shape it was scored as) and its student stay, the
    rest goes; its final held-out loss, evaluated again here on the same held-out samples,
    is the one the search ranked it by."""
    from tolerances import fp32

    from nemo_minitron.checkpoint.store import is_checkpoint, load_checkpoint, read_info
    from nemo_minitron.evaluate import evaluate

    out, best = halving_search["out"], halving_search["rows"][halving_search["result"]["best"]]
    assert sorted(p.name for p in out.iterdir()) == ["best", "config.yaml", "search.json", "search.png",
                                                     "teacher-logits"]
    assert is_checkpoint(out / "best" / "pruned") and not (out / "best" / "distill" / "checkpoints").exists()
    assert read_info(out / "best" / "pruned").description.num_parameters() == best["params"]
    heldout = heldout_samples(halving_search["teacher"], 16, TINY_SEARCH["seed"], 4)
    model, info = load_checkpoint(out / "best" / "distill" / "final")
    loss = evaluate(model, info.description.vocab_size, heldout, micro_batch=2).loss
    assert abs(loss - best["final_loss"]) <= fp32(64 * 1000, loss)  # a mean of 64 tokens' log-softmax sums


def test_a_changed_setting_is_refused(halving_search, tiny_importance):
    from nemo_minitron.errors import UsageError
    from nemo_minitron.search.api import search

    with pytest.raises(UsageError, match="lr 0.001 -> 0.002"):
        search(halving_search["teacher"], str(tiny_importance), ["builtin:train"], str(halving_search["out"]),
               progress=False, **{**TINY_SEARCH, "lr": 2e-3})


@pytest.fixture(scope="module")
def tiny_cache(tiny_checkpoint, tmp_path_factory):
    """A teacher-logit cache of the tiny teacher at sequence length 8 (the search asks for 16)."""
    from nemo_minitron.distill.teacher_logits import write_teacher_logits

    out = tmp_path_factory.mktemp("search_cache") / "cache"
    return write_teacher_logits(str(tiny_checkpoint("llama")), ["builtin:train"], str(out), top_k=4, samples=4,
                                seq_len=8, progress=False)


@pytest.mark.parametrize("flags, words", [
    (["--target-params", "10K"], ["--target-params 10K: no architecture within 5% meets the limits"]),
    (["--target-params", "0.22M", "--cache-top-k", "5000"], ["--cache-top-k 5000 is larger than the vocabulary"]),
    (["--target-params", "0.22M", "--candidates", "0"], ["--candidates 0 and no --candidate: nothing to search"]),
    (["--target-params", "0.22M", "--candidate", "hidden=80"], ["--candidate: hidden=80 is larger than the "
                                                                "original model's 64"]),
    (["--target-params", "0.22M", "--cache-top-k", "8", "--kd-pairs", "0:1"], ["--cache-top-k with --kd-pairs"]),
    (["--candidates", "2"], ["--target-params is required (e.g. 90M)"]),
    (["--target-params", "0.22M", "--teacher-logits", "CACHE"], ["--teacher-logits", "was written for --seq-len 8, "
                                                                  "not --seq-len 16"]),
    (["--target-params", "0.22M", "--teacher-logits", "CACHE", "--cache-top-k", "8"],
     ["--teacher-logits and --cache-top-k: give one"]),
    # prune's default: a depth-only candidate drops the layers of importance's greedy elimination
    (["--target-params", "0.22M", "--layer-metric", "greedy"],  # auto falls back to the loss drops
     ["--layer-metric greedy: the importance run removed 0 layers greedily"]),
])
def test_bad_input(tiny_checkpoint, tiny_importance, tiny_cache, tmp_path, capsys, flags, words):
    flags = [str(tiny_cache) if f == "CACHE" else f for f in flags]
    out = tmp_path / "out"
    code, stderr = cli_in_process(capsys, "search", tiny_checkpoint("llama"), "--importance", tiny_importance,
                                  "--data", "builtin:train", "--out", out, "--seq-len", "16", "--layer-metric", "loss",
                                  *flags)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert all(w in stderr for w in words), stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_search_picks_the_lowest_heldout_loss(smollm2, smollm2_importance, tmp_path):
    """SmolLM2-135M searched for 90M parameters over 4 candidates (a short schedule from a
    teacher-logit cache): every candidate meets the budget, and the chosen one has the lowest
    held-out loss among the candidates' final checkpoints, evaluated here."""
    from tolerances import fp32

    from nemo_minitron.checkpoint.store import load_checkpoint
    from nemo_minitron.evaluate import evaluate
    from nemo_minitron.model.description import ModelDescription
    from nemo_minitron.search.api import search

    ckpt, out = str(smollm2["checkpoint"]), tmp_path / "search"
    result = search(ckpt, str(smollm2_importance[0]), ["builtin:train"], str(out), target_params="90M",
                    candidates=4, steps=2, global_batch=2, micro_batch=2, seq_len=32, lr=3e-4, warmup_steps=0,
                    eval_samples=2, eval_every=1, cache_top_k=64, keep_all=True, dtype=fast_dtype(),
                    layer_metric="loss", progress=False)  # the importance fixture records no greedy order
    from nemo_minitron.runtime.config import DEFAULT_SEED

    heldout = heldout_samples(ckpt, 32, DEFAULT_SEED, 2)
    assert len(result["candidates"]) == 4 and {c["kind"] for c in result["candidates"]} == {"width", "depth",
                                                                                            "mixed"}
    losses = {}
    for c in result["candidates"]:
        assert abs(c["params"] / 90e6 - 1) <= 0.05 and [s for s, _ in c["heldout_curve"]] == [0, 1, 2]
        model, info = load_checkpoint(out / c["directory"] / "distill" / "final", dtype=getattr(torch, fast_dtype()))
        assert info.description == ModelDescription.from_dict(c["architecture"])
        losses[c["name"]] = evaluate(model, info.description.vocab_size, heldout, micro_batch=2).loss
        del model
    # the same model (bf16 where native) on the same tokens: equal up to the float32 sum of 64 token losses
    tol = fp32(64, max(losses.values()))
    for c in result["candidates"]:
        assert abs(losses[c["name"]] - c["final_loss"]) <= tol, (c["name"], losses, c["final_loss"])
    assert all(losses[result["best"]] <= loss + tol for loss in losses.values()), (result["best"], losses)
    assert json.loads((out / "search.json").read_text())["best"] == result["best"] and (out / "search.png").is_file()
