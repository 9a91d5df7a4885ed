"""Importance scores against a reference computed from explicitly captured activations of
the Hugging Face implementation of the same weights."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from conftest import cli_in_process, run_workers
from tiny_models import MOE_KINDS
from tolerances import fp32, log_softmax_sum

SEQ, SAMPLES, LAYER_SAMPLES, SEED = 24, 6, 3, 11


def _samples(checkpoint):
    from nemo_minitron.checkpoint.store import load_tokenizer, read_info
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.importance.api import calibration_samples

    tokenizer = load_tokenizer(checkpoint)
    corpus = check_corpus(["builtin:calib"], vocab_size=read_info(checkpoint).description.vocab_size)
    return calibration_samples(corpus, tokenizer, seq_len=SEQ, samples=SAMPLES, seed=SEED)


def _capture(hf_model, tokens):
    """Every activation importance is defined on, captured with plain hooks on the HF model."""
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name, kind):
        def hook(module, args, output):
            seen.setdefault(name, []).append((args[0] if kind == "in" else output).detach().double())
        return hook

    handles = []
    for i, layer in enumerate(hf_model.model.layers):
        if not hasattr(layer.mlp, "experts"):  # a dense MLP (experts: _moe_reference)
            first = getattr(layer.mlp, "gate_proj", None) or layer.mlp.up_proj  # X.W1: the gate, or up without one
            handles += [layer.mlp.down_proj.register_forward_hook(keep(f"{i}.ffn_post", "in")),
                        first.register_forward_hook(keep(f"{i}.ffn_pre", "out"))]
        handles += [layer.self_attn.o_proj.register_forward_hook(keep(f"{i}.attn_out", "in")),
                    layer.input_layernorm.register_forward_hook(keep(f"{i}.norm1", "out")),
                    layer.post_attention_layernorm.register_forward_hook(keep(f"{i}.norm2", "out")),
                    layer.register_forward_hook(keep(f"{i}.layer_in", "in")),
                    layer.register_forward_hook(lambda m, a, o, i=i: seen.setdefault(f"{i}.layer_out", []).append(
                        (o[0] if isinstance(o, tuple) else o).detach().double()))]
    handles.append(hf_model.model.norm.register_forward_hook(keep("final_norm", "out")))
    with torch.no_grad():
        hf_model(tokens)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}  # each [b, s, ...]


def _aggregate(x: torch.Tensor, seq: str, batch: str) -> torch.Tensor:
    """The definitions, written out directly: x [b, s, units] -> [units]."""
    per_sample = {"mean": lambda t: t.abs().mean(1), "l2": lambda t: t.pow(2).sum(1).sqrt(),
                  "var": lambda t: ((t - t.mean(1, keepdim=True)) ** 2).mean(1)}[seq](x)
    return {"mean": lambda v: v.mean(0), "l2": lambda v: v.pow(2).sum(0).sqrt(),
            "var": lambda v: ((v - v.mean(0)) ** 2).mean(0)}[batch](per_sample)


def _reference(acts, desc, seq, batch, neuron_activation="post", head_score="channel", channel_norms="layers"):
    L, d = desc.num_layers, desc.head_dim
    if head_score == "token":  # each token's head norm, then aggregated
        heads = torch.stack([_aggregate(acts[f"{i}.attn_out"].unflatten(-1, (-1, d)).norm(dim=-1), seq, batch)
                             for i in range(L)])
    else:  # each channel aggregated, then the norm over the head's channels
        heads = torch.stack([_aggregate(acts[f"{i}.attn_out"], seq, batch).unflatten(-1, (-1, d)).norm(dim=-1)
                             for i in range(L)])
    final = _aggregate(acts["final_norm"], seq, batch)
    ffn = torch.stack([_aggregate(acts[f"{i}.ffn_{neuron_activation}"], seq, batch) for i in range(L)]) \
        if f"0.ffn_{neuron_activation}" in acts else None
    per_layer = torch.stack([_aggregate(acts[f"{i}.norm1"], seq, batch) + _aggregate(acts[f"{i}.norm2"], seq, batch)
                             for i in range(L)])
    cos = [torch.nn.functional.cosine_similarity(acts[f"{i}.layer_in"], acts[f"{i}.layer_out"], dim=-1).mean()
           for i in range(L)]
    return {"heads": heads, "query_groups": heads.unflatten(1, (desc.num_query_groups, -1)).sum(-1), "ffn": ffn,
            "hidden_per_layer": per_layer, "final_norm": final,
            "hidden": per_layer.sum(0) + (final if channel_norms == "layers+final" else 0),
            "layer_block_importance": 1 - torch.stack(cos)}


def _close(ours: torch.Tensor, ref: torch.Tensor, rtol: float) -> bool:
    if ref.numel() == 0:  # an axis the model lacks (a mixture of experts' dense ffn: [layers, 0])
        return ours.shape == ref.shape
    scale = ref.abs().max().item()
    return (ours.double() - ref.double()).abs().max().item() <= rtol * max(scale, 1e-12)


# Scores come from float32 megatron activations, the references from float64 HF ones: every
# activation carries a forward pass's relative rounding (tolerances.transformer_logits: the
# widest inner dimension 96 over 4 layers); the aggregations then run in float64.
SCORE_RTOL = fp32(96 * (2 * 4 + 1), 1.0)
# Loss differences: log-softmax sums over the 1000-token vocabulary of logits below 1.
LOSS_TOL = log_softmax_sum(1000, 1.0)


@pytest.fixture(scope="module")
def tiny(tiny_hf, tiny_checkpoint):
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.checkpoint.verify import load_hf_model

    ckpt = tiny_checkpoint("llama")
    samples = _samples(ckpt)
    hf = load_hf_model(tiny_hf("llama"))
    return {"checkpoint": ckpt, "samples": samples, "desc": read_info(ckpt).description,
            "acts": _capture(hf, samples[:, :-1]), "hf": hf}


# every aggregation pair, each with one of the four head-score x channel-norm variants (in turn)
_CASES = [(seq, batch, *variant) for (seq, batch), variant in zip(
    itertools.product(("mean", "l2", "var"), repeat=2),
    itertools.cycle(itertools.product(("token", "channel"), ("layers+final", "layers"))))]


@pytest.mark.parametrize("seq, batch, head_score, channel_norms", _CASES)
def test_scores_equal_reference_for_every_variant(tiny, tmp_path, seq, batch, head_score, channel_norms):
    from nemo_minitron.importance.api import compute_importance

    scores = compute_importance(str(tiny["checkpoint"]), ["builtin:calib"], str(tmp_path / "imp"), samples=SAMPLES,
                                seq_len=SEQ, micro_batch=4, batch_agg=batch, seq_agg=seq, head_score=head_score,
                                channel_norms=channel_norms, layer_samples=LAYER_SAMPLES, seed=SEED, progress=False)
    reference = _reference(tiny["acts"], tiny["desc"], seq, batch, head_score=head_score, channel_norms=channel_norms)
    for axis, ref in reference.items():
        assert _close(scores[axis], ref, SCORE_RTOL), (axis, seq, batch, head_score, channel_norms)
    assert scores.summary["config"]["head_score"] == head_score


def test_second_moments_equal_gram_matrices_of_captured_activations(tiny):
    """The Gram matrices the least-squares refit solves with: sum over tokens of x x^T at
    the inputs of each layer's output projection and second MLP linear."""
    from nemo_minitron.checkpoint.store import load_checkpoint
    from nemo_minitron.importance.api import calibration_pass
    from nemo_minitron.runtime.distributed import init_distributed

    init_distributed(1, 1, SEED)
    model, _ = load_checkpoint(tiny["checkpoint"])
    desc = tiny["desc"]
    got = calibration_pass(model, tiny["samples"], micro_batch=4, seq_agg="mean", batch_agg="l2",
                           neuron_activation="post", num_layers=desc.num_layers, second_moments=True, progress=False)
    for key, act in (("proj_gram", "attn_out"), ("fc2_gram", "ffn_post")):
        for i in range(desc.num_layers):
            x = tiny["acts"][f"{i}.{act}"].flatten(0, 1)  # [tokens, n] float64
            ref = x.T @ x
            # the activations agree to ~1e-5 relative (HF vs megatron, fp32); each entry sums
            # N = SAMPLES * SEQ float32 products: N * 2^-24 relative to the largest diagonal entry
            tol = (2e-5 + x.shape[0] * 2.0 ** -24) * ref.diagonal().max().item()
            assert (got[key][i] - ref).abs().max().item() <= tol, (key, i)


