"""Distillation losses, memory-lean and correct under a vocabulary split across TP ranks.

Logit loss, per token, with temperature T, student logits z and teacher logits y
(p = softmax(z / T), q = softmax(y / T), both over the whole vocabulary):

    forward KL:  T^2 * sum_v q_v (log q_v - log p_v)        dL/dz = T (p - q)
    reverse KL:  T^2 * sum_v p_v (log p_v - log q_v)        dL/dz = T p (log p - log q - KL)
    cross-entropy with the labels (T = 1):  lse(z) - z_label        dL/dz = softmax(z) - onehot

The T^2 factor keeps gradient magnitudes independent of T (Hinton et al.), which
NVIDIA's reference omits.

Contrastive distillation (``contrastive_weight``): InfoNCE (van den Oord et al. 2018), the
objective of contrastive representation distillation (Tian et al., ICLR 2020), with the
tokens' output distributions as the representations and the other positions of a chunk
as the negatives. With s_ij = sum_v q_jv log p_iv (the log-likelihood the student at
position i gives the teacher's distribution at position j) and tau its temperature,

    contrastive_i = T^2 * (logsumexp_j(s_ij / tau) - s_ii / tau)
    dL/dz_i = (T / tau) (sum_j a_ij q_j - q_i),   a_ij = softmax_j(s_ij / tau)

The positive term s_ii is -H(q_i) - KL(q_i || p_i), so the loss pulls p_i towards q_i as
forward KL does, and pushes it away from the teacher's distributions at the other
positions (a student that predicts the same distribution everywhere loses). The [chunk,
chunk] similarities are summed over the TP ranks' vocabulary shards. With ``top_k``, the teacher distribution keeps only its k
largest logits (found across all TP shards) and is renormalised over them.

A teacher can also come from a cache (``SparseTeacher``: per token its top-K
log-probabilities q_i, i in S, and the log of the remaining mass q_R = 1 - sum_S q_i).
Forward KL then treats the vocabulary outside S as one bucket on both sides,

    KL = sum_{i in S} q_i (log q_i - log p_i) + q_R (log q_R - log p_R),   p_R = sum_{j not in S} p_j
    dKL/dz_j = T (p_j - q_j)  (j in S),    T (p_j - q_R p_j / p_R)  (j not in S)

(the bucket's teacher mass is spread over its tokens as the student spreads its own).
With K = vocabulary it is exactly the full forward KL. The student's log-softmax is
still over the whole vocabulary; each TP rank handles the cached ids in its shard.

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
from megatron.core import parallel_state as ps

from nemo_minitron.config import default_of
from nemo_minitron.distill.config import DistillConfig


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
    balance: bool = default_of(DistillConfig, "kd_balance")
    #: weight of cross-entropy on synthetic samples (the teacher's generations) in a run that
    #: mixes them with real data (per-token weights, ``token_weights``)
    synthetic_weight: float = default_of(DistillConfig, "synthetic_weight")
    #: weight and softmax temperature of the contrastive term (module docstring)
    contrastive_weight: float = default_of(DistillConfig, "contrastive_weight")
    contrastive_temperature: float = default_of(DistillConfig, "contrastive_temperature")

    @classmethod
    def of(cls, cfg, vocab_size: int | None, **changes) -> "LogitLossConfig":
        """From a DistillConfig, or from a TrainingConfig (plain fine-tuning: cross-entropy only)."""
        if isinstance(cfg, DistillConfig) and cfg.method == "synthetic":  # cross-entropy on generations only
            loss = cls(temperature=1.0, kind="forward", top_k=None, kd_weight=0.0, ce_weight=cfg.synthetic_weight,
                       chunk_tokens=cfg.logit_chunk, vocab_size=vocab_size, synthetic_weight=cfg.synthetic_weight)
        elif isinstance(cfg, DistillConfig):
            loss = cls(temperature=cfg.kd_temperature, kind=cfg.kd_loss, top_k=cfg.kd_top_k, kd_weight=cfg.kd_weight,
                       ce_weight=cfg.ce_weight, chunk_tokens=cfg.logit_chunk, vocab_size=vocab_size,
                       balance=cfg.kd_balance, synthetic_weight=cfg.synthetic_weight,
                       contrastive_weight=cfg.contrastive_weight, contrastive_temperature=cfg.contrastive_temperature)
        else:
            loss = cls(temperature=1.0, kind="forward", top_k=None, kd_weight=0.0, ce_weight=1.0,
                       chunk_tokens=cfg.logit_chunk, vocab_size=vocab_size)
        return dataclasses.replace(loss, **changes)


@dataclasses.dataclass
class SparseTeacher:
    """A teacher distribution kept as its top-K, at the loss's temperature: ``ids`` [..., K]
    (global vocabulary ids), ``log_probs`` [..., K] and ``log_rest`` [...] (log of the mass
    outside the top-K; -inf when K is the whole vocabulary)."""

    ids: torch.Tensor
    log_probs: torch.Tensor
    log_rest: torch.Tensor

    def flat(self) -> "SparseTeacher":
        k = self.ids.shape[-1]
        return SparseTeacher(self.ids.reshape(-1, k), self.log_probs.reshape(-1, k), self.log_rest.reshape(-1))

    def __getitem__(self, rows) -> "SparseTeacher":
        return SparseTeacher(self.ids[rows], self.log_probs[rows], self.log_rest[rows])

    def to(self, device) -> "SparseTeacher":
        return SparseTeacher(self.ids.to(device, torch.long), self.log_probs.to(device), self.log_rest.to(device))


def _tp_group_info():
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
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with no column left: -inf below
        total = _all_reduce((local - m).exp(), dist.ReduceOp.SUM, self.group, self.size)
        return m + total.log()

    def log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        """log-softmax over the whole vocabulary of x [c, valid] (float32), a new tensor: on one
        rank PyTorch's fused kernel (row by row, in cache), else x - lse(x)."""
        return torch.log_softmax(x, dim=-1) if self.size == 1 else x - self.lse(x)

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


