"""Hybrid models with mixture-of-experts layers (Nemotron 3, issue 22 phase 3): expert
importance against transformers' NemotronH activations, pruning of experts (with their
router rows and expert bias), their neurons, the shared expert, the dense MLP layer and a
MoE layer, counts (total and active) against transformers' model of the exported config.
Conversion at TP=1 is test_conversion.py's (the ``nemotron_h_moe`` tiny model), TP=2 / PP=2
test_hybrid.py's layouts run, distillation test_distill.py's hybrid cases."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_workers
from tolerances import fp32, transformer_logits

KIND = "nemotron_h_moe"  # pattern ME*M-E: 4 experts of 32 (top-2, scaled 2.5) + a shared expert of 48, ffn 96
SEQ, SAMPLES, SEED = 24, 4, 11
IMPORTANCE = dict(samples=SAMPLES, seq_len=SEQ, micro_batch=2, layer_samples=2, seed=SEED)
# float32 megatron activations against float64 HF ones through 6 layers whose widest
# accumulation is the dense MLP's 96 inputs; the aggregations then run in float64
SCORE_RTOL = fp32(96 * (2 * 6 + 1), 1.0)


@pytest.fixture(scope="module")
def moe(tiny_hf, tiny_checkpoint, tmp_path_factory):
    """The tiny hybrid MoE checkpoint, its importance directory (no depth statistics but the
    layer loss drops) and its calibration samples."""
    from nemo_minitron.checkpoint.store import load_tokenizer, read_info
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.importance.api import calibration_samples, compute_importance

    ckpt = tiny_checkpoint(KIND)
    imp = tmp_path_factory.mktemp("hybrid_moe_importance") / "imp"
    scores = compute_importance(str(ckpt), ["builtin:calib"], str(imp), **IMPORTANCE, progress=False)
    samples = calibration_samples(check_corpus(["builtin:calib"]), load_tokenizer(ckpt), seq_len=SEQ,
                                  samples=SAMPLES, seed=SEED)
    return {"checkpoint": ckpt, "importance": imp, "scores": scores, "samples": samples,
            "desc": read_info(ckpt).description}


def _hf_moe_reference(hf, tokens: torch.Tensor, neurons: str = "post") -> dict[str, torch.Tensor]:
    """Expert, expert-neuron, shared-expert-neuron and dense-MLP-neuron scores by definition
    (default aggregation: mean |.| over each sequence, L2 over samples) from transformers'
    NemotronH (float32; the scores' arithmetic in float64): per token, an expert's score is ||w_te E_e(x_t)|| and its neurons
    w_te relu(x_t W_up,e)^2 (w_te: the routing weight, 0 when t is not routed to e), or with
    ``neurons="pre"`` the pre-activation x_t W_up,e on the tokens routed to e (the shared
    expert's and the MLP layer's: their up projection's output)."""
    seen: dict[int, torch.Tensor] = {}
    shared: dict[int, torch.Tensor] = {}
    dense: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(hf.model.layers):
        if layer.block_type == "moe":
            handles.append(layer.mixer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0].detach().double())))
            shared_side = layer.mixer.shared_experts.down_proj if neurons == "post" else None
            handles.append((shared_side or layer.mixer.shared_experts.up_proj).register_forward_hook(
                lambda m, a, o, i=i: shared.__setitem__(i, (a[0] if neurons == "post" else o).detach().double())))
        elif layer.block_type == "mlp":
            handles.append((layer.mixer.down_proj if neurons == "post" else layer.mixer.up_proj).register_forward_hook(
                lambda m, a, o, i=i: dense.__setitem__(i, (a[0] if neurons == "post" else o).detach().double())))
    with torch.no_grad():
        hf(tokens, use_cache=False)
    for h in handles:
        h.remove()

    def agg(x: torch.Tensor) -> torch.Tensor:  # [b, s, units] -> [units]
        return x.abs().mean(1).pow(2).sum(0).sqrt()

    b, s = tokens.shape
    out: dict[str, dict[int, torch.Tensor]] = {"experts": {}, "moe_ffn": {}, "shared_ffn": {}, "ffn": {}}
    for i, x in seen.items():
        mixer = hf.model.layers[i].mixer
        with torch.no_grad():
            _, weights, chosen = mixer.gate(x.float())                  # [b*s, k] each
        x = x.reshape(b * s, -1)
        up, down = mixer.experts.up_proj.double(), mixer.experts.down_proj.double()
        experts, units = [], []
        for e in range(up.shape[0]):
            w = (weights * (chosen == e)).sum(-1, keepdim=True).double()
            act = w * torch.relu(x @ up[e].T).square()
            experts.append(agg((act @ down[e].T).norm(dim=-1).reshape(b, s, 1))[0])
            units.append(agg((act if neurons == "post" else (x @ up[e].T) * (w > 0)).reshape(b, s, -1)))
        out["experts"][i], out["moe_ffn"][i] = torch.stack(experts), torch.stack(units)
        out["shared_ffn"][i] = agg(shared[i])
    for i, x in dense.items():
        out["ffn"][i] = agg(x)
    return out


