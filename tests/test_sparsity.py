"""Sparsity (``sparsify``) on tiny models: masks against references written out here from the
activations the calibration saw, layouts, distillation that keeps the masks, export, and
bad input."""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from conftest import cli_in_process, run_workers
from tolerances import U32, fp32, fp64_solve, transformer_logits

SEED = 3
CALIB = dict(samples=8, seq_len=32, micro_batch=4)  # two micro-batches per calibration pass
MICRO_BATCHES = 2
#: product runs on the tiny Llama (4 layers, hidden 64, ffn 96; qkv 128 x 64, fc1 192 x 64):
#: block 32 puts two or three lazy-update (and unstructured mask) blocks in every weight
RUNS = {
    "sparsegpt_24": dict(method="sparsegpt", pattern="2:4", block_size=32),
    "sparsegpt_unstructured": dict(method="sparsegpt", pattern="unstructured:0.5", block_size=32, damp=0.05),
    "wanda_24": dict(method="wanda", pattern="2:4"),
    # one pass of the dense model, a subset of modules and layers, the output layer
    "wanda_subset": dict(method="wanda", pattern="unstructured:0.4", sequential=False,
                         modules=["qkv", "fc2", "output"], layers=[1, 2]),
    "magnitude_24": dict(method="magnitude", pattern="2:4"),
    "magnitude_unstructured": dict(method="magnitude", pattern="unstructured:0.3"),
}
SUFFIX = {"qkv": "self_attention.linear_qkv.weight", "proj": "self_attention.linear_proj.weight",
          "fc1": "mlp.linear_fc1.weight", "fc2": "mlp.linear_fc2.weight"}


# ---------------------------------------------------------------------- capturing the calibration
class Capture:
    """The input of every linear layer (float64 copies, [tokens, in]) at every call, and the
    tokens, recorded by hooks put on the model the product loads."""

    def __init__(self):
        self.inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.tokens: list[torch.Tensor] = []

    def attach(self, model) -> None:
        model.embedding.register_forward_pre_hook(
            lambda m, a, kw: self.tokens.append((a[0] if a else kw["input_ids"]).clone()), with_kwargs=True)
        for i, layer in enumerate(model.decoder.layers):
            for short, module in (("qkv", layer.self_attention.linear_qkv), ("proj", layer.self_attention.linear_proj),
                                  ("fc1", layer.mlp.linear_fc1), ("fc2", layer.mlp.linear_fc2)):
                module.register_forward_pre_hook(self._record(f"decoder.layers.{i}.{SUFFIX[short]}"))
        model.output_layer.register_forward_pre_hook(self._record("output_layer.weight"))

    def _record(self, name):
        def hook(module, args):
            self.inputs[name].append(args[0].detach().double().flatten(0, 1).clone())
        return hook


@contextlib.contextmanager
def capturing():
    import nemo_minitron.sparsity.api as api

    capture, load = Capture(), api.load_checkpoint

    def load_and_hook(*args, **kwargs):
        model, info = load(*args, **kwargs)
        capture.attach(model)
        return model, info

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "load_checkpoint", load_and_hook)
        yield capture