def _scaled_view(x: torch.Tensor, T: float) -> torch.Tensor:
    """x / T in float32, read-only: x itself when it already is that (no copy)."""
    return x if x.dtype == torch.float32 and T == 1 else _scaled(x, T)


def _chunk_terms(z: torch.Tensor, y: torch.Tensor | None, labels: torch.Tensor | None, cfg: LogitLossConfig,
                 shard: _Shard, want_grad: bool, kd_scale=None, ce_scale=None):
    """Per-token losses (kd, ce) of one chunk and, if asked, d(weighted sum)/dz over the valid columns.
    The weights are ``cfg``'s, or per token ``kd_scale``/``ce_scale`` [c, 1] (then ``cfg``'s
    weights only say whether a term is computed at all).

    A dense teacher: both sides' log-probabilities come from one log-softmax each (on one
    rank a single fused pass per row, in cache), and every term is a few passes over them;
    nothing is copied that is not written to. Returns (kd, ce, contrastive, grad); the
    contrastive term has ``cfg``'s weight."""
    T = cfg.temperature
    kd_scale = cfg.kd_weight if kd_scale is None else kd_scale
    ce_scale = cfg.ce_weight if ce_scale is None else ce_scale
    z = z[:, :shard.valid]
    kd = ce = con = grad = None
    want_ce = labels is not None and cfg.ce_weight != 0
    log_p = None  # log softmax(z / T), kept intact while the cross-entropy (T = 1) still needs it
    if isinstance(y, SparseTeacher) and cfg.kd_weight != 0:
        zs = _scaled(z, T)
        kd, grad = _sparse_forward_kl(zs, shard.lse(zs), y, shard, T, kd_scale if want_grad else None)
    elif y is not None and not isinstance(y, SparseTeacher) and (cfg.kd_weight != 0 or cfg.contrastive_weight != 0):
        zs = _scaled_view(z, T)
        log_p = shard.log_softmax(zs)
        if cfg.top_k is not None:
            ys = _scaled(y[:, :shard.valid], T)
            ys.masked_fill_(~shard.top_k_mask(ys, cfg.top_k), float("-inf"))
            log_q = shard.log_softmax(ys)
        else:
            log_q = shard.log_softmax(_scaled_view(y[:, :shard.valid], T))
        q = log_q.exp()
        if cfg.contrastive_weight != 0:
            con, grad = _contrastive(zs, q, shard, T, cfg.contrastive_temperature,
                                     cfg.contrastive_weight if want_grad else None)
        keep_log_p = want_ce and T == 1
        if cfg.kd_weight == 0:
            pass
        elif cfg.kind == "forward":
            diff = log_q.sub_(log_p)  # log q - log p, in place of log q
            if cfg.top_k is not None:
                diff.masked_fill_(q == 0, 0.0)  # outside the top-k: q = 0 and log q = -inf
            kd = shard.sum(torch.linalg.vecdot(q, diff)) * T * T
            if want_grad:
                p = log_p.exp() if keep_log_p else log_p.exp_()
                g = _scale(p.sub_(q), kd_scale * T)                                 # T (p - q)
                grad = g if grad is None else grad.add_(g)
                log_p = log_p if keep_log_p else None
        else:
            p = log_p.exp()
            log_ratio = log_p.sub(log_q) if keep_log_p else log_p.sub_(log_q)      # log p - log q
            kl = shard.sum(torch.linalg.vecdot(p, log_ratio))
            kd = kl * T * T
            if want_grad:
                g = _scale(log_ratio.sub_(kl.unsqueeze(-1)).mul_(p), kd_scale * T)  # T p (log p/q - KL)
                grad = g if grad is None else grad.add_(g)
            log_p = log_p if keep_log_p else None
    if want_ce:
        log_p1 = log_p if T == 1 and log_p is not None else shard.log_softmax(_scaled_view(z, 1.0))
        local = labels - shard.start
        mine = (local >= 0) & (local < log_p1.shape[-1])
        picked = log_p1.gather(-1, local.clamp(0, max(log_p1.shape[-1] - 1, 0)).unsqueeze(-1)).squeeze(-1)
        ce = -shard.sum(torch.where(mine, picked, torch.zeros_like(picked)))
        if want_grad:
            g = log_p1.exp_()  # nothing reads the log-probabilities after this
            g[mine.nonzero(as_tuple=True)[0], local[mine]] -= 1.0
            g = _scale(g, ce_scale)
            grad = g if grad is None else grad.add_(g)
    return kd, ce, con, grad


