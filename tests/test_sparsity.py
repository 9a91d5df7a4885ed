"""Sparsity (``sparsify``) on tiny models: masks against references written out here from the
activations the calibration saw, layouts, distillation that keeps the masks, export, and
bad input."""

from __future__ import annotations

import contextlib
import functools
import json
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


# ---------------------------------------------------------------------- layouts and distillation
#: the layouts of the 2-process worker: (tp, pp, RUNS sparsified there)
LAYOUTS = {"tp2": (2, 1, ["sparsegpt_24", "wanda_subset"]), "pp2": (1, 2, ["sparsegpt_24"]),
           "dp2": (1, 1, ["sparsegpt_24"])}
DISTILL = dict(global_batch=4, micro_batch=2, seq_len=16, lr=1e-3, kd_temperature=1.0, ce_weight=0.5, logit_chunk=7)


def optimizer_states(trainer):
    """(mask, main weight, Adam's first and second moments) of every masked weight this rank's
    optimizer holds: whole weights under megatron's plain optimizer, this data-parallel rank's
    flat shard under its distributed optimizer (the mask cut to the same range)."""
    from nemo_minitron.sparsity.masks import mask_of

    opt = trainer.optimizer
    for inner in getattr(opt, "chained_optimizers", [opt]):
        if hasattr(inner, "shard_fp32_groups"):
            for params, shards in zip(inner.model_fp32_groups, inner.shard_fp32_groups):
                for param, shard in zip(params, shards):
                    if mask_of(param) is not None:
                        r = inner._get_model_param_range_map(param)["param"]
                        state = inner.optimizer.state[shard]
                        yield mask_of(param).reshape(-1)[r.start:r.end], shard, state["exp_avg"], state["exp_avg_sq"]
        else:
            for group in inner.optimizer.param_groups:
                for param in group["params"]:
                    if mask_of(param) is not None:
                        state = inner.optimizer.state[param]
                        yield mask_of(param), param, state["exp_avg"], state["exp_avg_sq"]


def distill_results(teacher: str, student: str, tp: int, pp: int) -> dict:
    """At a layout (any rank): the first step's full gradients, then two optimizer steps: the
    student's full weights and masks, and the largest optimizer state at masked and at kept
    positions."""
    from megatron.core import parallel_state as ps
    from test_distill import make_trainer

    from nemo_minitron.model.params import gather, named_weights, unwrap
    from nemo_minitron.sparsity.masks import mask_of

    trainer = make_trainer(teacher, student, tp, pp, DISTILL, steps=2)
    grads = {k: v.clone() for k, v in trainer.gradients(step=0)[1].items()}  # TP=1: views of the grad buffer
    trainer.train()
    group, gated = ps.get_tensor_model_parallel_group(), unwrap(trainer.student).config.gated_linear_unit
    weights, masks = {}, {}
    for name, param in named_weights(trainer.student):
        weights[name] = gather(name, param.detach(), group=group, gated=gated)
        if mask_of(param) is not None:
            masks[name] = gather(name, mask_of(param).to(torch.uint8), group=group, gated=gated).bool()
    masked, kept = 0.0, 0.0
    for mask, main, m, v in optimizer_states(trainer):
        for t in (main, m, v):
            masked = max(masked, t.detach()[~mask].abs().max().item() if (~mask).any() else 0.0)
        kept = max(kept, m[mask].abs().max().item() if mask.any() else 0.0)
    return {"grads": grads, "weights": weights, "masks": masks, "states": {"masked": masked, "kept": kept}}


@pytest.fixture(scope="module")
def sparse_student(tiny_checkpoint, tmp_path_factory, runtime):
    """The tiny student (llama_small) made 2:4 sparse by SparseGPT."""
    from nemo_minitron.sparsity.api import sparsify

    return sparsify(str(tiny_checkpoint("llama_small")), str(tmp_path_factory.mktemp("student") / "sparse"),
                    ["builtin:calib"], seed=SEED, progress=False, **CALIB)


def _holds_2_4(w: torch.Tensor) -> bool:
    return bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())


