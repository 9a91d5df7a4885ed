"""Distillation losses, memory-lean and correct under a vocabulary split across TP ranks.

Logit loss, per token, with temperature T, student logits z and teacher logits y
(p = softmax(z / T), q = softmax(y / T), both over the whole vocabulary):

    forward KL:  T^2 * sum_v q_v (log q_v - log p_v)        dL/dz = T (p - q)
    reverse KL:  T^2 * sum_v p_v (log p_v - log q_v)        dL/dz = T p (log p - log q - KL)
    cross-entropy with the labels (T = 1):  lse(z) - z_label        dL/dz = softmax(z) - onehot

The T^2 factor keeps gradient magnitudes independent of T (Hinton et al.), which
NVIDIA's reference omits. With ``top_k``, the teacher distribution keeps only its k
largest logits (found across all TP shards) and is renormalised over them.

``LogitDistillation`` processes the tokens in chunks and computes the gradient in the
same pass, so no [tokens, vocab] float32 tensor of either model is ever held whole: the
extra memory is a few [chunk, vocab / tp] float32 tensors plus the gradient in the
logits' own dtype (bf16 in training). Softmax statistics (max, sum of
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
    """The logit loss's parameters, resolved from a training config (``of``): its defaults
    live in ``distill.config`` only."""

    temperature: float
    kind: str                    # forward | reverse KL
    top_k: int | None
    kd_weight: float
    ce_weight: float
    chunk_tokens: int
    vocab_size: int | None       # true vocabulary; columns beyond it are padding
    #: rescale the KD term to the CE term's magnitude in every micro-batch (weight
    #: kd_weight * CE/KD, the ratio held constant in backward): ModelOpt's balancer with
    #: ``skip_lm_loss: false``. Costs a second pass over the logits.
    balance: bool = False

    @classmethod
    def of(cls, cfg, vocab_size: int | None, **changes) -> "LogitLossConfig":
        """From a DistillConfig, or from a TrainingConfig (plain fine-tuning: cross-entropy only)."""
        from nemo_minitron.distill.config import DistillConfig

        if isinstance(cfg, DistillConfig):
            loss = cls(temperature=cfg.kd_temperature, kind=cfg.kd_loss, top_k=cfg.kd_top_k, kd_weight=cfg.kd_weight,
                       ce_weight=cfg.ce_weight, chunk_tokens=cfg.logit_chunk, vocab_size=vocab_size,
                       balance=cfg.kd_balance)
        else:
            loss = cls(temperature=1.0, kind="forward", top_k=None, kd_weight=0.0, ce_weight=1.0,
                       chunk_tokens=cfg.logit_chunk, vocab_size=vocab_size)
        return dataclasses.replace(loss, **changes)


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
    """What one TP rank needs to compute softmaxes over the whole vocabulary.

    Vocabulary padding is the tail of the global vocabulary, so on every rank the valid
    columns are a prefix: ``valid`` of the ``local`` columns take part, the rest are cut off."""

    def __init__(self, local_vocab: int, vocab_size: int | None) -> None:
        self.group, rank, self.size = _tp_group_info()
        self.start = rank * local_vocab
        self.local = local_vocab
        end = local_vocab if vocab_size is None else min(local_vocab, max(0, vocab_size - self.start))
        self.valid = end

    def lse(self, x: torch.Tensor) -> torch.Tensor:
        """log-sum-exp over the whole vocabulary of x [c, valid] (float32) -> [c, 1]."""
        local = torch.logsumexp(x, dim=-1, keepdim=True) if x.shape[-1] else \
            torch.full((x.shape[0], 1), float("-inf"), device=x.device)
        if self.size == 1:
            return local
        m = _all_reduce(local.clone(), dist.ReduceOp.MAX, self.group, self.size)
        total = _all_reduce((local - m).exp(), dist.ReduceOp.SUM, self.group, self.size)
        return m + total.log()

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


def _scaled(x: torch.Tensor, T: float) -> torch.Tensor:
    """A float32 copy of x / T (always a copy: the caller works on it in place)."""
    out = x.to(torch.float32, copy=True)
    return out if T == 1 else out.div_(T)


def _chunk_terms(z: torch.Tensor, y: torch.Tensor | None, labels: torch.Tensor | None, cfg: LogitLossConfig,
                 shard: _Shard, want_grad: bool):
    """Per-token losses (kd, ce) of one chunk and, if asked, d(weighted sum)/dz over the valid columns.

    Written with log q - log p = (y' - z') - (lse(y') - lse(z')), y' = y/T, z' = z/T, so each
    term costs a few passes over the chunk and no log-probability tensors are built.
    Returns (kd, ce, grad, (lse_z, lse_y))."""
    T = cfg.temperature
    z = z[:, :shard.valid]
    kd = ce = grad = None
    zs = _scaled(z, T)
    lse_z = shard.lse(zs)
    lse_y = None
    if y is not None and cfg.kd_weight != 0:
        ys = _scaled(y[:, :shard.valid], T)
        if cfg.top_k is not None:
            ys.masked_fill_(~shard.top_k_mask(ys, cfg.top_k), float("-inf"))
        lse_y = shard.lse(ys)
        q = (ys - lse_y).exp_()
        if cfg.kind == "forward":
            diff = ys.sub_(zs)  # y' - z', in place of y'
            if cfg.top_k is not None:
                diff.masked_fill_(q == 0, 0.0)  # outside the top-k: q = 0 and y' = -inf
            kl = shard.sum(torch.linalg.vecdot(q, diff)) - lse_y.squeeze(-1) + lse_z.squeeze(-1)
            kd = kl * T * T
            if want_grad:
                grad = (zs - lse_z).exp_().sub_(q).mul_(cfg.kd_weight * T)        # T (p - q)
        else:
            log_p = zs - lse_z
            p = log_p.exp()
            log_ratio = log_p.sub_((ys - lse_y))                               # log p - log q
            kl = shard.sum(torch.linalg.vecdot(p, log_ratio))
            kd = kl * T * T
            if want_grad:
                grad = log_ratio.sub_(kl.unsqueeze(-1)).mul_(p).mul_(cfg.kd_weight * T)  # T p (log p/q - KL)
    if labels is not None and cfg.ce_weight != 0:
        z1 = zs if T == 1 else _scaled(z, 1.0)
        lse_1 = lse_z if T == 1 else shard.lse(z1)
        local = labels - shard.start
        mine = (local >= 0) & (local < z1.shape[-1])
        picked = z1.gather(-1, local.clamp(0, max(z1.shape[-1] - 1, 0)).unsqueeze(-1)).squeeze(-1)
        ce = lse_1.squeeze(-1) - shard.sum(torch.where(mine, picked, torch.zeros_like(picked)))
        if want_grad:
            g = (z1 - lse_1).exp_()
            g[mine.nonzero(as_tuple=True)[0], local[mine]] -= 1.0
            g.mul_(cfg.ce_weight)
            grad = g if grad is None else grad.add_(g)
    return kd, ce, grad, (lse_z, lse_y)


def _sums(z, y, lab, cfg: LogitLossConfig, shard: _Shard, grad: torch.Tensor | None):
    """Token sums of KD and CE over all chunks (float64); the gradient into ``grad`` if given."""
    kd_sum = torch.zeros((), dtype=torch.float64, device=z.device)
    ce_sum = torch.zeros((), dtype=torch.float64, device=z.device)
    with torch.no_grad():
        for i in range(0, z.shape[0], cfg.chunk_tokens):
            sl = slice(i, i + cfg.chunk_tokens)
            kd, ce, g, _ = _chunk_terms(z[sl], None if y is None else y[sl], None if lab is None else lab[sl],
                                        cfg, shard, want_grad=grad is not None)
            if g is not None:
                grad[sl, :shard.valid] = g
            if kd is not None:
                kd_sum += kd.double().sum()
            if ce is not None:
                ce_sum += ce.double().sum()
    return kd_sum, ce_sum


class LogitDistillation(torch.autograd.Function):
    """Sum over tokens of kd_weight * KD + ce_weight * CE, chunked; returns (total, kd_sum, ce_sum).

    The gradient is computed chunk by chunk in the forward pass (where every softmax
    statistic is at hand) and kept in the logits' own dtype until backward, which only
    scales it: one [tokens, vocab] tensor of the input dtype instead of several float32
    ones, and about half the passes over the logits of a recomputing backward."""

    @staticmethod
    def forward(ctx, student, teacher, labels, cfg: LogitLossConfig):
        shard = _Shard(student.shape[-1], cfg.vocab_size)
        z = student.reshape(-1, student.shape[-1])
        y = None if teacher is None else teacher.reshape(-1, teacher.shape[-1])
        lab = None if labels is None else labels.reshape(-1)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(z) if want_grad else None  # padding columns keep a zero gradient
        weights = cfg
        if cfg.balance and y is not None:  # a first pass for the two sums, then the weighted gradient
            kd_sum, ce_sum = _sums(z, y, lab, cfg, shard, None)
            ratio = float(ce_sum / kd_sum) if kd_sum > 0 and ce_sum > 0 else 0.0
            weights = dataclasses.replace(cfg, kd_weight=cfg.kd_weight * ratio)
        kd_sum, ce_sum = _sums(z, y, lab, weights, shard, grad)
        ctx.save_for_backward(grad)
        ctx.student_shape = student.shape
        total = (weights.kd_weight * kd_sum + weights.ce_weight * ce_sum).float()
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return total, kd_sum.float(), ce_sum.float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_total).reshape(ctx.student_shape), None, None, None


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