def test_expert_scores_equal_transformers(moe, tiny_hf):
    """Experts, their neurons (post and pre activation: experts have no gate), the shared
    expert's neurons (MoE layers) and the MLP layer's neurons from the calibration pass (the
    importance run's, and one with pre-activations) equal the definitions on transformers'
    activations (routing: sigmoid scores, top-2 chosen with the expert bias, weights unbiased,
    renormalised, times 2.5); layers of other kinds score zero on these axes."""
    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.importance.api import calibration_pass

    desc, hf = moe["desc"], load_hf_model(tiny_hf(KIND))
    pre = calibration_pass(open_model(str(moe["checkpoint"])).model, moe["samples"], micro_batch=2, seq_agg="mean",
                           batch_agg="l2", neuron_activation="pre", num_layers=desc.num_layers, progress=False)
    for neurons, scores in (("post", moe["scores"].tensors), ("pre", pre)):
        _check_moe_scores(scores, _hf_moe_reference(hf, moe["samples"][:, :-1], neurons), desc)


def _check_moe_scores(scores, reference, desc) -> None:
    for axis, per_layer in reference.items():
        assert set(per_layer) == {i for i, s in enumerate(desc.hybrid_pattern) if s == ("-" if axis == "ffn" else "E")}
        for i in range(desc.num_layers):
            ours = scores[axis][i].double()
            if i not in per_layer:
                assert not ours.any(), (axis, i)
                continue
            ref = per_layer[i]
            assert ours.shape == ref.shape, (axis, i)
            assert (ours - ref).abs().max().item() <= SCORE_RTOL * ref.abs().max().item(), (axis, i)


TARGET = {"experts": 3, "moe_ffn": 24, "shared_ffn": 32, "ffn": 64, "mamba_heads": 4, "moe_layers": 1}