def _scale(g: torch.Tensor, factor) -> torch.Tensor:
    """g * factor in place (a number or per-token [c, 1]); a pass saved when it is 1."""
    return g if isinstance(factor, (int, float)) and factor == 1 else g.mul_(factor)


def _contrastive(zs: torch.Tensor, q: torch.Tensor, shard: _Shard, T: float, tau: float, weight: float | None):
    """The contrastive term of one chunk (module docstring): zs [c, valid] the student's
    logits / T, q [c, valid] the teacher's probabilities. Returns (T^2 InfoNCE
    per token [c], weight * its gradient over the valid columns, or None)."""
    # s_ij = sum_v q_jv (z'_iv - lse_i): the shift by lse_i is the same for every j of row i
    # and cancels in the softmax over j and in the positive, so z' stands in for log p
    sim = shard.sum(zs @ q.T).div_(tau)                 # (s_ij + lse_i) / tau, [c, c]
    lse = torch.logsumexp(sim, dim=-1, keepdim=True)
    con = (lse.squeeze(-1) - sim.diagonal()) * T * T
    if weight is None:
        return con, None
    a = sim.sub_(lse).exp_()                            # softmax over the positions j
    return con, (a @ q).sub_(q).mul_(weight * T / tau)


def _sparse_forward_kl(zs: torch.Tensor, lse_z: torch.Tensor, teacher: SparseTeacher, shard: _Shard, T: float,
                       weight: float | None):
    """Forward KL against a top-K teacher with its remainder bucket (module docstring), for
    one chunk: zs [c, valid] the student's logits / T (float32, overwritten), lse_z [c, 1].
    Returns (T^2 KL per token [c], weight * dL/dz over the valid columns, or None)."""
    # the stored values are rounded (bf16): renormalise top-K + bucket into a distribution
    log_q, log_r = teacher.log_probs.float(), teacher.log_rest.float().unsqueeze(-1)
    norm = torch.logsumexp(torch.cat([log_q, log_r], dim=-1), dim=-1, keepdim=True)
    log_q, log_r = log_q - norm, log_r - norm
    q = log_q.exp()
    local = teacher.ids - shard.start
    mine = (local >= 0) & (local < zs.shape[-1])          # the cached ids this rank holds
    cols = torch.where(mine, local, torch.zeros_like(local))
    picked = zs.gather(-1, cols)
    # log p_i at the cached ids: each id lives on exactly one rank
    log_p = shard.sum(torch.where(mine, picked, torch.zeros_like(picked))) - lse_z
    p = (zs - lse_z).exp_() if weight is not None else None
    # the student's mass outside the top-K from its own logits (no 1 - sum cancellation):
    # the top-K columns of zs become -inf
    zs[mine.nonzero(as_tuple=True)[0], local[mine]] = float("-inf")
    lse_rest = shard.lse(zs)                              # [c, 1]; -inf when the top-K is everything
    has_rest = torch.isfinite(lse_rest)
    q_r = log_r.exp()
    bucket = torch.where((q_r > 0) & has_rest, q_r * (log_r - (lse_rest - lse_z)), torch.zeros_like(q_r))
    kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1) + bucket.squeeze(-1)
    if weight is None:
        return kl * T * T, None
    # target outside the top-K: q_R p_j / p_R = exp(log q_R + z'_j - lse_rest) (0 on the top-K
    # columns, which hold -inf); on the top-K: q_i
    shift = torch.where(has_rest, log_r - lse_rest, torch.full_like(lse_rest, float("-inf")))
    grad = p.sub_(zs.add_(shift).exp_())
    grad.scatter_add_(-1, cols, torch.where(mine, -q, torch.zeros_like(q)))
    return kl * T * T, grad.mul_(weight * T)


