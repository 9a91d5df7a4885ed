"""A killed importance run, started again with the same settings, resumes from its journal
(importance/journal.py): it does only the work the killed run had not finished, and its
output equals that of a run that was never killed. The kill is an exception raised inside
a phase (what a killed process leaves: the journal, no output); the counts of the passes
each run makes show what was done again.

Equal bits, not a tolerance: the resumed run does the same arithmetic in the same order on
the same machine, with one thread (as the unbroken run), and reads what the killed run
measured back exactly (JSON floats, safetensors and torch.save keep every bit)."""

from __future__ import annotations

import functools
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_workers, torch_threads
from tolerances import fp32, log_softmax_sum

SEQ, SEED = 24, 5
KIND = "llama_wide_mlp"  # 4 layers, 4 K/V groups, MLP 768
OPTIONS = {"samples": 16, "seq_len": SEQ, "micro_batch": 1, "layer_samples": 2, "drop_blocks": [2],
           "block_variants": True, "ffn_variants": 2, "block_samples": 4, "seed": SEED, "dtype": "float32",
           "block_distill_steps": 3, "block_distill_samples": 8, "block_distill_batch": 2}
# the refit scores need second moments and untrained variants
REFIT = {**OPTIONS, "block_distill_steps": 0, "second_moments": True}


class Killed(Exception):
    pass


class Counted:
    """Wraps attribute ``name`` of a module or class (a method): counts its calls and raises
    Killed at call ``kill_at``."""

    def __init__(self, monkeypatch, owner, name: str, kill_at: int | None = None):
        self.original, self.calls, self.kill_at = getattr(owner, name), 0, kill_at
        monkeypatch.setattr(owner, name, self)

    def __get__(self, instance, owner=None):  # as a method: bound to the instance
        return self if instance is None else functools.partial(self, instance)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.kill_at:
            raise Killed
        return self.original(*args, **kwargs)


def _counters(monkeypatch, kill: dict[str, int] | None = None) -> dict[str, Counted]:
    """The passes of each phase, in the order the phases run: layer-loss measurements (one
    per set of skipped layers), locally distilled variants and block-scoring micro-batches
    (one parent per micro-batch)."""
    from nemo_minitron.importance import blocks, layers, local_distill

    kill = kill or {}
    return {"layer loss": Counted(monkeypatch, layers.SkipLosses, "_from_recorded", kill.get("layer loss")),
            "distilled variants": Counted(monkeypatch, local_distill, "train_variant", kill.get("distilled variants")),
            "block micro-batches": Counted(monkeypatch, blocks, "_Parent", kill.get("block micro-batches"))}


def _run(checkpoint, out, options, monkeypatch, kill=None) -> dict[str, int]:
    from nemo_minitron.importance.api import compute_importance

    counters = _counters(monkeypatch, kill)
    with torch_threads(1):
        try:
            compute_importance(str(checkpoint), ["builtin:calib"], str(out), progress=False, **options)
        except Killed:
            pass
    monkeypatch.undo()
    return {name: c.calls for name, c in counters.items()}


@pytest.fixture(scope="module")
def unbroken(tiny_checkpoint, tmp_path_factory):
    """Each setting's run, never killed, and the passes of each phase it made."""
    root = tmp_path_factory.mktemp("unbroken")
    out = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, options in (("trained", OPTIONS), ("refit", REFIT)):
            out[name] = (root / name, _run(tiny_checkpoint(KIND), root / name, options, monkeypatch))
    return out


def _assert_equal_outputs(got, want):
    from nemo_minitron.importance.scores import ImportanceScores

    a, b = ImportanceScores.load(got), ImportanceScores.load(want)
    assert set(a.tensors) == set(b.tensors)
    for key in b.tensors:
        assert torch.equal(a[key], b[key]), key
    for key in ("full_loss", "layers"):
        assert a.summary[key] == b.summary[key], key
    blocks_a, blocks_b = a.summary["block_variants"], b.summary["block_variants"]
    assert blocks_a.get("distill", {}).get("nmse") == blocks_b.get("distill", {}).get("nmse")
    for name in ("block_variants.safetensors", "second_moments.safetensors"):
        if (want / name).is_file():
            x, y = load_file(str(got / name)), load_file(str(want / name))
            assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in y), name


# the phase killed, at which of its calls, in which run
KILLS = {"layer loss": ("trained", 9),           # 1 full + 4 single layers + 3 blocks of 2, then the greedy steps
         "distilled variants": ("trained", 6),   # layer 0's 4 variants trained, layer 1 half-way
         "block micro-batches": ("trained", 3),  # 2 of the 4 block samples scored
         "block micro-batches, refit": ("refit", 4)}