@pytest.mark.multirank
def test_layouts_equal_tp1(sparse_runs, sparse_student, tiny_checkpoint, tmp_path):
    """At TP=2, PP=2 and DP=2 the masks equal TP=1's and SparseGPT's updated weights too (to the
    rounding of the activations the calibration saw); distilling the sparse student there has
    TP=1's gradients, zero at every masked weight; after optimizer steps the masks are kept,
    the masked weights are zero and so are the optimizer's main weights and Adam moments
    there (megatron-core's distributed optimizer at DP=2 included)."""
    teacher, student = str(tiny_checkpoint("llama")), str(sparse_student)
    base = distill_results(teacher, student, 1, 1)
    out = tmp_path / "out"
    run_workers("sparsity_layouts.py", tiny_checkpoint("llama"), teacher, student, out, out=out)
    for layout, (tp, pp, runs) in LAYOUTS.items():
        for name in runs:
            path, capture = sparse_runs[name]
            want_w, want_m = canonical(path)
            got_w, got_m = canonical(out / f"{layout}-{name}")
            assert got_m.keys() == want_m.keys(), (layout, name)
            for weight, mask in want_m.items():
                assert torch.equal(got_m[weight], mask), (layout, name, weight)
                # SparseGPT's solution moves with its Hessian: the activations it is built from carry
                # another split's float32 rounding (a forward pass: products <= 96 wide, 4 layers),
                # amplified by at most the Hessian's condition number
                k = _passes(RUNS[name])[weight]
                x = torch.cat(capture.inputs[weight][k * MICRO_BATCHES:(k + 1) * MICRO_BATCHES])
                cond = torch.linalg.cond(x.T @ x).item() if RUNS[name]["method"] == "sparsegpt" else 0.0
                scale = want_w[weight].abs().max().item()
                tol = U32 * scale + cond * fp32(96 * 9, scale)
                assert (got_w[weight] - want_w[weight]).abs().max().item() <= tol, (layout, name, weight)
        merged = {"grads": {}, "weights": {}, "masks": {}}
        states = []
        for part in sorted(out.glob("rank*.pt")):
            saved = torch.load(part)[layout]
            for key in merged:
                merged[key].update(saved[key])
            states.append(saved["states"])
        assert merged["masks"].keys() == base["masks"].keys() == {n for n in base["weights"] if "linear" in n}
        for weight, mask in base["masks"].items():
            assert torch.equal(merged["masks"][weight], mask), (layout, weight)
            w = merged["weights"][weight]
            assert not w[~mask].any() and _holds_2_4(w), (layout, weight)
            if layout != "dp2":  # the distributed optimizer leaves each rank only its shard of the gradients
                got, ref = merged["grads"][weight], base["grads"][weight]
                assert not got[~mask].any() and not ref[~mask].any(), (layout, weight)
                # as test_distill: a sum over the step's 64 tokens of products through the layers
                assert (got - ref).abs().max().item() <= fp32(64 * 96 * 9, ref.abs().max().item()), (layout, weight)
        for s in states + [base["states"]]:
            assert s["masked"] == 0.0 and s["kept"] > 0.0, (layout, s)


def test_distillation_keeps_the_masks_through_a_resume(sparse_student, tiny_checkpoint, tmp_path, one_thread):
    """Distilling a 2:4 student keeps its masks: stopped after 2 of 4 steps and resumed, the
    training checkpoint carries the masks and the final student has the same masks, zeros
    at every masked weight (2:4 in every group of four), its other weights trained, the same
    weights as an uninterrupted run, and its sparsity record."""
    from torch.distributed.checkpoint import FileSystemReader

    from nemo_minitron.distill.api import distill

    settings = dict(steps=4, global_batch=4, micro_batch=2, seq_len=16, lr=1e-2, eval_samples=2, data_workers=0,
                    kd_temperature=1.0, ce_weight=0.5, seed=SEED, progress=False)
    teacher, student = str(tiny_checkpoint("llama")), str(sparse_student)
    straight = distill(teacher, student, ["builtin:train"], str(tmp_path / "straight"), **settings)
    paused = distill(teacher, student, ["builtin:train"], str(tmp_path / "resumed"), stop_at=2, **settings)
    assert straight.status == "finished" and paused.status == "paused" and paused.step == 2
    saved = FileSystemReader(str(tmp_path / "resumed" / "checkpoints" / "step_0000002" / "weights")).read_metadata()
    student_w, student_m = canonical(student)
    assert {k for k in saved.state_dict_metadata if k.startswith("sparsity_mask.")} == {
        f"sparsity_mask.{n}" + part for n in student_m for part in ((".gate", ".up") if "fc1" in n else ("",))}
    resumed = distill(teacher, student, ["builtin:train"], str(tmp_path / "resumed"), **settings)
    assert resumed.status == "finished"
    final_w, final_m = canonical(tmp_path / "resumed" / "final")
    straight_w, _ = canonical(tmp_path / "straight" / "final")
    assert final_m.keys() == student_m.keys() and len(final_m) == 12
    for name, mask in student_m.items():
        w = final_w[name]
        assert torch.equal(final_m[name], mask) and not w[~mask].any() and _holds_2_4(w), name
        assert (w[mask] != student_w[name][mask]).float().mean() > 0.9, name  # trained
    for name, w in final_w.items():  # the same float32 operations on restored state
        assert ((w - straight_w[name]).abs() <= 4 * U32 * straight_w[name].abs()).all(), name
    provenance = json.loads((tmp_path / "resumed" / "final" / "nemo_minitron.json").read_text())["provenance"]
    assert provenance["sparsity"]["pattern"] == "2:4" and provenance["distillation"]["steps"] == 4