#: tokens a CPU processes at a time: a [128, vocab] float32 chunk (25 MB at vocab 49,152)
#: stays under glibc's largest mmap threshold (32 MB), so its buffers are reused rather than
#: mapped and faulted in afresh, and the loss's passes run mostly in cache (KD forward and
#: backward of 2,048 tokens, one thread: 0.89 s CPU time in chunks of 128, 1.54 s of 1024;
#: docs/benchmarks.md).
CPU_CHUNK_TOKENS = 128


def _rows_per_pass(cfg: LogitLossConfig, device: torch.device) -> int:
    """Tokens per pass of ``_sums``: ``cfg.chunk_tokens``, at most CPU_CHUNK_TOKENS on a CPU
    unless the contrastive term is on (its negatives are the other positions of a chunk,
    so there the chunk is part of the loss's definition)."""
    if device.type == "cpu" and cfg.contrastive_weight == 0:
        return min(cfg.chunk_tokens, CPU_CHUNK_TOKENS)
    return cfg.chunk_tokens


def _sums(z, y, lab, cfg: LogitLossConfig, shard: _Shard, grad: torch.Tensor | None, weights=None):
    """(weighted total, KD sum, CE sum, contrastive sum) over all chunks (float64); the
    gradient into ``grad`` if given. ``weights``: per-token (kd, ce) weights [N]; then the KD
    and CE sums are over the tokens each applies to."""
    zero = lambda: torch.zeros((), dtype=torch.float64, device=z.device)  # noqa: E731
    total, kd_sum, ce_sum, con_sum = zero(), zero(), zero(), zero()
    rows = _rows_per_pass(cfg, z.device)
    with torch.no_grad():
        for i in range(0, z.shape[0], rows):
            sl = slice(i, i + rows)
            kd_w, ce_w = (None, None) if weights is None else (weights[0][sl], weights[1][sl])
            kd, ce, con, g = _chunk_terms(z[sl], None if y is None else y[sl], None if lab is None else lab[sl],
                                        cfg, shard, want_grad=grad is not None,
                                        kd_scale=None if kd_w is None else kd_w.unsqueeze(-1),
                                        ce_scale=None if ce_w is None else ce_w.unsqueeze(-1))
            if g is not None:
                grad[sl, :shard.valid] = g
            elif grad is not None:  # no term: a zero gradient
                grad[sl, :shard.valid] = 0.0
            if con is not None:
                con_sum += con.double().sum()
                total += cfg.contrastive_weight * con.double().sum()
            for term, w, which in ((kd, kd_w, 0), (ce, ce_w, 1)):
                if term is None:
                    continue
                term = term.double()
                if w is None:
                    part = term.sum()
                    total += (cfg.kd_weight if which == 0 else cfg.ce_weight) * part
                else:
                    total += (term * w.double()).sum()
                    part = torch.where(w > 0, term, torch.zeros_like(term)).sum()
                if which == 0:
                    kd_sum += part
                else:
                    ce_sum += part
    return total, kd_sum, ce_sum, con_sum


