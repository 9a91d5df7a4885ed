"""The logit and intermediate losses against plain full-tensor references."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tolerances import fp32, log_softmax_sum

from nemo_minitron.distill.config import DistillConfig
from nemo_minitron.distill.losses import CPU_CHUNK_TOKENS, LogitLossConfig, intermediate_loss, logit_loss


def loss_config(vocab_size=200, **changes) -> LogitLossConfig:
    """The project's default logit loss (from DistillConfig) with the given changes."""
    return LogitLossConfig.of(DistillConfig(), vocab_size, **changes)


def _reference(z, y, labels, cfg: LogitLossConfig):
    """Written out directly over the true vocabulary (padding columns dropped)."""
    V = cfg.vocab_size or z.shape[-1]
    z, y = z[..., :V].double(), y[..., :V].double()
    T = cfg.temperature
    if cfg.top_k is not None:
        kth = y.topk(cfg.top_k, dim=-1).values[..., -1:]
        y = y.masked_fill(y < kth, float("-inf"))
    log_p, log_q = torch.log_softmax(z / T, -1), torch.log_softmax(y / T, -1)
    p, q = log_p.exp(), log_q.exp()
    if cfg.kind == "forward":
        kd = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)
    else:
        kd = (p * (log_p - log_q)).sum(-1)
    ce = torch.nn.functional.cross_entropy(z.reshape(-1, V), labels.reshape(-1), reduction="none")
    total = cfg.kd_weight * T * T * kd.mean() + cfg.ce_weight * ce.mean()
    return total, (T * T * kd).mean(), ce.mean()


def _inputs(seed=0, tokens=(3, 7), vocab=200, padded=256):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*tokens, padded, generator=g, dtype=torch.float64).float() * 3
    y = torch.randn(*tokens, padded, generator=g, dtype=torch.float64).float() * 3
    z[..., vocab:] = 0.0  # what zero padding rows of the output layer produce
    y[..., vocab:] = 0.0
    labels = torch.randint(0, vocab, tokens, generator=g)
    return z, y, labels


@pytest.mark.parametrize("cfg", [
    loss_config(vocab_size=200),
    loss_config(vocab_size=200, temperature=2.0),
    loss_config(vocab_size=200, temperature=0.5, top_k=5),
    loss_config(vocab_size=200, kind="reverse", temperature=1.5),
    loss_config(vocab_size=200, temperature=2.0, ce_weight=0.3, kd_weight=0.7),
    loss_config(vocab_size=200, kd_weight=0.0, ce_weight=1.0),
], ids=["forward", "T2", "topk", "reverse", "kd+ce", "ce-only"])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_chunked_loss_equals_full_tensor_reference(runtime, cfg, chunk):
    import dataclasses

    cfg = dataclasses.replace(cfg, chunk_tokens=chunk)
    z, y, labels = _inputs()
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().double().requires_grad_(True)
    total, kd, ce, _ = logit_loss(z1, y, labels, cfg)
    ref_total, ref_kd, ref_ce = _reference(z2, y, labels, cfg)
    total.backward()
    ref_total.backward()
    # float32 chunks against float64: per token, log-softmax sums over the 200 true vocabulary
    # entries of logits up to max|z| / T (KD scaled by T^2), means over the 21 tokens
    T = cfg.temperature
    max_logit = max(z.abs().max().item(), y.abs().max().item()) / min(T, 1.0)
    tol = log_softmax_sum(200, max_logit) * max(T * T, 1.0)
    assert abs(total.item() - ref_total.item()) <= tol * (cfg.kd_weight + cfg.ce_weight)
    if cfg.kd_weight:
        assert abs(kd.item() - ref_kd.item()) <= tol
    if cfg.ce_weight:
        assert abs(ce.item() - ref_ce.item()) <= tol
    ref_grad = torch.zeros_like(z2.grad)
    ref_grad[..., :200] = z2.grad[..., :200]
    scale = ref_grad.abs().max().item()
    # each gradient entry is T (p - q) / n (and softmax - onehot): probabilities computed from
    # the same log-softmax terms, relative to the largest entry
    assert (z1.grad.double() - ref_grad).abs().max().item() <= log_softmax_sum(200, max_logit) * scale
    assert z1.grad[..., 200:].abs().max() == 0  # padding gets no gradient


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kl_is_zero_with_zero_gradient_when_student_is_teacher(runtime, kind, temperature):
    z, _, labels = _inputs(seed=3)
    student = z.clone().requires_grad_(True)
    total, kd, *_ = logit_loss(student, z.clone(), labels,
                              loss_config(kind=kind, temperature=temperature, vocab_size=200, chunk_tokens=5))
    total.backward()
    # identical inputs go through identical operations: p = q and log p = log q bit for bit
    assert total.item() == 0.0 and kd.item() == 0.0
    assert student.grad.abs().max().item() == 0.0


