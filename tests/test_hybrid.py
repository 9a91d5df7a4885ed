"""Hybrid Mamba-Transformer models (Nemotron-H): the PyTorch Mamba-2 kernels against the
step-by-step recurrence, megatron-core's MambaModel on a CPU against transformers'
NemotronH (forward, backward, the mixer's prefill path), the one-line refusals, and
TP=2 / PP=2 layouts (one 2-process run). HF -> ours -> HF at TP=1 is in test_conversion.py
(the ``nemotron_h`` tiny model), the table's names in test_families.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import cli_in_process, run_workers
from tiny_models import hf_logits
from tolerances import SAFETY, U32, fp32, transformer_logits

KIND = "nemotron_h"
MOE_KIND = "nemotron_h_moe"  # pattern ME*M-E: MoE layers of 4 experts (top-2) beside a dense MLP layer
SEQ = 40  # longer than transformers' scan chunk (16) and the conv window (4)


def _recurrence(x, dt, A, B, C, D, z, dt_bias, state):
    """Mamba-2 one step at a time in float64: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,
    y_t = (h_t C_t + D x_t) silu(z_t), dt_t = softplus(dt_t + dt_bias); heads share B, C in groups."""
    x, dt, A, B, C, D, z, dt_bias, state = (t.double() for t in (x, dt, A, B, C, D, z, dt_bias, state))
    heads, groups = x.shape[2], B.shape[2]
    B, C = B.repeat_interleave(heads // groups, 2), C.repeat_interleave(heads // groups, 2)
    dt = F.softplus(dt + dt_bias)
    ys = []
    for t in range(x.shape[1]):
        state = (state * torch.exp(dt[:, t] * A)[..., None, None]
                 + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]) + D[:, None] * x[:, t])
    return torch.stack(ys, 1) * F.silu(z), state


def test_ssd_scan_equals_the_recurrence():
    """The chunked scan (chunks of 8 over 37 steps: a padded last chunk; 3 groups of 2 heads;
    a starting state) equals the recurrence, output and final state. Float32 against
    float64: each output sums, per state channel and per earlier step, terms whose absolute
    values the recurrence on absolute inputs adds up (the magnitude of the rounding)."""
    from nemo_minitron.model.ssm_kernels import mamba_chunk_scan_combined

    g = torch.Generator().manual_seed(0)
    b, steps, heads, head_dim, groups, state_dim = 2, 37, 6, 4, 3, 5
    x, z = torch.randn(b, steps, heads, head_dim, generator=g), torch.randn(b, steps, heads, head_dim, generator=g)
    dt, dt_bias = torch.randn(b, steps, heads, generator=g), torch.randn(heads, generator=g)
    A, D = -torch.rand(heads, generator=g) * 4, torch.randn(heads, generator=g)
    B, C = torch.randn(b, steps, groups, state_dim, generator=g), torch.randn(b, steps, groups, state_dim, generator=g)
    start = torch.randn(b, heads, head_dim, state_dim, generator=g)

    y, final = mamba_chunk_scan_combined(x, dt, A, B, C, 8, D=D, z=z, dt_bias=dt_bias, initial_states=start,
                                         dt_softplus=True, return_final_states=True)
    ref_y, ref_final = _recurrence(x, dt, A, B, C, D, z, dt_bias, start)
    scale_y, scale_final = _recurrence(x.abs(), dt, A, B.abs(), C.abs(), D.abs(), z, dt_bias, start.abs())
    n = steps * state_dim
    assert (y.double() - ref_y).abs().max().item() <= SAFETY * math.sqrt(n) * U32 * scale_y.abs().max().item()
    assert (final.double() - ref_final).abs().max().item() <= SAFETY * math.sqrt(n) * U32 * scale_final.max().item()


def test_decode_steps_equal_the_recurrence():
    """The decode-step kernels (megatron-core 0.19's Triton API: batch first, then new tokens;
    states updated in place, their rows chosen by index): three tokens in one call, then one
    per call, equal the float64 recurrence and a float64 causal conv, outputs and final states.
    The states' rows are swapped against the batch (indices [1, 0])."""
    from nemo_minitron.model.ssm_kernels import causal_conv1d_update, selective_state_update

    g = torch.Generator().manual_seed(1)
    b, steps, heads, head_dim, groups, state_dim, channels, width = 2, 7, 6, 4, 3, 5, 10, 4
    x, z = torch.randn(b, steps, heads, head_dim, generator=g), torch.randn(b, steps, heads, head_dim, generator=g)
    dt, dt_bias = torch.randn(b, steps, heads, generator=g), torch.randn(heads, generator=g)
    A, D = -torch.rand(heads, generator=g) * 4, torch.randn(heads, generator=g)
    B, C = torch.randn(b, steps, groups, state_dim, generator=g), torch.randn(b, steps, groups, state_dim, generator=g)
    start = torch.randn(b, heads, head_dim, state_dim, generator=g)
    u, weight, bias = torch.randn(b, steps, channels, generator=g), torch.randn(channels, width, generator=g), \
        torch.randn(channels, generator=g)
    window = torch.randn(b, channels, width, generator=g)  # the conv's cached inputs before step 0

    rows = torch.tensor([1, 0])
    ssm_state, conv_state = start[rows].clone(), window[rows].clone()
    per_p = lambda t: t[..., None].expand(*t.shape, head_dim)  # noqa: E731  (the mixer's layout)
    ys, convs = [], []
    for lo, hi in [(0, 3)] + [(t, t + 1) for t in range(3, steps)]:
        ys.append(selective_state_update(ssm_state, x[:, lo:hi], per_p(dt[:, lo:hi]), per_p(A)[..., None].expand(
            heads, head_dim, state_dim), B[:, lo:hi], C[:, lo:hi], per_p(D), z=z[:, lo:hi], dt_bias=per_p(dt_bias),
            dt_softplus=True, state_batch_indices=rows))
        convs.append(causal_conv1d_update(u[:, lo:hi], conv_state, weight, bias, "silu", rows))

    ref_y, ref_final = _recurrence(x, dt, A, B, C, D, z, dt_bias, start)
    scale_y, scale_final = _recurrence(x.abs(), dt, A, B.abs(), C.abs(), D.abs(), z, dt_bias, start.abs())
    n = steps * state_dim
    assert (torch.cat(ys, 1).double() - ref_y).abs().max().item() <= SAFETY * math.sqrt(n) * U32 * scale_y.abs().max()
    assert (ssm_state[rows].double() - ref_final).abs().max().item() <= SAFETY * math.sqrt(n) * U32 * scale_final.max()

    inputs = torch.cat([window.double()[..., 1:], u.double().transpose(1, 2)], -1)  # [b, channels, width-1+steps]
    ref_conv = F.silu((inputs.unfold(-1, width, 1) * weight.double()[:, None]).sum(-1) + bias.double()[:, None])
    magnitude = ((inputs.abs().unfold(-1, width, 1) * weight.abs().double()[:, None]).sum(-1) + bias.abs()[:, None])
    assert (torch.cat(convs, 1).double() - ref_conv.transpose(1, 2)).abs().max().item() <= fp32(width + 1,
                                                                                                 magnitude.max().item())
    assert torch.equal(conv_state[rows], torch.cat([window, u.transpose(1, 2)], -1)[..., -width:])