class LogitDistillation(torch.autograd.Function):
    """Sum over tokens of kd_weight * KD + ce_weight * CE + contrastive_weight * contrastive,
    chunked; returns (total, kd_sum, ce_sum, contrastive_sum).
    With per-token ``weights`` (kd [N], ce [N]) those replace the config's weights.

    The gradient is computed chunk by chunk in the forward pass (where every softmax
    statistic is at hand) and kept in the logits' own dtype until backward, which only
    scales it: one [tokens, vocab] tensor of the input dtype instead of several float32
    ones, and about half the passes over the logits of a recomputing backward."""

    @staticmethod
    def forward(ctx, student, teacher, labels, cfg: LogitLossConfig, weights=None):
        shard = _Shard(student.shape[-1], cfg.vocab_size)
        z = student.reshape(-1, student.shape[-1])
        if isinstance(teacher, SparseTeacher):
            y = teacher.flat()
            require_forward = cfg.kind == "forward" and cfg.top_k is None
            assert require_forward, "a cached (top-K) teacher takes forward KL without a further top-k"
        else:
            y = None if teacher is None else teacher.reshape(-1, teacher.shape[-1])
        lab = None if labels is None else labels.reshape(-1)
        want_grad = ctx.needs_input_grad[0]
        grad = None
        if want_grad:  # every chunk writes its valid columns; the padding columns get a zero gradient
            grad = torch.empty_like(z)
            grad[:, shard.valid:] = 0.0
        weights_cfg = cfg
        assert weights is None or not cfg.contrastive_weight, "the contrastive loss takes no per-token weights"
        if weights is not None:  # the config's weights now only say which terms are computed
            kd_w, ce_w = (w.reshape(-1).to(torch.float32) for w in weights)
            weights = (kd_w if y is not None else torch.zeros_like(kd_w), ce_w)
            weights_cfg = dataclasses.replace(cfg, kd_weight=float(bool((weights[0] > 0).any())),
                                              ce_weight=float(bool((ce_w > 0).any())))
        if cfg.balance and y is not None:  # a first pass for the two means, then the weighted gradient
            _, kd_sum, ce_sum, _ = _sums(z, y, lab, weights_cfg, shard, None, weights)
            n_kd = float((weights[0] > 0).sum()) if weights is not None else 1.0
            n_ce = float((weights[1] > 0).sum()) if weights is not None else 1.0
            ratio = float((ce_sum / n_ce) / (kd_sum / n_kd)) if kd_sum > 0 and ce_sum > 0 else 0.0
            if weights is None:
                weights_cfg = dataclasses.replace(cfg, kd_weight=cfg.kd_weight * ratio)
            else:
                weights = (weights[0] * ratio, weights[1])
        total, kd_sum, ce_sum, con_sum = _sums(z, y, lab, weights_cfg, shard, grad, weights)
        ctx.save_for_backward(grad)
        ctx.student_shape = student.shape
        ctx.mark_non_differentiable(kd_sum, ce_sum, con_sum)
        return total.float(), kd_sum.float(), ce_sum.float(), con_sum.float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_kd, _grad_ce, _grad_con):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_total).reshape(ctx.student_shape), None, None, None, None


