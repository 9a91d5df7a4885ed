"""Distillation losses, memory-lean and correct under a vocabulary split across TP ranks.

Logit loss, per token, with temperature T, student logits z and teacher logits y
(p = softmax(z / T), q = softmax(y / T), both over the whole vocabulary):

    forward KL:  T^2 * sum_v q_v (log q_v - log p_v)        dL/dz = T (p - q)
    reverse KL:  T^2 * sum_v p_v (log p_v - log q_v)        dL/dz = T p (log p - log q - KL)
    cross-entropy with the labels (T = 1):  lse(z) - z_label        dL/dz = softmax(z) - onehot

The T^2 factor keeps gradient magnitudes independent of T (Hinton et al.), which
NVIDIA's reference omits. With ``top_k``, the teacher distribution keeps only its k
largest logits (found across all TP shards) and is renormalised over them.

``LogitDistillation`` processes the tokens in chunks, in forward and again (recomputed)
in backward, so no [tokens, vocab] float32 tensor of either model is ever held whole:
the extra memory is a few [chunk, vocab / tp] tensors. Softmax statistics (max, sum of
exponentials) and per-token sums are all-reduced over the tensor-parallel group; padded
vocabulary columns (ids >= vocab_size) are excluded everywhere.

Intermediate losses compare a student layer's output, projected to the teacher's
width, with a teacher layer's output: ``cosine`` (1 - cos, per token) or ``mse`` (of
the two states each divided by its RMS, so the scale of the residual stream does not
dominate).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class LogitLossConfig:
    temperature: float = 1.0
    kind: str = "forward"        # forward | reverse KL
    top_k: int | None = None
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    chunk_tokens: int = 1024
    vocab_size: int | None = None  # true vocabulary; columns beyond it are padding


def _tp_group_info():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, 0, 1
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), \
        ps.get_tensor_model_parallel_world_size()


def _all_reduce(t: torch.Tensor, op, group, size: int) -> torch.Tensor:
    if size > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _Shard:
    """What one TP rank needs to compute softmaxes over the whole (padded) vocabulary."""

    def __init__(self, local_vocab: int, vocab_size: int | None, device) -> None:
        self.group, rank, self.size = _tp_group_info()
        start = rank * local_vocab
        self.start = start
        self.valid = None
        if vocab_size is not None and start + local_vocab > vocab_size:
            self.valid = torch.arange(start, start + local_vocab, device=device) < vocab_size

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.valid is None else x.masked_fill(~self.valid, float("-inf"))

    def log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        """x: [c, V/tp] float32 (padding already -inf) -> log-probabilities over the whole vocabulary."""
        m = _all_reduce(x.max(dim=-1, keepdim=True).values.detach(), dist.ReduceOp.MAX, self.group, self.size)
        s = _all_reduce((x - m).exp().sum(dim=-1, keepdim=True), dist.ReduceOp.SUM, self.group, self.size)
        return x - m - s.log()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(x, dist.ReduceOp.SUM, self.group, self.size)

    def top_k_mask(self, y: torch.Tensor, k: int) -> torch.Tensor:
        """True where the teacher logit is among the row's k largest over the whole vocabulary."""
        local = y.topk(min(k, y.shape[-1]), dim=-1).values
        if self.size > 1:
            parts = [torch.empty_like(local) for _ in range(self.size)]
            dist.all_gather(parts, local.contiguous(), group=self.group)
            local = torch.cat(parts, dim=-1)
        threshold = local.topk(k, dim=-1).values[:, -1:]
        return y >= threshold