def test_second_moments_auto_collects_them_where_they_fit(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    """importance's default (auto) stores the Gram matrices of a dense model whose matrices
    take at most the cap (float64 on a rank: what the stored matrices hold, 8 bytes an entry)
    and none beyond it, saying why; --second-moments / --no-second-moments decide alone."""
    from safetensors import safe_open

    from nemo_minitron.importance import api

    ckpt = tiny_checkpoint("llama")
    tiny = dict(samples=2, seq_len=16, layer_samples=1, seed=SEED, dtype="float32", progress=False)
    api.compute_importance(str(ckpt), ["builtin:calib"], str(tmp_path / "auto"), **tiny)
    with safe_open(str(tmp_path / "auto" / "second_moments.safetensors"), "pt") as f:
        collected = 8 * sum(f.get_tensor(k).numel() for k in f.keys())
    for name, cap, asked, stored in (("at-cap", collected, None, True), ("over-cap", collected - 1, None, False),
                                     ("asked", collected - 1, True, True), ("refused", collected, False, False)):
        monkeypatch.setattr(api, "SECOND_MOMENTS_AUTO_BYTES", cap)
        caplog.clear()
        api.compute_importance(str(ckpt), ["builtin:calib"], str(tmp_path / name), second_moments=asked, **tiny)
        assert (tmp_path / name / "second_moments.safetensors").is_file() == stored, name
        said = [r.getMessage() for r in caplog.records if "--second-moments auto" in r.getMessage()]
        assert len(said) == (asked is None), (name, said)
        if name == "over-cap":
            assert "auto: off" in said[0] and "GiB on each rank, over the" in said[0], said


def test_refit_equals_least_squares_solution():
    """refit_columns against torch.linalg.lstsq on explicit inputs: the kept columns that
    best reproduce the layer's output when the removed inputs are gone."""
    from nemo_minitron.prune.refit import refit_columns

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(10, 10, generator=g, dtype=torch.float64)
    x = torch.randn(400, 10, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 5, 7, 8, 9])
    ref = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T
    got = refit_columns(w, x.T @ x, kept, damping=0.0)
    assert torch.allclose(got, ref, rtol=1e-8, atol=1e-8)  # float64 solves of a 7x7 system with cond < 1e4
    residual = lambda v: (x @ w.T - x[:, kept] @ v.T).square().sum()  # noqa: E731
    assert residual(got) < residual(w[:, kept])  # better than dropping the columns
    assert torch.equal(refit_columns(w, x.T @ x, torch.arange(10)), w)  # nothing removed: unchanged