def test_pruned_experts_counts_and_logits(moe, tmp_path):
    """Pruning every MoE axis, the dense MLP and one of the two MoE layers (the lower loss
    drop): the kept MoE layer's router rows and expert bias are those of its 3 best experts,
    in order, each expert keeps its own 24 best neurons, the shared expert its 32; total and
    active parameters of the description == the saved tensors (the expert bias is a buffer,
    not a parameter, in transformers too) == transformers' model of the exported config,
    which loads in NemotronHForCausalLM and gives our logits."""
    from nemo_minitron.checkpoint.api import export, open_model
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.model.params import named_weights
    from nemo_minitron.prune.api import prune
    from test_conversion import widest

    old, scores = moe["desc"], moe["scores"]
    out = prune(str(moe["checkpoint"]), str(moe["importance"]), str(tmp_path / "pruned"), target=TARGET,
                layer_metric="loss")
    new = read_info(out).description
    loss = scores["layer_loss_drop"].tolist()
    moe_layers = [i for i, s in enumerate(old.hybrid_pattern) if s == "E"]
    dropped = min(moe_layers, key=lambda i: loss[i])
    kept_layer = next(i for i in moe_layers if i != dropped)
    assert new.hybrid_pattern == old.hybrid_pattern[:dropped] + old.hybrid_pattern[dropped + 1:]
    assert (new.num_experts, new.moe_top_k, new.moe_ffn_hidden_size, new.moe_shared_ffn_hidden_size) == (3, 2, 24, 32)

    before = {k: v.detach().clone() for k, v in named_weights(open_model(str(moe["checkpoint"])).model)}
    pruned = open_model(str(out))
    after = {k: v.detach().clone() for k, v in named_weights(pruned.model)}
    hidden = torch.arange(old.hidden_size)  # (the hidden size is kept)
    experts = torch.argsort(scores["experts"][kept_layer], descending=True, stable=True)[:3].sort().values
    src = f"decoder.layers.{kept_layer}.mlp."
    dst = f"decoder.layers.{new.hybrid_pattern.index('E')}.mlp."
    assert torch.equal(after[dst + "router.weight"], before[src + "router.weight"][experts][:, hidden])
    assert torch.equal(after[dst + "router.expert_bias"], before[src + "router.expert_bias"][experts])
    for position, e in enumerate(experts.tolist()):
        neurons = torch.argsort(scores["moe_ffn"][kept_layer, e], descending=True, stable=True)[:24].sort().values
        for fc, cut in (("linear_fc1", lambda t: t[neurons]), ("linear_fc2", lambda t: t[:, neurons])):
            name = f"experts.local_experts.{{}}.{fc}.weight"
            assert torch.equal(after[dst + name.format(position)], cut(before[src + name.format(e)])), (e, fc)
    neurons = torch.argsort(scores["shared_ffn"][kept_layer], descending=True, stable=True)[:32].sort().values
    assert torch.equal(after[dst + "shared_experts.linear_fc1.weight"],
                       before[src + "shared_experts.linear_fc1.weight"][neurons])

    counted = sum(t[: new.vocab_size].numel() if k.startswith(("embedding.", "output_layer.")) else t.numel()
                  for k, t in after.items() if not k.endswith("expert_bias"))  # padded vocabulary rows: no parameters
    hf = load_hf_model(export(str(out), str(tmp_path / "hf")))
    assert type(hf).__name__ == "NemotronHForCausalLM"
    assert counted == new.num_parameters() == sum(p.numel() for p in hf.parameters())
    # active: each MoE layer's experts beyond the top-k (up and down projections) do not count
    idle = new.hybrid_pattern.count("E") * (new.num_experts - new.moe_top_k) * 2 * new.hidden_size * 24
    assert new.num_parameters(active=True) == new.num_parameters() - idle
    tokens = torch.randint(0, new.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = full_logits(pruned.model, tokens, new.vocab_size)
        theirs = hf(tokens, use_cache=False).logits.float()
    assert (ours - theirs).abs().max().item() <= transformer_logits(widest(new, SEQ), new.num_layers, theirs)


@pytest.mark.slow  # 2 processes, ~21 s; TP=1 scores and pruning are tested above, hybrid TP2/PP2 pruning in test_hybrid_prune
@pytest.mark.multirank
def test_importance_and_pruning_at_tp2_and_pp2_equal_tp1(moe, tmp_path):
    """One 2-process run: importance at TP=2 (experts split by neurons over the ranks, the
    router replicated) and PP=2 (one MoE layer a stage) equals TP=1's; pruning every MoE
    axis, the MLP layer and the Mamba heads at TP=2 and PP=2 from the TP=1 scores writes
    exactly the TP=1 weights (expert bias included), holding as many parameters as the
    description counts."""
    from test_hybrid_prune import LOSS_TOL, _state

    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.prune.api import prune

    target = {k: v for k, v in TARGET.items() if k != "moe_layers"}  # (at PP=2 a depth cut must keep stages equal)
    jobs = [{"name": "pruned", "target": target, "order": "importance", "layer_metric": "auto"}]
    want = _state(prune(str(moe["checkpoint"]), str(moe["importance"]), str(tmp_path / "tp1"), target=target))[1]
    layouts = {"tp2": [2, 1], "pp2": [1, 2]}
    job = {"checkpoint": str(moe["checkpoint"]), "scores": str(moe["importance"]), "layouts": layouts,
           "importance": IMPORTANCE, "variants": {layout: {"imp": {}} for layout in layouts}, "prune": jobs,
           "out": str(tmp_path / "out" / "{layout}")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    run_workers("hybrid_prune_layouts.py", tmp_path / "job.json", out=tmp_path / "out")
    for layout in layouts:
        other, base = ImportanceScores.load(tmp_path / "out" / layout / "imp"), moe["scores"]
        assert other.tensors.keys() == base.tensors.keys()
        for axis, ref in base.tensors.items():
            diff, scale = (other[axis] - ref).abs().max().item(), ref.abs().max().item()
            # loss drops: differences of two losses; the rest another split of the same float32 forward
            assert diff <= (2 * LOSS_TOL if axis == "layer_loss_drop" else 2 * SCORE_RTOL * scale), (layout, axis)
        _, got = _state(tmp_path / "out" / layout / "pruned")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), layout


# ---------------------------------------------------------------------- distillation
#: one KD step with CE; a MoE student adds its load-balancing loss (per sequence, as
#: Megatron-Bridge trains Nemotron 3) weighted 0.05; at TP=2 it trains with sequence parallelism
KD = dict(global_batch=4, micro_batch=2, seq_len=16, lr=1e-3, kd_temperature=1.5, ce_weight=0.25, logit_chunk=7)
KD_RUNS = {"dense_student": ("nemotron_h_moe", "nemotron_h", KD),
           "moe_student": ("nemotron_h", "nemotron_h_moe", {**KD, "moe_aux_loss_coeff": 0.05})}
KD_LAYOUTS = {"tp2": [2, 1], "pp2": [1, 2]}


def _seq_aux_loss(student_hf, microbatches, coeff: float) -> float:
    """The step's load-balancing loss by its definition (Switch Transformer's, per sequence,
    as megatron-core's ``seq_aux_loss`` normalises it), from transformers' router: per MoE
    layer and sequence of S tokens, E / (k S^2) * sum_e (sum_t s_te / sum_e' s_te') * n_e
    (s: sigmoid scores, n_e: the sequence's tokens among whose top-k unbiased scores e is:
    megatron counts the load without the expert bias, which balances by itself), averaged
    over the sequences, summed over layers, averaged over micro-batches."""
    from nemo_minitron.checkpoint.verify import load_hf_model

    hf = load_hf_model(student_hf)
    routed = []
    hooks = [layer.mixer.gate.register_forward_hook(lambda m, a, o: routed.append(o[0]))
             for layer in hf.model.layers if layer.block_type == "moe"]
    total = 0.0
    for mb in microbatches:
        routed.clear()
        with torch.no_grad():
            hf(mb["tokens"], use_cache=False)
        b, S = mb["tokens"].shape
        for logits in routed:
            scores = logits.double().sigmoid()
            E, k = scores.shape[-1], hf.config.num_experts_per_tok
            chosen = scores.topk(k, dim=-1).indices
            share = (scores / scores.sum(-1, keepdim=True)).view(b, S, E).sum(1)           # [b, E]
            counts = torch.zeros(b * S, E, dtype=torch.float64).scatter(1, chosen, 1.0).view(b, S, E).sum(1)
            total += (E / (k * S * S) * (share * counts).sum(-1)).mean().item() / len(microbatches)
    for h in hooks:
        h.remove()
    return coeff * total


def test_kd_step_reports_the_load_balancing_loss_of_transformers_router(tiny_hf, tiny_checkpoint):
    """At TP=1 (the fast tier's check; the layouts below are in the slow tier): only the MoE
    student reports a load-balancing loss, equal to its definition on transformers' router."""
    from test_distill import make_trainer

    for name, (teacher, student, settings) in KD_RUNS.items():
        trainer = make_trainer(str(tiny_checkpoint(teacher)), str(tiny_checkpoint(student)), 1, 1, settings)
        logs, _ = trainer.gradients(step=0)
        assert ("moe_aux_loss" in logs) == (name == "moe_student")
        if name == "moe_student":
            want = _seq_aux_loss(tiny_hf(student), trainer.step_batches(0), settings["moe_aux_loss_coeff"])
            # sums over 16 tokens x 4 experts of router scores carrying a float32 forward pass's rounding
            assert abs(logs["moe_aux_loss"] - want) <= fp32(16 * 4 * 96 * 13, want), (logs["moe_aux_loss"], want)


@pytest.mark.slow  # 2 processes, ~27 s; the TP=1 check above stays in the fast tier
@pytest.mark.multirank
def test_kd_step_at_tp2_and_pp2_equals_tp1(tiny_hf, tiny_checkpoint, tmp_path):
    """A hybrid teacher and a hybrid student (a dense student taught by the MoE hybrid, and a
    MoE student, whose load-balancing loss is reported and equals its definition on
    transformers' router, taught by the dense one): at TP=2 (Mamba heads, experts and the vocabulary split; the MoE student
    sequence-parallel) and at PP=2 (3 layers per stage) the step reads the same samples and
    its losses and every gradient (gathered, the in_proj/conv1d sections put back) equal
    TP=1's."""
    from test_distill import make_trainer
    from tolerances import log_softmax_sum

    runs = {name: [str(tiny_checkpoint(t)), str(tiny_checkpoint(s)), settings]
            for name, (t, s, settings) in KD_RUNS.items()}
    out = tmp_path / "out"
    (tmp_path / "job.json").write_text(json.dumps({"runs": runs, "layouts": KD_LAYOUTS, "out": str(out)}))
    run_workers("hybrid_distill_layouts.py", tmp_path / "job.json", out=out)
    for name, (teacher, student, settings) in runs.items():
        trainer = make_trainer(teacher, student, 1, 1, settings)
        logs, grads = trainer.gradients(step=0)
        assert ("moe_aux_loss" in logs) == (name == "moe_student")
        if name == "moe_student":
            want = _seq_aux_loss(tiny_hf(KD_RUNS[name][1]), trainer.step_batches(0), settings["moe_aux_loss_coeff"])
            # sums over 16 tokens x 4 experts of router scores carrying a float32 forward pass's rounding
            assert abs(logs["moe_aux_loss"] - want) <= fp32(16 * 4 * 96 * 13, want), (logs["moe_aux_loss"], want)
        for layout in KD_LAYOUTS:
            merged: dict[str, torch.Tensor] = {}
            for part in sorted((out / layout).glob("rank*.pt")):
                saved = torch.load(part)[name]
                assert saved["logs"]["samples_fingerprint"] == logs["samples_fingerprint"], (name, layout)
                # another split of the same float32 arithmetic: row-parallel sums and vocabulary
                # shards reduced in another order; the loss terms are log-softmax sums
                tol = log_softmax_sum(1000, 10.0) * settings["kd_temperature"] ** 2
                for key in ("loss", "kd_loss", "ce_loss"):
                    assert abs(saved["logs"][key] - logs[key]) <= tol, (name, layout, key)
                assert ("moe_aux_loss" in saved["logs"]) == ("moe_aux_loss" in logs)
                if "moe_aux_loss" in logs:  # the same sums over 32 tokens x 4 experts, split over ranks
                    assert abs(saved["logs"]["moe_aux_loss"] - logs["moe_aux_loss"]) <= fp32(32 * 4 * 64 * 13, 1.0)
                merged.update(saved["grads"])
            assert merged.keys() == grads.keys(), (name, layout)
            for key, ref in grads.items():
                # each gradient sums, over the step's 64 tokens, products that passed through
                # the layers (widest accumulation 96, 6 layers)
                tol = fp32(64 * 96 * (2 * 6 + 1), ref.abs().max().item())
                assert (merged[key] - ref).abs().max().item() <= tol, (name, layout, key)


def test_planner_counts_are_the_pruned_models(moe, tmp_path):
    """A planner candidate that cuts experts and Mamba heads and drops a MoE layer: its total
    and active parameter counts are those of the model pruned to its target, of the saved
    tensors and of transformers' model of the exported config."""
    from nemo_minitron.checkpoint.api import export, open_model
    from nemo_minitron.checkpoint.verify import load_hf_model
    from nemo_minitron.model.params import named_weights
    from nemo_minitron.prune.api import prune
    from nemo_minitron.prune.plan import plan

    old = moe["desc"]
    candidates = plan(old, int(0.9 * old.num_parameters()), max_width_cut=0.5)
    cand = next(c for c in candidates if c.description.num_experts < old.num_experts
                and c.description.hybrid_pattern.count("E") < old.hybrid_pattern.count("E"))
    out = prune(str(moe["checkpoint"]), str(moe["importance"]), str(tmp_path / "pruned"), target=cand.target(),
                layer_metric="loss")
    pruned = open_model(str(out))
    new = pruned.description
    assert (new.num_parameters(), new.num_active_parameters()) == (cand.params, cand.active_params)
    saved = sum(t[: new.vocab_size].numel() if k.startswith(("embedding.", "output_layer.")) else t.numel()
                for k, t in named_weights(pruned.model) if not k.endswith("expert_bias"))
    hf = load_hf_model(export(str(out), str(tmp_path / "hf")))
    assert saved == cand.params == sum(p.numel() for p in hf.parameters())
    assert hf.config.n_routed_experts == new.num_experts and hf.config.layers_block_type.count("moe") == 1