def _ours_and_hf(tiny_hf, config_overrides=None):
    from nemo_minitron.checkpoint.hf_import import load_source_into, resolve_source
    from nemo_minitron.model.builder import build_model

    source = resolve_source(str(tiny_hf(KIND)))
    desc = source.description
    ours = build_model(desc, config_overrides=config_overrides)
    load_source_into(ours, source, desc, torch.float32)
    return ours, source.hf_model(), desc


def _logits(model, tokens):
    return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., :1000]


def test_training_step_matches_transformers(tiny_hf, runtime):
    """Forward and backward of megatron-core's MambaModel (the mixer's training path: the
    fused conv + scan, then the gated norm) equal transformers' NemotronH in training mode
    (its PyTorch path): logits, and every weight's gradient of a fixed mix of all logits,
    mapped through the family table like the weights."""
    from nemo_minitron.checkpoint.hf_format import hf_to_canonical
    from nemo_minitron.model.params import named_weights
    from test_conversion import widest

    ours, hf, desc = _ours_and_hf(tiny_hf)
    ours.train()
    hf.train()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 1000, (2, SEQ), generator=g)
    mix = torch.randn(2, SEQ, 1000, generator=g)
    mine, theirs = _logits(ours, tokens), hf(tokens).logits
    width = widest(desc, SEQ)
    assert (mine - theirs).abs().max().item() <= transformer_logits(width, desc.num_layers, theirs)
    (mine * mix).sum().backward()
    (theirs * mix).sum().backward()
    hf_grads = {n.replace("model.", "backbone.", 1): p.grad for n, p in hf.named_parameters()}
    used = set()

    def get(hf_name: str) -> torch.Tensor:
        used.add(hf_name)
        return hf_grads[hf_name]

    for name, param in named_weights(ours):
        expected = hf_to_canonical(desc, name, get)
        # a gradient sums, over the tokens, products that passed back through at most
        # width x (2 layers + 1) accumulations
        tol = fp32(tokens.numel() * width * (2 * desc.num_layers + 1), expected.abs().max().item())
        assert (param.grad - expected).abs().max().item() <= tol, name
    assert used == set(hf_grads)  # every HF weight's gradient was compared