def test_pre_activation_neurons_and_written_directory(tiny, tmp_path):
    from nemo_minitron.importance.api import compute_importance
    from nemo_minitron.importance.scores import ImportanceScores

    out = tmp_path / "imp"
    compute_importance(str(tiny["checkpoint"]), ["builtin:calib"], str(out), samples=SAMPLES, seq_len=SEQ,
                       neuron_activation="pre", layer_samples=LAYER_SAMPLES, drop_blocks=[2], seed=SEED,
                       progress=False)
    loaded = ImportanceScores.load(out)
    assert _close(loaded["ffn"], _reference(tiny["acts"], tiny["desc"], "mean", "l2", "pre")["ffn"], SCORE_RTOL)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == SAMPLES * SEQ and summary["config"]["neuron_activation"] == "pre"
    assert set(summary["plots"]) <= {p.name for p in out.glob("*.png")} and len(summary["plots"]) == 4
    loaded.check_matches(tiny["desc"])


def test_loss_drop_equals_eval_without_the_layer(tiny, tmp_path):
    """Reference: the HF model with the layer deleted, cross-entropy on the same samples."""
    import copy

    from nemo_minitron.importance.api import compute_importance

    scores = compute_importance(str(tiny["checkpoint"]), ["builtin:calib"], str(tmp_path / "imp"), samples=SAMPLES,
                                seq_len=SEQ, layer_samples=LAYER_SAMPLES, drop_blocks=[2], seed=SEED, progress=False)
    samples = tiny["samples"][:LAYER_SAMPLES]

    def hf_loss(model):
        with torch.no_grad():
            logits = model(samples[:, :-1]).logits.double()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), samples[:, 1:].flatten()).item()

    full = hf_loss(tiny["hf"])
    assert abs(scores.summary["full_loss"] - full) < LOSS_TOL
    for i in range(tiny["desc"].num_layers):
        without = copy.deepcopy(tiny["hf"])
        del without.model.layers[i]
        assert abs(scores["layer_loss_drop"][i].item() - (hf_loss(without) - full)) < 2 * LOSS_TOL, i
    block = scores.summary["layers"]["contiguous_blocks"]["2"]
    candidates = []
    for start in range(tiny["desc"].num_layers - 1):
        without = copy.deepcopy(tiny["hf"])
        del without.model.layers[start:start + 2]
        candidates.append(hf_loss(without))
    best = min(range(len(candidates)), key=candidates.__getitem__)
    assert block["start"] == best and block["layers"] == [best, best + 1]
    assert abs(block["loss_increase"] - (min(candidates) - full)) < 2 * LOSS_TOL
    # the two other drop sets of 2 layers, and which of the three costs least
    sets = scores.summary["layers"]["drop_sets"]["2"]
    losses = {"contiguous": min(candidates)}
    assert abs(sets["contiguous"]["loss"] - losses["contiguous"]) < 2 * LOSS_TOL
    for metric, axis in (("loss", "layer_loss_drop"), ("block", "layer_block_importance")):
        expected = sorted(torch.argsort(scores[axis], stable=True)[:2].tolist())
        assert sets[metric]["layers"] == expected, metric
        without = copy.deepcopy(tiny["hf"])
        for i in sorted(expected, reverse=True):
            del without.model.layers[i]
        losses[metric] = hf_loss(without)
        assert abs(sets[metric]["loss"] - losses[metric]) < 2 * LOSS_TOL, metric
    # greedy elimination: the reference deletes, at each step, the layer whose deletion (with
    # the earlier ones deleted) leaves the lowest loss
    greedy, gone = scores.summary["layers"]["greedy"], []
    for step in range(2):
        ref = {}
        for j in (j for j in range(tiny["desc"].num_layers) if j not in gone):
            without = copy.deepcopy(tiny["hf"])
            for i in sorted(gone + [j], reverse=True):
                del without.model.layers[i]
            ref[j] = hf_loss(without)
            assert abs(greedy["candidates"][step][j] - ref[j]) < 2 * LOSS_TOL, (step, j)
        gone.append(min(ref, key=ref.__getitem__))
        assert greedy["order"][step] == gone[-1] and abs(greedy["loss"][step] - ref[gone[-1]]) < 2 * LOSS_TOL
        assert all(greedy["candidates"][step][i] is None for i in gone[:-1])
    losses["greedy"] = greedy["loss"][1]
    assert sets["greedy"]["layers"] == sorted(gone) and abs(sets["greedy"]["loss"] - losses["greedy"]) < 2 * LOSS_TOL
    # the cheapest set (sets that coincide, e.g. greedy and loss, tie exactly)
    assert abs(losses[sets["best"]] - min(losses.values())) < 2 * LOSS_TOL