def sparse_teacher(logits: torch.Tensor, top_k: int, temperature: float, vocab_size: int | None,
                   chunk_tokens: int = default_of(DistillConfig, "logit_chunk")) -> SparseTeacher:
    """The top-K of a teacher's vocab-parallel logits [..., V/tp] at temperature T, over the
    whole vocabulary (padding excluded): global ids, log-probabilities and the log of the
    remaining mass, as float32 on every TP rank. Chunked like the loss."""
    shard = _Shard(logits.shape[-1], vocab_size)
    flat = logits.reshape(-1, logits.shape[-1])
    ids, log_probs, log_rest = [], [], []
    with torch.no_grad():
        for i in range(0, flat.shape[0], chunk_tokens):
            ys = _scaled(flat[i:i + chunk_tokens, :shard.valid], temperature)
            lse = shard.lse(ys)
            k_local = min(top_k, ys.shape[-1])
            values, local = ys.topk(k_local, dim=-1)
            if k_local < top_k:  # a small shard: pad with -inf candidates
                pad = top_k - k_local
                values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], dim=-1)
                local = torch.cat([local, local.new_zeros((local.shape[0], pad))], dim=-1)
            glob = local + shard.start
            if shard.size > 1:
                vs, gs = [torch.empty_like(values) for _ in range(shard.size)], [torch.empty_like(glob)
                                                                                 for _ in range(shard.size)]
                dist.all_gather(vs, values.contiguous(), group=shard.group)
                dist.all_gather(gs, glob.contiguous(), group=shard.group)
                values, glob = torch.cat(vs, dim=-1), torch.cat(gs, dim=-1)
            values, pick = values.topk(top_k, dim=-1)
            glob = glob.gather(-1, pick)
            # the mass outside the top-K: this rank's columns without the chosen ids
            mine = (glob >= shard.start) & (glob < shard.start + ys.shape[-1])
            rows = mine.nonzero(as_tuple=True)[0]
            ys[rows, glob[mine] - shard.start] = float("-inf")
            ids.append(glob)
            log_probs.append(values - lse)
            log_rest.append((shard.lse(ys) - lse).squeeze(-1))
    lead = logits.shape[:-1]
    return SparseTeacher(torch.cat(ids).reshape(*lead, top_k), torch.cat(log_probs).reshape(*lead, top_k),
                         torch.cat(log_rest).reshape(lead))


def logit_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None,
               cfg: LogitLossConfig, kd_weights: torch.Tensor | None = None,
               ce_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """Mean over tokens of (kd_weight * KD + ce_weight * CE + contrastive_weight *
    contrastive), and the mean KD, CE and contrastive terms for logs.

    ``student``/``teacher``: vocab-parallel logits [..., V/tp]; ``labels``: [...] token ids.
    ``kd_weights``/``ce_weights`` [...] (both or neither): per-token weights in place of the
    config's; the mean is then over the tokens with any weight (a prompt's tokens, weighted
    0, do not count), and KD's and CE's over the tokens each applies to."""
    if kd_weights is None and ce_weights is None:
        tokens = student.numel() // student.shape[-1]
        total, kd, ce, con = LogitDistillation.apply(student, teacher, labels, cfg)
        return total / tokens, kd / tokens, ce / tokens, con / tokens
    kd_w, ce_w = kd_weights.reshape(-1).float(), ce_weights.reshape(-1).float()
    if teacher is None:
        kd_w = torch.zeros_like(kd_w)
    total, kd, ce, con = LogitDistillation.apply(student, teacher, labels, cfg, (kd_w, ce_w))
    count = lambda mask: mask.sum().clamp(min=1).to(total.dtype)  # noqa: E731
    return (total / count((kd_w > 0) | (ce_w > 0)), kd / count(kd_w > 0), ce / count(ce_w > 0),
            con / count(kd_w > 0))


def intermediate_loss(student_state: torch.Tensor, teacher_state: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Mean over tokens; states [..., hidden] of equal width (project the student first)."""
    s, t = student_state.float(), teacher_state.float().detach()
    if kind == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean()
    s = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + 1e-6)
    t = t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-6)
    return (s - t).square().mean()