def test_temperature_scaling_keeps_gradient_size(runtime):
    """With T^2 scaling, at high temperature the gradient no longer depends on T
    (without it, doubling T would shrink it fourfold)."""
    z, _, labels = _inputs(seed=4)
    y = z + 0.01 * torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    norms = {}
    for T in (8.0, 16.0):
        s = z.clone().requires_grad_(True)
        logit_loss(s, y, labels, loss_config(temperature=T, vocab_size=200))[0].backward()
        norms[T] = s.grad.norm().item()
    assert 0.8 < norms[16.0] / norms[8.0] < 1.25


def test_intermediate_losses():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 2, 16, generator=g)
    tol = fp32(16, 1.0)  # 1 - cos: float32 dot products and norms over 16 channels, cos <= 1
    assert intermediate_loss(a, a).abs() <= tol
    assert intermediate_loss(a, 3 * a).abs() <= tol  # cosine ignores scale
    assert intermediate_loss(a, 3 * a, "mse").abs() <= tol  # so does the RMS-normalised MSE
    b = torch.randn(5, 2, 16, generator=g)
    a64, b64 = a.double(), b.double()
    cos = (a64 * b64).sum(-1) / (a64.square().sum(-1).sqrt() * b64.square().sum(-1).sqrt())
    assert abs(intermediate_loss(a, b).item() - (1 - cos).mean().item()) <= tol
    rms = lambda x: x / x.square().mean(-1, keepdim=True).add(1e-6).sqrt()  # noqa: E731
    mse = (rms(a64) - rms(b64)).square().mean().item()
    assert abs(intermediate_loss(a, b, "mse").item() - mse) <= fp32(16, 4.0)