def _chunk_terms(z: torch.Tensor, y: torch.Tensor | None, labels: torch.Tensor | None, cfg: LogitLossConfig,
                 shard: _Shard, want_grad: bool):
    """Per-token losses (kd, ce) of one chunk and, if asked, d(weighted sum)/dz."""
    T = cfg.temperature
    zf = shard.mask(z.float())
    kd = ce = None
    grad = torch.zeros_like(zf) if want_grad else None
    if y is not None and cfg.kd_weight != 0:
        yf = shard.mask(y.float())
        if cfg.top_k is not None:
            yf = yf.masked_fill(~shard.top_k_mask(yf, cfg.top_k), float("-inf"))
        log_p = shard.log_softmax(zf / T)
        log_q = shard.log_softmax(yf / T)
        p, q = log_p.exp(), log_q.exp()
        if cfg.kind == "forward":
            # q log q is 0 where q = 0 (padding, or outside the teacher's top-k)
            kd = shard.sum(torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)) * T * T
            if want_grad:
                grad += cfg.kd_weight * T * (p - q)
        else:
            diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
            kl = shard.sum((p * diff).sum(-1))
            kd = kl * T * T
            if want_grad:
                grad += cfg.kd_weight * T * p * (diff - kl.unsqueeze(-1))
    if labels is not None and cfg.ce_weight != 0:
        log_p1 = shard.log_softmax(zf)
        local = labels - shard.start
        mine = (local >= 0) & (local < zf.shape[-1])
        picked = log_p1.gather(-1, local.clamp(0, zf.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        ce = -shard.sum(torch.where(mine, picked, torch.zeros_like(picked)))
        if want_grad:
            g = log_p1.exp()
            g[mine.nonzero(as_tuple=True)[0], local[mine]] -= 1.0
            grad += cfg.ce_weight * g
    return kd, ce, grad


class LogitDistillation(torch.autograd.Function):
    """Sum over tokens of kd_weight * KD + ce_weight * CE, chunked; returns (total, kd_sum, ce_sum)."""

    @staticmethod
    def forward(ctx, student, teacher, labels, cfg: LogitLossConfig):
        shard = _Shard(student.shape[-1], cfg.vocab_size, student.device)
        z = student.reshape(-1, student.shape[-1])
        y = None if teacher is None else teacher.reshape(-1, teacher.shape[-1])
        lab = None if labels is None else labels.reshape(-1)
        kd_sum = torch.zeros((), dtype=torch.float64, device=student.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=student.device)
        with torch.no_grad():
            for i in range(0, z.shape[0], cfg.chunk_tokens):
                sl = slice(i, i + cfg.chunk_tokens)
                kd, ce, _ = _chunk_terms(z[sl], None if y is None else y[sl], None if lab is None else lab[sl],
                                         cfg, shard, want_grad=False)
                if kd is not None:
                    kd_sum += kd.double().sum()
                if ce is not None:
                    ce_sum += ce.double().sum()
        ctx.save_for_backward(student, teacher, labels)
        ctx.cfg = cfg
        total = (cfg.kd_weight * kd_sum + cfg.ce_weight * ce_sum).float()
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return total, kd_sum.float(), ce_sum.float()

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        student, teacher, labels = ctx.saved_tensors
        cfg = ctx.cfg
        shard = _Shard(student.shape[-1], cfg.vocab_size, student.device)
        z = student.reshape(-1, student.shape[-1])
        y = None if teacher is None else teacher.reshape(-1, teacher.shape[-1])
        lab = None if labels is None else labels.reshape(-1)
        grad = torch.empty_like(z)
        with torch.no_grad():
            for i in range(0, z.shape[0], cfg.chunk_tokens):
                sl = slice(i, i + cfg.chunk_tokens)
                _, _, g = _chunk_terms(z[sl], None if y is None else y[sl], None if lab is None else lab[sl],
                                       cfg, shard, want_grad=True)
                if shard.valid is not None:
                    g = g.masked_fill(~shard.valid, 0.0)
                grad[sl] = (g * grad_total).to(grad.dtype)
        return grad.reshape(student.shape), None, None, None


def logit_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None,
               cfg: LogitLossConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over tokens of (kd_weight * KD + ce_weight * CE), and the mean KD and CE for logs.

    ``student``/``teacher``: vocab-parallel logits [..., V/tp]; ``labels``: [...] token ids."""
    tokens = student.numel() // student.shape[-1]
    total, kd, ce = LogitDistillation.apply(student, teacher, labels, cfg)
    return total / tokens, kd / tokens, ce / tokens


def intermediate_loss(student_state: torch.Tensor, teacher_state: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Mean over tokens; states [..., hidden] of equal width (project the student first)."""
    s, t = student_state.float(), teacher_state.float().detach()
    if kind == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean()
    s = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + 1e-6)
    t = t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-6)
    return (s - t).square().mean()