def canonical(path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights as float64, masks) of a checkpoint loaded at TP=1."""
    from nemo_minitron.checkpoint.store import load_checkpoint
    from nemo_minitron.model.params import named_weights
    from nemo_minitron.sparsity.masks import mask_of

    model, _ = load_checkpoint(path)
    weights = {n: p.detach().double().clone() for n, p in named_weights(model)}
    masks = {n: mask_of(p).clone() for n, p in named_weights(model) if mask_of(p) is not None}
    return weights, masks


# ---------------------------------------------------------------------- references
def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive scores of a row (argsort, group by group)."""
    rows, cols = scores.shape
    best = scores.reshape(rows, cols // m, m).argsort(dim=-1, descending=True)[..., :n]
    keep = torch.zeros(rows, cols // m, m, dtype=torch.bool)
    keep[torch.arange(rows)[:, None, None], torch.arange(cols // m)[None, :, None], best] = True
    return keep.reshape(rows, cols)


def lowest_pruned(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep all but the ``count`` lowest of ``scores`` (any shape)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[scores.flatten().argsort()[:count]] = False
    return keep.reshape(scores.shape)


def parse(pattern: str) -> tuple[int, int, float]:
    if pattern.startswith("unstructured:"):
        return 0, 0, float(pattern.split(":")[1])
    n, m = pattern.split(":")
    return int(n), int(m), 0.0


def reference_magnitude(w: torch.Tensor, pattern: str) -> torch.Tensor:
    n, m, ratio = parse(pattern)
    if m:
        return nm_keep(w.abs(), n, m)
    return lowest_pruned(w.abs(), round(ratio * w.numel()))  # over the whole matrix


def reference_wanda(w: torch.Tensor, x: torch.Tensor, pattern: str) -> torch.Tensor:
    """|W_ij| ||X_j||_2, compared within each row."""
    n, m, ratio = parse(pattern)
    scores = w.abs() * x.square().sum(0).sqrt()
    if m:
        return nm_keep(scores, n, m)
    return torch.stack([lowest_pruned(row, round(ratio * w.shape[1])) for row in scores])


def reference_sparsegpt(w: torch.Tensor, x: torch.Tensor, pattern: str, block: int, damp: float):
    """The optimal brain surgeon, one column at a time with no lazy blocks, from explicit inverses
    (float64): fixing column j with the columns F = j.. still free, the others move by
    -(w_j - q_j) / [H_F^-1]_jj [H_F^-1]_j,: . Masks from the scores w_c^2 / [H_{c..}^-1]_cc (the
    squared diagonal of the Cholesky factor of H^-1 that SparseGPT reads): N:M at each group's
    first column, unstructured once per block of ``block`` columns over all rows."""
    n, m, ratio = parse(pattern)
    h = x.T @ x
    h = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    cols = h.shape[0]
    inverses = [torch.linalg.inv(h)]  # H_F^-1 for F = j.., each from the last by removing its first column
    for j in range(1, cols):
        last = inverses[-1]
        inverses.append(last[1:, 1:] - torch.outer(last[1:, 0], last[0, 1:]) / last[0, 0])
    d = torch.tensor([inverses[c][0, 0] for c in range(cols)], dtype=torch.float64)
    w = w.clone()
    keep = torch.ones_like(w, dtype=torch.bool)
    for j in range(cols):
        if m and j % m == 0:
            keep[:, j:j + m] = nm_keep(w[:, j:j + m].square() / d[j:j + m], n, m)
        if not m and j % block == 0:
            scores = w[:, j:j + block].square() / d[j:j + block]
            keep[:, j:j + block] = lowest_pruned(scores, round(ratio * scores.numel()))
        q = torch.where(keep[:, j], w[:, j], torch.zeros_like(w[:, j]))
        w[:, j:] -= ((w[:, j] - q) / inverses[j][0, 0]).unsqueeze(1) * inverses[j][0].unsqueeze(0)
        w[:, j] = q
    return w, keep, torch.linalg.cond(h).item()


# ---------------------------------------------------------------------- fixtures
def sparsify_captured(ckpt, out: Path, settings: dict) -> tuple[Path, Capture]:
    from nemo_minitron.sparsity.api import sparsify

    with capturing() as capture:
        path = sparsify(str(ckpt), str(out), ["builtin:calib"], seed=SEED, progress=False, **CALIB, **settings)
    return path, capture


@pytest.fixture(scope="module")
def sparse_runs(tiny_checkpoint, tmp_path_factory, runtime):
    """Every run of RUNS on the tiny Llama at TP=1: (checkpoint, capture)."""
    root = tmp_path_factory.mktemp("sparse")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny products: no thread barriers on a busy machine
    try:
        return {name: sparsify_captured(tiny_checkpoint("llama"), root / name, settings)
                for name, settings in RUNS.items()}
    finally:
        torch.set_num_threads(threads)


def _passes(settings: dict, num_layers: int = 4) -> dict[str, int]:
    """Which calibration pass each sparsified weight's statistics come from."""
    layers = settings.get("layers") or list(range(num_layers))
    modules = settings.get("modules", list(SUFFIX))
    if not settings.get("sequential", True):
        order = {}
    else:
        order = {i: k for k, i in enumerate(layers)}
    names = {f"decoder.layers.{i}.{SUFFIX[mod]}": order.get(i, 0) for i in layers for mod in modules if mod in SUFFIX}
    if "output" in modules:
        names["output_layer.weight"] = len(layers) if order else 0
    return names


# ---------------------------------------------------------------------- tests
def test_masks_and_updates_equal_references_from_the_captured_activations(sparse_runs, tiny_checkpoint):
    """Every mask (and SparseGPT's updated weights) equals a reference computed here from the
    original weights and the activations the calibration fed each layer: magnitude (|W|, per
    group of 4 or over the matrix), Wanda (|W| x ||X_j||, per row), SparseGPT (an unblocked
    float64 OBS loop against the product's blocked one); only the chosen weights are masked,
    the pattern holds, and the record counts the zeros."""
    dense, _ = canonical(tiny_checkpoint("llama"))
    for name, (path, capture) in sparse_runs.items():
        settings = RUNS[name]
        weights, masks = canonical(path)
        passes = _passes(settings)
        assert set(masks) == set(passes), name
        record = json.loads((path / "nemo_minitron.json").read_text())["provenance"]["sparsity"]
        assert record["pattern"] == settings["pattern"] and set(record["weights"]) == set(passes)
        for weight, k in passes.items():
            w0 = dense[weight]
            got_w, got_keep = weights[weight], masks[weight]
            if weight == "output_layer.weight":  # vocabulary padding rows: not weights, masked out whole
                assert not got_keep[1000:].any() and not got_w[1000:].any()
                w0, got_w, got_keep = w0[:1000], got_w[:1000], got_keep[:1000]
            assert torch.equal(got_w[~got_keep], torch.zeros_like(got_w[~got_keep])), (name, weight)
            if settings["method"] == "magnitude":
                want_keep, want_w = reference_magnitude(w0, settings["pattern"]), w0 * reference_magnitude(
                    w0, settings["pattern"])
                tol = torch.zeros_like(w0)
            else:
                calls = capture.inputs[weight][k * MICRO_BATCHES:(k + 1) * MICRO_BATCHES]
                x = torch.cat(calls)
                assert x.shape[0] == CALIB["samples"] * CALIB["seq_len"], (name, weight)
                if settings["method"] == "wanda":
                    want_keep = reference_wanda(w0, x, settings["pattern"])
                    want_w, tol = w0 * want_keep, torch.zeros_like(w0)
                else:
                    want_w, want_keep, cond = reference_sparsegpt(w0, x, settings["pattern"], settings["block_size"],
                                                                  settings.get("damp", 0.01))
                    # the product's float64 solution, stored in float32
                    tol = U32 * want_w.abs() + fp64_solve(w0.shape[1], cond, w0.abs().max().item())
            assert torch.equal(got_keep, want_keep), (name, weight, (got_keep != want_keep).sum().item())
            assert ((got_w - want_w).abs() <= tol).all(), (name, weight, (got_w - want_w).abs().max().item())
            n, m, ratio = parse(settings["pattern"])
            if m:
                assert (got_keep.reshape(got_keep.shape[0], -1, m).sum(-1) == n).all()
            zeros = 1 - got_keep.sum().item() / got_keep.numel()
            assert abs(record["weights"][weight] - zeros) < 1e-6
        for weight in set(dense) - set(passes):  # everything else is untouched
            assert torch.equal(weights[weight], dense[weight]), (name, weight)


def test_sequential_calibration_sees_the_earlier_layers_sparse(sparse_runs, tiny_checkpoint):
    """Sequential calibration: layer l's statistics come from a pass in which layers < l hold
    their sparse weights and layer l its dense ones (the inputs such a model gives it);
    one-pass calibration: every layer's from the dense model."""
    from nemo_minitron.checkpoint.store import load_checkpoint
    from nemo_minitron.model.params import layer_of, named_weights

    tokens = sparse_runs["sparsegpt_24"][1].tokens[:MICRO_BATCHES]  # every run calibrates on the same samples

    @functools.cache
    def layer_inputs(sparse_path, sparse_below: int):
        """The linears' inputs of the dense model whose layers < ``sparse_below`` are the sparse one's."""
        model, _ = load_checkpoint(tiny_checkpoint("llama"))
        sparse = dict(named_weights(load_checkpoint(sparse_path)[0]))
        with torch.no_grad():
            for name, param in named_weights(model):
                if layer_of(name) is not None and layer_of(name) < sparse_below:
                    param.copy_(sparse[name])
        capture = Capture()
        capture.attach(model)
        with torch.no_grad():
            for t in tokens:
                model(t, torch.arange(t.shape[1]).expand_as(t), None)
        return capture.inputs

    for name in ("sparsegpt_24", "wanda_subset"):
        path, capture = sparse_runs[name]
        sequential = RUNS[name].get("sequential", True)
        for weight, k in _passes(RUNS[name]).items():
            layer = layer_of(weight)
            expected = layer_inputs(path, (4 if layer is None else layer) if sequential else 0)
            got = torch.cat(capture.inputs[weight][k * MICRO_BATCHES:(k + 1) * MICRO_BATCHES])
            want = torch.cat(expected[weight])
            # the same float32 forward pass of the same weights (tiny model: products <= 96 wide)
            assert (got - want).abs().max().item() <= transformer_logits(96, 4, want), (name, weight)
            if sequential and layer == 3:  # and not the dense model's: the earlier layers' sparsity counts
                dense = torch.cat(layer_inputs(path, 0)[weight])
                assert (got - dense).abs().max().item() > 100 * transformer_logits(96, 4, want)