@pytest.mark.parametrize("chunk", [2, 1024])
def test_per_token_weights_equal_a_masked_reference(runtime, chunk):
    """Completions and mixed runs weigh each token: prompt tokens (mask 0) count for nothing,
    synthetic samples get cross-entropy only. The mean is over the weighted tokens."""

    from nemo_minitron.distill.train import token_weights

    cfg = loss_config(vocab_size=200, temperature=2.0, kd_weight=0.7, ce_weight=0.2, synthetic_weight=1.5,
                      chunk_tokens=chunk)
    z, y, labels = _inputs(seed=3, tokens=(3, 7))
    mask = torch.ones(3, 7)
    mask[0, :4] = 0  # a prompt of 4 tokens
    mask[2, :2] = 0
    batch = {"labels": labels, "loss_mask": mask, "synthetic": torch.tensor([True, False, True])}
    kd_w, ce_w = token_weights(batch, cfg)
    z1 = z.clone().requires_grad_(True)
    total, kd, ce, _ = logit_loss(z1, y, labels, cfg, kd_w, ce_w)
    total.backward()

    # the reference: per-token KD and CE in float64, weighted by hand from the masks
    z2 = z.clone().double().requires_grad_(True)
    T = cfg.temperature
    log_p = torch.log_softmax(z2[..., :200] / T, -1)
    log_q = torch.log_softmax(y[..., :200].double() / T, -1)
    kd_tok = T * T * (log_q.exp() * (log_q - log_p)).sum(-1)
    ce_tok = torch.nn.functional.cross_entropy(z2[..., :200].reshape(-1, 200), labels.reshape(-1),
                                               reduction="none").reshape(3, 7)
    synthetic = torch.tensor([1.0, 0.0, 1.0]).unsqueeze(-1)
    kd_ref_w = 0.7 * mask * (1 - synthetic)                 # KD on real samples' trained tokens
    ce_ref_w = (0.2 * (1 - synthetic) + 1.5 * synthetic) * mask
    counted = ((kd_ref_w > 0) | (ce_ref_w > 0)).sum()       # 7 + 3 + 5 = 15 tokens
    assert counted == 15
    ref_total = (kd_ref_w * kd_tok + ce_ref_w * ce_tok).sum() / counted
    ref_total.backward()
    max_logit = max(z.abs().max().item(), y.abs().max().item())
    tol = log_softmax_sum(200, max_logit) * T * T
    assert abs(total.item() - ref_total.item()) <= tol * 2.2
    assert abs(kd.item() - (kd_tok * (kd_ref_w > 0)).sum().item() / 7) <= tol
    assert abs(ce.item() - (ce_tok * (ce_ref_w > 0)).sum().item() / 15) <= tol
    ref_grad = torch.zeros_like(z2.grad)
    ref_grad[..., :200] = z2.grad[..., :200]
    scale = ref_grad.abs().max().item()
    assert (z1.grad.double() - ref_grad).abs().max().item() <= log_softmax_sum(200, max_logit) * scale
    assert z1.grad[0, :4].abs().max() == 0  # a prompt's tokens get no gradient
    # plain data: no weights, the config's weights over every token
    assert token_weights({"labels": labels}, cfg) == (None, None)


def _contrastive_reference(z, y, cfg: LogitLossConfig):
    """InfoNCE over the positions of each chunk, written out with full float64 tensors: the
    similarity of student position i and teacher position j is sum_v q_jv log p_iv."""
    V, T, tau = cfg.vocab_size, cfg.temperature, cfg.contrastive_temperature
    log_p = torch.log_softmax(z.reshape(-1, z.shape[-1])[:, :V].double() / T, -1)
    q = torch.softmax(y.reshape(-1, y.shape[-1])[:, :V].double() / T, -1)
    terms = []
    for i in range(0, log_p.shape[0], cfg.chunk_tokens):
        sim = log_p[i:i + cfg.chunk_tokens] @ q[i:i + cfg.chunk_tokens].T / tau
        terms.append(-torch.log_softmax(sim, dim=-1).diagonal())  # the positive is the same position
    return T * T * torch.cat(terms).mean()


@pytest.mark.parametrize("changes", [
    dict(kd_weight=0.0, contrastive_weight=1.0),
    dict(kd_weight=0.0, contrastive_weight=1.0, temperature=2.0, contrastive_temperature=0.5, chunk_tokens=4),
    dict(kd_weight=1.0, ce_weight=0.5, contrastive_weight=0.3, chunk_tokens=8),
], ids=["contrastive", "T2-tau0.5-chunk4", "kd+ce+contrastive"])
def test_contrastive_loss_and_gradient_equal_a_full_tensor_reference(runtime, changes):
    """Its value and gradient (autograd through the reference) and, with KD and CE, the
    weighted sum of the three terms; padding columns get no gradient."""
    cfg = loss_config(vocab_size=200, **changes)
    z, y, labels = _inputs(seed=5)
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().double().requires_grad_(True)
    total, kd, ce, con = logit_loss(z1, y, labels, cfg)
    ref_con = _contrastive_reference(z2, y, cfg)
    ref_kl, ref_ce = _reference(z2, y, labels, dataclasses.replace(cfg, kd_weight=1.0, ce_weight=1.0))[1:]
    ref_total = cfg.kd_weight * ref_kl + cfg.ce_weight * ref_ce + cfg.contrastive_weight * ref_con
    total.backward()
    ref_total.backward()
    T, tau = cfg.temperature, cfg.contrastive_temperature
    max_logit = max(z.abs().max().item(), y.abs().max().item()) / min(T, 1.0)
    # the similarities are sums over 200 log-probabilities (each within the log-softmax
    # error) weighted by probabilities summing to 1, divided by tau; the InfoNCE of a
    # position is a log-softmax over the chunk's similarities, scaled by T^2
    tol = log_softmax_sum(200, max_logit) / min(tau, 1.0) * 4 * max(T * T, 1.0)
    assert abs(con.item() - ref_con.item()) <= tol
    assert abs(total.item() - ref_total.item()) <= tol * (cfg.kd_weight + cfg.ce_weight + cfg.contrastive_weight)
    ref_grad = torch.zeros_like(z2.grad)
    ref_grad[..., :200] = z2.grad[..., :200]
    assert (z1.grad.double() - ref_grad).abs().max().item() <= tol * ref_grad.abs().max().item()
    assert z1.grad[..., 200:].abs().max() == 0