@pytest.mark.parametrize("budget", [None, 1])
def test_skip_losses_start_at_recorded_inputs(tiny, monkeypatch, budget):
    """SkipLosses starts a pass at the recorded input of the last recorded layer at or before
    the first skipped one: the loss equals a pass from the embedding (loss_without) bit for
    bit, as the layers before compute the same arithmetic on the same inputs, and fewer
    attention layers run. ``budget`` 1 byte: only every 4th layer's input is recorded (none
    of the 4 layers here after layer 0), so every pass starts at the embedding."""
    from nemo_minitron.checkpoint.store import load_checkpoint
    from nemo_minitron.importance import layers
    from nemo_minitron.importance.layers import SkipLosses, loss_without
    from nemo_minitron.model.params import unwrap
    from nemo_minitron.runtime.distributed import init_distributed

    if budget is not None:
        monkeypatch.setattr(layers, "RECORDED_INPUT_BYTES", budget)
    init_distributed(1, 1, SEED)
    model, info = load_checkpoint(str(tiny["checkpoint"]), dtype=torch.float32)
    vocab, samples = info.description.vocab_size, tiny["samples"][:LAYER_SAMPLES]
    runs = [0]
    for layer in unwrap(model).decoder.layers:
        layer.self_attention.register_forward_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    sets = [[2], [1, 3], [3], [0], [2, 3], []]
    losses = SkipLosses(model, vocab, samples, micro_batch=2)
    got = [losses(s) for s in sets]
    attention_runs, runs[0] = runs[0], 0
    want = [loss_without(model, vocab, samples, s, micro_batch=2) for s in sets]
    assert got == want
    micro_batches, num_layers = -(-LAYER_SAMPLES // 2), info.description.num_layers
    # from the embedding: every layer not skipped runs, once per micro-batch (the first set's
    # pass also records: the full model's, whose loss the last set takes without a pass)
    from_start = micro_batches * (num_layers + sum(num_layers - len(s) for s in sets[:-1]))
    assert runs[0] == micro_batches * sum(num_layers - len(s) for s in sets)
    # from the recorded inputs: the layers from the first skipped one on, less the skipped
    from_recorded = micro_batches * (num_layers + sum(num_layers - s[0] - len(s) for s in sets[:-1]))
    assert attention_runs == (from_start if budget else from_recorded)


@pytest.mark.parametrize("kind", ["qwen3", "nemotron"])
def test_new_families_scores_equal_reference(kind, tiny_hf, tiny_checkpoint):
    """Qwen3 (QK-norm: heads are scored after it) and Nemotron (squared-ReLU neurons without a
    gate, LayerNorm1P outputs with their biases for the channels): every axis the calibration
    pass scores equals the reference from the HF model's own activations, for the post- and
    pre-activation neurons. (compute_importance adds query groups and depth to this pass,
    the same for every family: tested on Llama above.)"""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.importance.api import calibration_pass

    ckpt = tiny_checkpoint(kind)
    samples = _samples(ckpt)
    acts = _capture(load_hf_model(tiny_hf(kind)), samples[:, :-1])
    opened = open_model(str(ckpt))
    desc = opened.description
    for neurons, (seq, batch) in (("post", ("mean", "l2")), ("pre", ("l2", "mean"))):
        scores = calibration_pass(opened.model, samples, micro_batch=4, seq_agg=seq, batch_agg=batch,
                                  neuron_activation=neurons, num_layers=desc.num_layers, progress=False)
        reference = _reference(acts, desc, seq, batch, neurons)
        reference.pop("query_groups")
        # float32 activations through a few layers, summed over <= 100 terms per score: relative
        # error ~1e-6; 1e-5 of the largest score leaves a margin
        for axis, ref in reference.items():
            assert _close(scores[axis], ref, 1e-5), (kind, neurons, axis)


def _moe_reference(hf_model, tokens, acts, seq, batch, neurons):
    """Expert axes by definition, in float64 from the HF model's own routing (its router's
    top-k weights and indices, captured) and its expert weights: each expert's output on
    the tokens routed to it, times the token's routing weight; zero for the other tokens."""
    routing, shared = {}, {}
    handles = []
    for i, layer in enumerate(hf_model.model.layers):
        handles.append(layer.mlp.gate.register_forward_hook(
            lambda m, a, o, i=i: routing.setdefault(i, []).append((o[1].detach().double(), o[2].detach()))))
        if hasattr(layer.mlp, "shared_expert"):
            down, gate = layer.mlp.shared_expert.down_proj, layer.mlp.shared_expert.gate_proj
            handles += [down.register_forward_hook(lambda m, a, o, i=i: shared.__setitem__((i, "post"), a[0])),
                        gate.register_forward_hook(lambda m, a, o, i=i: shared.__setitem__((i, "pre"), o))]
    with torch.no_grad():
        hf_model(tokens)
    for h in handles:
        h.remove()
    b, s = tokens.shape
    out = {"experts": [], "moe_ffn": [], "shared_ffn": []}
    for i, layer in enumerate(hf_model.model.layers):
        x = acts[f"{i}.norm2"].reshape(b * s, -1)                          # the MoE block's input
        weights, chosen = routing[i][0]                                     # [tokens, top-k]
        gate_up, down = layer.mlp.experts.gate_up_proj.double(), layer.mlp.experts.down_proj.double()
        experts, ffn = [], []
        for e in range(gate_up.shape[0]):
            p = (weights * (chosen == e)).sum(-1, keepdim=True)              # 0 when not routed to e
            gate, up = (x @ gate_up[e].T).chunk(2, dim=-1)
            act = p * torch.nn.functional.silu(gate) * up                   # the input of the second linear
            experts.append(_aggregate((act @ down[e].T).norm(dim=-1).reshape(b, s, 1), seq, batch)[0])
            ffn.append(_aggregate((act if neurons == "post" else gate * (p > 0)).reshape(b, s, -1), seq, batch))
        out["experts"].append(torch.stack(experts))
        out["moe_ffn"].append(torch.stack(ffn))
        if shared:
            out["shared_ffn"].append(_aggregate(shared[(i, neurons)].double().reshape(b, s, -1), seq, batch))
    return {k: torch.stack(v) for k, v in out.items() if v}


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_expert_scores_equal_reference(kind, tiny_hf, tiny_checkpoint):
    """Mixtures of experts: experts (routing weight x norm of the expert's output), each
    expert's neurons (post: the routing-weighted input of its second linear; pre: its gate
    pre-activation on the tokens routed to it), the shared expert's neurons, and the channels
    and heads as in dense models, equal the HF model's activations aggregated by definition.
    Mixtral and Qwen3-MoE renormalise the top-k weights; Qwen2-MoE does not and has a shared
    expert."""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.importance.api import calibration_pass

    ckpt = tiny_checkpoint(kind)
    samples = _samples(ckpt)
    hf = load_hf_model(tiny_hf(kind))
    tokens = samples[:, :-1]
    acts = _capture(hf, tokens)
    opened = open_model(str(ckpt))
    desc = opened.description
    for neurons, (seq, batch) in (("post", ("mean", "l2")), ("pre", ("var", "mean"))):
        scores = calibration_pass(opened.model, samples, micro_batch=4, seq_agg=seq, batch_agg=batch,
                                  neuron_activation=neurons, num_layers=desc.num_layers, progress=False)
        reference = {**_reference(acts, desc, seq, batch), **_moe_reference(hf, tokens, acts, seq, batch, neurons)}
        for axis in ("ffn", "query_groups"):  # no dense MLP; groups are summed heads (tested above)
            reference.pop(axis)
        assert scores["ffn"].shape == (desc.num_layers, 0)
        assert set(reference) <= set(scores), set(reference) - set(scores)
        # float32 activations of 3 layers at most 64 wide, against float64: a forward pass's rounding
        for axis, ref in reference.items():
            assert scores[axis].shape == ref.shape, axis
            assert _close(scores[axis], ref, fp32(64 * (2 * 3 + 1), 1.0)), (kind, neurons, axis)


LAYOUTS = {"tp2": [2, 1], "pp2": [1, 2], "dp2": [1, 1]}


@pytest.fixture(scope="module")
def layout_scores(tiny, tiny_checkpoint, tmp_path_factory):
    """Importance of Llama and of a mixture of experts with a shared expert, at TP=1 in
    process and at TP=2, PP=2 and DP=2 in one 2-process run: (TP=1 scores, directory)."""
    from nemo_minitron.importance.api import compute_importance

    root = tmp_path_factory.mktemp("importance_layouts")
    models = {"llama": str(tiny["checkpoint"]), "qwen2_moe": str(tiny_checkpoint("qwen2_moe"))}
    base = {kind: compute_importance(ckpt, ["builtin:calib"], str(root / f"tp1-{kind}"), progress=False,
                                     micro_batch=2, samples=SAMPLES, seq_len=SEQ, layer_samples=LAYER_SAMPLES,
                                     drop_blocks=[2], seed=SEED) for kind, ckpt in models.items()}
    out = root / "out"
    (root / "spec.json").write_text(json.dumps({"out": str(out), "layouts": LAYOUTS, "models": models}))
    run_workers("importance_layouts.py", root / "spec.json", out=out)
    return base, out


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layouts_equal_tp1(layout_scores, layout):
    """TP=2, PP=2 and DP=2 (2 CPU processes) give the TP=1 scores on the same samples, for
    Llama and for a mixture of experts with a shared expert (at TP=2 every rank holds
    every expert's half, and the all-gather dispatcher hands it both ranks' copies of the
    tokens; at DP=2 the dense-MLP statistics no rank feeds are skipped collectively)."""
    from nemo_minitron.importance.scores import ImportanceScores

    base, out = layout_scores
    for kind in base:
        other = ImportanceScores.load(out / f"{layout}-{kind}")
        assert other.tensors.keys() == base[kind].tensors.keys()
        for axis, ref in base[kind].tensors.items():
            # another split of the same float32 forward (row-parallel sums, stages), and DP's
            # per-rank float64 sums added in another order
            if axis == "layer_loss_drop":  # differences of two losses, each a log-softmax sum
                assert (other[axis] - ref).abs().max().item() <= 2 * LOSS_TOL, (kind, axis)
            else:
                assert _close(other[axis], ref, 2 * SCORE_RTOL), (kind, axis)
        assert other.summary["layers"]["contiguous_blocks"]["2"]["start"] == \
            base[kind].summary["layers"]["contiguous_blocks"]["2"]["start"]


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_summary_plots_and_layer_ranking(smollm2_importance):
    """First and last layers of the trained decoder rank among the most important by loss drop."""
    out, scores = smollm2_importance
    ranked = scores.summary["layers"]["ranked_by_loss_drop"]
    assert 0 in ranked[:5] and 29 in ranked[:5], ranked
    assert (out / "summary.json").is_file() and len(list(out.glob("*.png"))) == 4
    assert scores["heads"].shape == (30, 9) and scores["ffn"].shape == (30, 1536) and scores["hidden"].shape == (576,)


@pytest.mark.parametrize("flags, words", [
    (["--samples", "100000"], ["--samples 100000 is more than the data holds"]),
    (["--batch-agg", "median"], ["--batch-agg", "mean, l2, var"]),
    (["--seq-agg", "max"], ["--seq-agg", "mean, l2, var"]),
    (["--head-score", "mean"], ["--head-score", "token, channel"]),
    (["--channel-norms", "final"], ["--channel-norms", "layers, layers+final"]),
])
def test_bad_input(tiny, tmp_path, capsys, flags, words):
    out = tmp_path / "imp"
    code, stderr = cli_in_process(capsys, "importance", tiny["checkpoint"], "--data", "builtin:calib", "--out", out,
                                  "--seq-len", "32", *flags)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert all(w in stderr for w in words), stderr
    assert not out.exists()


def test_bad_input_short_data_and_existing_output(tiny, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    out = tmp_path / "imp"
    code, stderr = cli_in_process(capsys, "importance", tiny["checkpoint"], "--data", short, "--out", out,
                                  "--seq-len", "64")
    assert code == 2 and "shorter than one sample" in stderr and not out.exists()
    out.mkdir()
    code, stderr = cli_in_process(capsys, "importance", tiny["checkpoint"], "--data", "builtin:calib", "--out", out)
    assert code == 2 and "already exists" in stderr and not list(out.iterdir())


def test_prune_refit_reaches_the_least_squares_optimum(tiny, tmp_path):
    """prune --refit on scores with second moments: each kept layer's second MLP linear and
    output projection reproduce the original layer's output on the calibration activations
    (captured from the HF model) as well as the ridge least-squares reference computed here
    with an independent solver (QR on the augmented system), and better than plain cutting."""
    from nemo_minitron.checkpoint.store import load_checkpoint, read_info
    from nemo_minitron.importance.api import compute_importance
    from nemo_minitron.model.params import named_weights
    from nemo_minitron.prune.api import prune
    from nemo_minitron.prune.refit import DEFAULT_DAMPING
    from nemo_minitron.prune.select import mask_to_indices

    imp = tmp_path / "imp"
    compute_importance(str(tiny["checkpoint"]), ["builtin:calib"], str(imp), samples=SAMPLES, seq_len=SEQ,
                       second_moments=True, layer_samples=LAYER_SAMPLES, seed=SEED, progress=False)
    out = prune(str(tiny["checkpoint"]), str(imp), str(tmp_path / "pruned"), target={"ffn": 64, "heads": 2},
                refit=True)
    kept = read_info(out).provenance["kept"]
    model, _ = load_checkpoint(out)
    weights = {k: v.detach().double() for k, v in named_weights(model)}
    d = tiny["desc"].head_dim
    for i, hf_layer in enumerate(tiny["hf"].model.layers):
        cases = (("ffn_post", hf_layer.mlp.down_proj.weight, torch.tensor(mask_to_indices(kept["ffn_mask"][str(i)])),
                  f"decoder.layers.{i}.mlp.linear_fc2.weight"),
                 ("attn_out", hf_layer.self_attn.o_proj.weight,
                  torch.cat([torch.arange(h * d, (h + 1) * d) for h in kept["heads"][str(i)]]),
                  f"decoder.layers.{i}.self_attention.linear_proj.weight"))
        for act, w, cols, name in cases:
            x, w = tiny["acts"][f"{i}.{act}"].flatten(0, 1), w.detach().double()
            removed = torch.tensor([c for c in range(x.shape[1]) if c not in set(cols.tolist())])
            xk, xr = x[:, cols], x[:, removed]
            ridge = DEFAULT_DAMPING * (xk * xk).sum(0).mean()
            bt = torch.linalg.lstsq(torch.cat([xk, ridge.sqrt() * torch.eye(len(cols), dtype=x.dtype)]),
                                    torch.cat([xr, torch.zeros(len(cols), len(removed), dtype=x.dtype)])).solution
            reference = w[:, cols] + w[:, removed] @ bt.T
            error = lambda v: (x @ w.T - xk @ v.T).square().sum().item()  # noqa: E731
            # both are minimisers of the same quadratic on activations that agree to ~1e-5
            # (HF vs megatron, fp32): their errors differ at second order, far below 1e-3
            assert error(weights[name]) <= error(reference) * (1 + 1e-3) + 1e-12, (name, error(weights[name]))
            assert error(weights[name]) < 0.9 * error(w[:, cols]), name


# ---------------------------------------------------------------------- plots
def _tick_labels(ax) -> list[tuple[float, str]]:
    """(position, label) of the y axis's labelled ticks in view, major and minor."""
    ax.figure.canvas.draw()  # labels are set when the figure is drawn
    lo, hi = ax.get_ylim()
    ticks = ax.yaxis.get_major_ticks() + ax.yaxis.get_minor_ticks()
    return [(t.get_loc(), t.label1.get_text()) for t in ticks
            if t.label1.get_text() and lo <= t.get_loc() <= hi]


def _visible_ticks(ax, axis: str) -> list[float]:
    ticks = ax.get_yticks() if axis == "y" else ax.get_xticks()
    lo, hi = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
    return [t for t in ticks if lo <= t <= hi]


def test_heatmap_and_layer_ticks_are_whole_units():
    """Head and layer plots of a 2-layer model: every tick is at a cell's centre (an
    integer), never between cells (-0.5, 0.5)."""
    from nemo_minitron.importance.plots import heatmap_figure, layers_figure

    heat = heatmap_figure(torch.rand(2, 4), "heads", "head")
    ax = heat.axes[0]
    ax.figure.canvas.draw()
    for axis in ("x", "y"):
        ticks = _visible_ticks(ax, axis)
        assert ticks and all(float(t).is_integer() for t in ticks), (axis, ticks)
    assert set(_visible_ticks(ax, "y")) <= {0.0, 1.0}
    layers = layers_figure(torch.rand(3), torch.rand(3), {})
    bottom = layers.axes[1]
    bottom.figure.canvas.draw()
    assert all(float(t).is_integer() for t in _visible_ticks(bottom, "x")), _visible_ticks(bottom, "x")


@pytest.mark.parametrize("low, high", [(20.0, 30.0), (0.002, 0.009), (0.5, 400.0)])
def test_hidden_channel_log_axis_reads_plain_numbers(low, high):
    """The channel plot's log axis is labelled 20, 30, 0.005 (plain numbers that read back to
    the tick's value), never 2.6x10^1."""
    from nemo_minitron.importance.plots import hidden_figure

    fig = hidden_figure(torch.linspace(low, high, 64))
    ax = fig.axes[0]
    labels = _tick_labels(ax)
    assert len(labels) >= 2, labels
    for position, text in labels:
        assert float(text) == pytest.approx(position, rel=1e-3), labels  # e.g. "20", "0.005"