def test_export_holds_the_zeros_and_the_masks_and_gives_our_logits(sparse_runs, tmp_path):
    """A 2:4 model exports to Hugging Face with its zeros in the weights (2:4 along every
    matrix's input), its masks by HF name in their own safetensors file and its record in
    sparsity.json; transformers' logits equal ours."""
    from safetensors.torch import load_file

    from nemo_minitron.checkpoint.api import export, open_model
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.model.forward import full_logits

    path = sparse_runs["sparsegpt_24"][0]
    hf_dir = export(str(path), str(tmp_path / "hf"))
    weights = {k: v for f in sorted(hf_dir.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    record = json.loads((hf_dir / "sparsity.json").read_text())
    masks = {k: v for f in sorted(set(record["masks"].values())) for k, v in load_file(hf_dir / f).items()}
    assert record["pattern"] == "2:4" and record["method"] == "sparsegpt" and len(masks) == 4 * 7
    for name, mask in masks.items():
        w = weights[name]
        assert mask.dtype == torch.bool and mask.shape == w.shape and not w[~mask].any(), name
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all() and _holds_2_4(w), name
    _, ours = canonical(path)
    for i in range(4):  # the HF masks are ours, split as HF splits the fused weights
        hf = lambda s: masks[f"model.layers.{i}.{s}.weight"]  # noqa: E731
        q, k, v = hf("self_attn.q_proj"), hf("self_attn.k_proj"), hf("self_attn.v_proj")
        groups = [torch.cat([q[32 * g:32 * (g + 1)], k[16 * g:16 * (g + 1)], v[16 * g:16 * (g + 1)]]) for g in range(2)]
        assert torch.equal(torch.cat(groups), ours[f"decoder.layers.{i}.{SUFFIX['qkv']}"])  # 2 groups of 2 heads
        assert torch.equal(hf("self_attn.o_proj"), ours[f"decoder.layers.{i}.{SUFFIX['proj']}"])
        assert torch.equal(torch.cat([hf("mlp.gate_proj"), hf("mlp.up_proj")]), ours[f"decoder.layers.{i}.{SUFFIX['fc1']}"])
        assert torch.equal(hf("mlp.down_proj"), ours[f"decoder.layers.{i}.{SUFFIX['fc2']}"])
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    want = full_logits(open_model(str(path)).model, tokens, 1000)
    with torch.no_grad():
        got = load_hf_model(hf_dir)(tokens).logits.float()
    assert (got - want).abs().max().item() <= transformer_logits(96, 4, want)


@pytest.mark.parametrize("kind, flags, words", [
    ("llama", ["--pattern", "2-4"], "--pattern must be N:M (e.g. 2:4) or unstructured:RATIO"),
    ("llama", ["--pattern", "unstructured:1.5"], "the ratio must be in (0, 1)"),
    ("llama", ["--pattern", "unstructured:0"], "the ratio must be in (0, 1)"),
    ("llama", ["--pattern", "4:2"], "N:M needs 0 < N < M"),
    ("llama_ffn76", ["--tp", "2"], "fc2 has 38 input columns per tensor-parallel rank at tensor parallel size 2 "
                                   "(76 in all), not a multiple of 4"),
    ("mixtral", [], "--modules: sparsify handles dense MLPs; this mixtral model has mixture-of-experts layers"),
    ("nemotron_h", [], "sparsify of a hybrid Mamba-Transformer model (nemotron_h) is not supported yet"),
    ("llama", ["--modules", "qkv,attn"], "--modules: 'attn' is not a sparsifiable module (allowed: qkv, proj, fc1"),
    ("llama", ["--layers", "2-4"], "--layers: the model has layers 0-3 (got 4)"),
    ("llama_tied", ["--modules", "output"], "--modules output: this model ties its output layer to the embedding"),
    ("llama", ["--block-size", "6"], "--block-size 6 must be a multiple of 4 for --pattern 2:4"),
    ("llama", ["--method", "wanda", "--no-data"], "--data is required by --method wanda"),
    ("sparse", [], "is already sparse (2:4 by sparsegpt); sparsify the dense model it came from"),
])
def test_bad_input(tiny_checkpoint, sparse_runs, tmp_path, capsys, kind, flags, words):
    """Bad input: one line naming the flag, exit status 2, before any work (nothing written)."""
    ckpt = sparse_runs["sparsegpt_24"][0] if kind == "sparse" else tiny_checkpoint(kind)
    data = [] if "--no-data" in flags else ["--data", "builtin:calib"]
    code, err = cli_in_process(capsys, "sparsify", ckpt, "--out", tmp_path / "out", *data,
                               *[f for f in flags if f != "--no-data"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not (tmp_path / "out").exists()