def test_prefill_path_matches_transformers(tiny_hf, runtime):
    """The mixer's other path (megatron's prefill: torch conv, the chunked scan without the
    gate, then the gated norm with z), taken with ``use_mamba_mem_eff_path=False``, gives
    transformers' logits too."""
    from test_conversion import widest

    ours, _, desc = _ours_and_hf(tiny_hf, {"use_mamba_mem_eff_path": False})
    ours.eval()
    tokens = torch.randint(0, 1000, (2, SEQ), generator=torch.Generator().manual_seed(5))
    reference = hf_logits(tiny_hf(KIND), tokens)
    with torch.no_grad():
        mine = _logits(ours, tokens)
    assert (mine - reference).abs().max().item() <= transformer_logits(widest(desc, SEQ), desc.num_layers, reference)


def test_prefill_then_decode_match_transformers(tiny_hf, runtime):
    """Inference with megatron-core's static context: a prefill of 9 tokens (the mixer keeps
    its conv window and SSM state), then one token at a time (the mixer's decode step from
    those states; attention from its KV cache): each step's logits are transformers' logits
    of the whole sequence at that position."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from nemo_minitron.generate.engine import inference_mode
    from test_conversion import widest

    ours, _, desc = _ours_and_hf(tiny_hf)
    ours.eval()
    length, prefill = 24, 9
    tokens = torch.randint(0, 1000, (2, length), generator=torch.Generator().manual_seed(6))
    reference = hf_logits(tiny_hf(KIND), tokens)
    context = StaticInferenceContext(2, length)
    steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, length)]
    last = []
    with torch.no_grad(), inference_mode():
        for start, end in steps:
            chunk = tokens[:, start:end]
            out = ours(chunk, torch.arange(start, end).expand_as(chunk), None, inference_context=context,
                       runtime_gather_output=True)
            last.append(out[:, -1, :1000])
            context.increment_sequence_len_offset(end - start)
    tol = transformer_logits(widest(desc, length), desc.num_layers, reference)
    assert (torch.stack(last, 1) - reference[:, prefill - 1:]).abs().max().item() <= tol


def test_counts_and_state_bytes(tiny_hf):
    """The description counts what transformers' model holds; KV bytes come from the
    attention layers only, the SSM state from the Mamba layers (heads x head_dim x state
    plus the conv window, per sequence)."""
    from nemo_minitron.checkpoint.hf_import import resolve_source
    from nemo_minitron.checkpoint.verify import load_hf_model

    desc = resolve_source(str(tiny_hf(KIND))).description
    assert desc.num_parameters() == sum(p.numel() for p in load_hf_model(tiny_hf(KIND)).parameters())
    assert desc.kv_cache_bytes_per_token(2) == 2 * 1 * 2 * 16 * 2  # K and V, 1 attention layer, 2 groups x 16
    assert desc.ssm_state_bytes(2) == 3 * (8 * 8 * 16 + (64 + 2 * 2 * 16) * 3) * 2


def _hf_dir(tmp_path: Path, tiny_hf, changes: dict, kind: str = KIND) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_hf(kind), out)
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("changes,flags,words", [
    ({"hybrid_override_pattern": "M*-M-G"}, (), "layer symbol 'G' is not supported; supported: M Mamba-2 mixer"),
    ({"layers_block_type": ["linear_attention", "full_attention", "mlp", "linear_attention", "mlp", "ssm"]}, (),
     "layers_block_type: unknown layer type 'ssm'"),
    # MoE layers (the nemotron_h_moe model): what megatron-core's sigmoid router cannot compute
    ({"kind": MOE_KIND, "norm_topk_prob": False}, (), "top-k 2 without renormalised weights (norm_topk_prob=False) "
                                                      "is not supported"),
    ({"kind": MOE_KIND, "num_experts_per_tok": 1}, (), "top-k 1 with renormalised weights"),
    ({"kind": MOE_KIND, "n_group": 2, "topk_group": 1}, (), "n_group=2 is not supported (group-limited expert "
                                                            "routing)"),
    ({"kind": MOE_KIND, "moe_latent_size": 32}, (), "moe_latent_size=32 is not supported (a latent mixture of "
                                                    "experts)"),
    ({"kind": MOE_KIND, "num_nextn_predict_layers": 1}, (), "num_nextn_predict_layers=1 is not supported"),
    ({"num_nextn_predict_layers": 1}, (), "num_nextn_predict_layers=1 is not supported (multi-token prediction"),
    ({"moe_latent_size": 32}, (), "moe_latent_size=32 is not supported (a latent mixture of experts)"),
    # transformers' NemotronH keeps its own lm_head.weight whatever the flag says
    ({"tie_word_embeddings": True}, (), "tie_word_embeddings=True is not supported (tied embeddings"),
    ({"time_step_limit": [0.0, 10.0]}, (), "time_step_limit=[0.0, 10.0] is not supported (a clamp of the Mamba"),
    ({"n_groups": 3}, (), "Mamba heads (8) must be a multiple of Mamba groups (3)"),
    ({"layer_norm_epsilon": 1e-6}, (), "norm epsilon must be 1e-05"),
    ({"n_groups": 1}, ("--tp", "2"), "--tp 2 does not divide the model's Mamba groups (1); allowed --tp values: 1"),
    ({}, ("--pp", "4"), "--pp 4 does not divide the hybrid model's 6 layers"),
])
def test_refusals_are_one_line_errors(tiny_hf, tmp_path, capsys, changes, flags, words):
    changes = dict(changes)
    src = _hf_dir(tmp_path, tiny_hf, changes, changes.pop("kind", KIND))
    code, stderr = cli_in_process(capsys, "convert", "--hf", src, "--out", tmp_path / "ckpt", *flags)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("nemo-minitron convert: error: ") and words in stderr, stderr
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.multirank
def test_tp2_and_pp2_layouts(tiny_hf, tiny_checkpoint, tmp_path, runtime):
    """One 2-process run, for the dense hybrid and the one with MoE layers (experts split
    over the TP ranks, the router and its expert bias replicated; one MoE layer per PP stage),
    at TP=2 (a rank holds one B/C group: in_proj and conv1d split section by section) and at
    PP=2 (3 layers per stage, attention on the first):
    - HF -> megatron at the layout: transformers' logits; exported back from the layout: the
      very tensors transformers stored;
    - the TP=1 checkpoint loaded at the layout (megatron's sharded in_proj/conv1d parts),
      and a checkpoint converted at the layout loaded here at TP=1: the TP=1 logits."""
    tokens = torch.randint(0, 1000, (2, SEQ), generator=torch.Generator().manual_seed(7))
    torch.save(tokens, tmp_path / "tokens.pt")
    layouts = {"tp2": [2, 1], "pp2": [1, 2]}
    kinds = (KIND, MOE_KIND)
    job = {"models": [{"src": str(tiny_hf(kind)), "checkpoint": str(tiny_checkpoint(kind)),
                       "out": str(tmp_path / "out" / kind / "{layout}")} for kind in kinds],
           "tokens": str(tmp_path / "tokens.pt"), "layouts": layouts}
    (tmp_path / "job.json").write_text(json.dumps(job))
    run_workers("hybrid_layouts.py", tmp_path / "job.json", out=tmp_path / "out")
    for kind in kinds:
        _check_layouts(tiny_hf(kind), tiny_checkpoint(kind), tokens, tmp_path / "out" / kind, layouts)


def _check_layouts(hf_dir: Path, checkpoint: Path, tokens: torch.Tensor, outs: Path, layouts) -> None:
    from safetensors.torch import load_file

    from nemo_minitron.checkpoint.api import open_model
    from nemo_minitron.model.forward import full_logits
    from test_conversion import widest

    reference = hf_logits(hf_dir, tokens)
    opened = open_model(str(checkpoint))
    desc = opened.description
    at_tp1 = full_logits(opened.model, tokens, desc.vocab_size)
    tol = transformer_logits(widest(desc, SEQ), desc.num_layers, reference)
    stored = load_file(str(hf_dir / "model.safetensors"))
    for layout in layouts:
        out = outs / layout
        assert (torch.load(out / "from_hf.pt") - reference).abs().max().item() <= tol, layout
        assert (torch.load(out / "from_checkpoint.pt") - at_tp1).abs().max().item() <= tol, layout
        exported = {}
        for f in (out / "hf").glob("*.safetensors"):
            exported.update(load_file(str(f)))
        assert exported.keys() == stored.keys(), layout
        assert all(torch.equal(exported[k], stored[k]) for k in stored), layout
        converted = open_model(str(out / "converted"))
        again = full_logits(converted.model, tokens, desc.vocab_size)
        assert (again - at_tp1).abs().max().item() <= tol, layout


def test_a_tied_hybrid_is_not_written_as_nemotron_h(tiny_checkpoint):
    """A Megatron hybrid with shared embeddings written as NemotronH would load in transformers
    with a random lm_head (its NemotronH never ties): refused, the untied one written."""
    from nemo_minitron.checkpoint.hf_format import hf_config_dict
    from nemo_minitron.checkpoint.store import read_info
    from nemo_minitron.errors import UsageError

    desc = read_info(tiny_checkpoint(KIND)).description
    assert hf_config_dict(desc)["tie_word_embeddings"] is False
    with pytest.raises(UsageError, match="tied embeddings cannot be written as nemotron_h"):
        hf_config_dict(desc.replace(tie_embeddings=True))


def test_stages_not_yet_supported_refuse(tiny_checkpoint, tmp_path, capsys):
    """Stages that do not handle hybrid models yet say so in one line, before any work
    (sparsify; Megatron-LM / Bridge export and reading: test_megatron_hybrid.py)."""
    code, stderr = cli_in_process(capsys, "sparsify", tiny_checkpoint(KIND), "--out", tmp_path / "sparse",
                                  "--data", "builtin:calib")
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "sparsify of a hybrid" in stderr, stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", [KIND, MOE_KIND])
def test_greedy_generation_equals_transformers(kind, tiny_hf, runtime, one_thread, tmp_path, capsys):
    """``generate`` on the hybrid model, dense and with MoE layers (megatron-core's
    static-batch engine: the mixer's prefill with a state cache, then its one-token decode
    step; batches of 4 prompts of mixed lengths) gives transformers' greedy tokens, prompt
    by prompt."""
    from nemo_minitron.checkpoint.verify import load_hf_model
    from test_generate import PROMPTS, _records, _write_jsonl
    from tiny_models import byte_tokenizer, hf_greedy

    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "out.jsonl"
    code, err = cli_in_process(capsys, "generate", tiny_hf(kind), "--prompts", prompts, "--out", out,
                               "--max-new-tokens", 12, "--batch-size", 4)
    assert code == 0, err
    tok = byte_tokenizer()
    expected = hf_greedy(load_hf_model(tiny_hf(kind)), [tok(p)["input_ids"] for p in PROMPTS], 12, eos_token_id=2)
    assert [r["completion_ids"] for r in _records(out)] == expected