@pytest.mark.parametrize("phase", list(KILLS))
def test_a_killed_run_resumes_and_equals_an_unbroken_one(unbroken, tiny_checkpoint, tmp_path, monkeypatch, phase):
    from nemo_minitron.importance.journal import journal_dir

    setting, kill_at = KILLS[phase]
    counter = phase.split(",")[0]
    reference, full = unbroken[setting]
    options = OPTIONS if setting == "trained" else REFIT
    out = tmp_path / "imp"
    killed = _run(tiny_checkpoint(KIND), out, options, monkeypatch, kill={counter: kill_at})
    assert killed[counter] == kill_at  # the kill happened where it was meant to
    assert not out.exists() and journal_dir(out).is_dir()  # no output, the journal kept

    resumed = _run(tiny_checkpoint(KIND), out, options, monkeypatch)
    _assert_equal_outputs(out, reference)
    assert not journal_dir(out).exists()
    # the resumed run redoes only what the killed one had not finished: the phases before the
    # killed one not at all, the killed one from its killed call (a distilled layer is kept
    # whole: layer 1's first variant, trained before the kill, is trained again), the later ones whole
    done_before = 4 if counter == "distilled variants" else kill_at - 1
    order = list(full)  # the phases in the order they run
    expected = {name: 0 if order.index(name) < order.index(counter) else full[name] for name in full}
    expected[counter] = full[counter] - done_before
    assert resumed == expected


def test_a_run_with_other_settings_starts_again(unbroken, tiny_checkpoint, tmp_path, monkeypatch, caplog):
    """The killed run's journal is not used by a run of other settings: a warning names what
    changed, and every pass is made again."""
    out = tmp_path / "imp"
    _run(tiny_checkpoint(KIND), out, {**OPTIONS, "layer_samples": 1}, monkeypatch, kill={"block micro-batches": 2})
    with caplog.at_level(logging.WARNING, logger="nemo_minitron"):
        resumed = _run(tiny_checkpoint(KIND), out, OPTIONS, monkeypatch)
    assert "layer_samples 1 -> 2" in caplog.text
    reference, full = unbroken["trained"]
    assert resumed == full
    _assert_equal_outputs(out, reference)


def test_another_micro_batch_keeps_the_layer_losses_and_rescores_the_blocks(unbroken, tiny_checkpoint, tmp_path,
                                                                           monkeypatch):
    """micro_batch may change on resume: the layer losses and trained variants are kept, the
    block sums (per micro-batch) are made again at the new size."""
    out = tmp_path / "imp"
    _run(tiny_checkpoint(KIND), out, OPTIONS, monkeypatch, kill={"block micro-batches": 3})
    resumed = _run(tiny_checkpoint(KIND), out, {**OPTIONS, "micro_batch": 2}, monkeypatch)
    assert resumed == {"layer loss": 0, "distilled variants": 0, "block micro-batches": 2}


@pytest.mark.multirank
def test_a_killed_run_resumes_at_dp2(unbroken, tiny_checkpoint, tmp_path):
    """Two data-parallel ranks, killed together in the block scoring (each after its first
    micro-batch), resume each from its own sums: the scores equal the one-rank run's."""
    from nemo_minitron.importance.journal import journal_dir
    from nemo_minitron.importance.scores import BLOCK_AXES, REFIT_BLOCK_AXES, ImportanceScores

    out = tmp_path / "imp"
    out.mkdir()
    spec = {"out": str(out), "layouts": {"dp2": [1, 1]}, "models": {KIND: str(tiny_checkpoint(KIND))},
            "options": REFIT, "kill_block_micro_batch": 2}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_workers("importance_layouts.py", tmp_path / "spec.json", out=tmp_path / "killed")
    assert not (out / f"dp2-{KIND}").exists() and journal_dir(out / f"dp2-{KIND}").is_dir()
    del spec["kill_block_micro_batch"]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_workers("importance_layouts.py", tmp_path / "spec.json", out=tmp_path / "resumed")
    counts = json.loads((out / "block-micro-batches.json").read_text())
    assert counts == [1, 1]  # each rank scored its 2 block samples, one of them before the kill
    one, two = ImportanceScores.load(unbroken["refit"][0]), ImportanceScores.load(out / f"dp2-{KIND}")
    # as test_per_layer's DP=2 tests: logits below 1, products 768 wide, log-softmax sums over 1000 tokens
    tol = 2 * (fp32(768 * (2 * 4 + 1), 1.0) + log_softmax_sum(1000, 1.0))
    for axis in BLOCK_AXES + REFIT_BLOCK_AXES:
        assert (two[axis] - one[axis]).abs().max().item() <= tol, axis