def test_a_micro_batch_without_a_weighted_token_gets_a_zero_gradient(runtime):
    """Every token weighted 0 (a micro-batch of prompt tokens only): no term is computed,
    and the gradient is zero, not whatever its buffer held (a freed buffer of its size,
    full of NaN, is there for the taking)."""
    cfg = loss_config(vocab_size=200, ce_weight=0.5)
    z, y, labels = _inputs(seed=4)
    none = torch.zeros(labels.shape)
    for _ in range(3):
        junk = torch.full_like(z, float("nan"))
        del junk
        z1 = z.clone().requires_grad_(True)
        total = logit_loss(z1, y, labels, cfg, none, none)[0]
        total.backward()
        assert total.item() == 0.0
        assert torch.equal(z1.grad, torch.zeros_like(z1.grad))


def test_a_contrastive_chunk_longer_than_a_cpu_pass_keeps_all_its_negatives(runtime):
    """A CPU runs the loss in passes of at most CPU_CHUNK_TOKENS tokens, except with the
    contrastive term: its negatives are every position of a --logit-chunk."""
    chunk = 2 * CPU_CHUNK_TOKENS
    cfg = loss_config(vocab_size=200, kd_weight=1.0, contrastive_weight=1.0, chunk_tokens=chunk)
    z, y, labels = _inputs(seed=3, tokens=(2, chunk))
    con = logit_loss(z, y, labels, cfg)[3]
    ref = _contrastive_reference(z.double(), y, cfg)
    shorter = _contrastive_reference(z.double(), y, dataclasses.replace(cfg, chunk_tokens=CPU_CHUNK_TOKENS))
    max_logit = max(z.abs().max().item(), y.abs().max().item())
    tol = log_softmax_sum(200, max_logit) * 4
    assert abs(con.item() - ref.item()) <= tol
    assert abs(shorter.item() - ref.item()) > 10 * tol  # fewer negatives: another loss


def test_contrastive_loss_prefers_the_student_that_tells_positions_apart(runtime):
    """A student that predicts one distribution at every position (the teacher's average)
    scores at least log(n) for n positions, whatever that distribution is (its similarities
    do not depend on the position i, and logsumexp_j s_j >= log n + mean_j s_j); a student
    that matches each position's distribution scores far below it."""
    z, y, labels = _inputs(seed=7, tokens=(1, 8))
    cfg = loss_config(vocab_size=200, kd_weight=0.0, contrastive_weight=1.0)
    probs = torch.softmax(y[..., :200].double(), -1)
    average = probs.mean(dim=1, keepdim=True).log().expand_as(probs).float()
    average = torch.cat([average, torch.zeros_like(y[..., 200:])], dim=-1).contiguous()
    con_matching = logit_loss(y.clone(), y, labels, cfg)[3].item()
    con_average = logit_loss(average, y, labels, cfg)[3].item()
    # float32 similarities: log-softmax sums over 200 entries of logits up to max|y|
    assert con_average >= math.log(8) - log_softmax_sum(200, y.abs().max().item()) * 4
    assert con_matching < 0.5 * math.log(8)
