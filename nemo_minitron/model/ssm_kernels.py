"""Mamba-2 in plain PyTorch: the kernels megatron-core's ``MambaMixer`` calls, for machines
where ``mamba_ssm`` and ``causal_conv1d`` (CUDA/Triton) do not import.

``runtime.cpu_fallback`` puts these in ``megatron.core.ssm.mamba_mixer`` in place of the
missing ones, with the same signatures and semantics, so the mixer itself runs unchanged:
- ``causal_conv1d``: depthwise convolution over the sequence, each output position seeing
  only itself and the ``width - 1`` positions before it, then SiLU;
- ``mamba_chunk_scan_combined``: the SSD scan (Mamba-2's state space duality). Per head,
  ``dt = softplus(dt + dt_bias)`` clamped to ``dt_limit``, ``A = -exp(A_log)`` (given as A),
  state ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T`` and output ``y_t = C_t h_t + D x_t``
  (times ``silu(z)`` when a gate is given). Heads share B and C within ``ngroups`` groups of
  consecutive heads. It is computed chunk by chunk, as the kernels do: within a chunk the
  quadratic (attention-like) form, across chunks the recurrence over chunk-end states;
- ``mamba_split_conv1d_scan_combined``: the training path's fused kernel: split the
  in_proj output ``[z, x, B, C, dt]``, convolve ``[x, B, C]``, scan, then either gate with
  ``silu(z)`` or apply the gated norm;
- ``GatedGroupRMSNorm``: ``mamba_ssm``'s gated RMSNorm, normalising each group of
  ``group_size`` channels separately (Mamba-2's ``ngroups``), gated by ``silu(z)`` before
  the norm (``norm_before_gate=False``, what megatron-core and transformers' NemotronH use)
  or after it.
Everything is differentiable by autograd, so training runs on them as well as prefill.
Sequence packing (``seq_idx``, ``cu_seqlens``) is refused: it needs the CUDA kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NO_LIMIT = (0.0, math.inf)


def _refuse_packing(**packing) -> None:
    used = [k for k, v in packing.items() if v not in (None, False)]
    if used:
        raise NotImplementedError(f"Mamba with packed sequences ({', '.join(used)}) needs the mamba_ssm CUDA kernels")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None) -> torch.Tensor:
    """Depthwise causal convolution. x: [batch, channels, length]; weight: [channels, width]."""
    width = weight.shape[-1]
    out = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    if activation in ("silu", "swish"):
        return F.silu(out)
    if activation is not None:
        raise ValueError(f"causal_conv1d: activation '{activation}' (supported: silu, swish)")
    return out


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, eps: float, group_size: int,
                   norm_before_gate: bool) -> torch.Tensor:
    """RMSNorm over each group of ``group_size`` channels, gated by silu(z); computed in float32."""
    dtype = x.dtype
    x = x.float()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.float())
    groups = x.unflatten(-1, (-1, group_size))
    x = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    out = x * weight.float()
    if z is not None and norm_before_gate:
        out = out * F.silu(z.float())
    return out.to(dtype)


class GatedGroupRMSNorm(torch.nn.Module):
    """``mamba_ssm.ops.triton.layernorm_gated.RMSNorm`` (its constructor, parameters and
    ``forward(x, z=None)``), with megatron-core's sharded checkpoint form (the weight split
    over tensor-parallel ranks along its only dimension, as ``ExtendedRMSNorm`` does)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size or hidden_size
        self.norm_before_gate = norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        # deferred: the kernels above are plain PyTorch and import without megatron-core
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(), dp_cp_group=metadata["dp_cp_group"])


def mamba_chunk_scan_combined(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                              chunk_size: int, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                              dt_bias: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
                              seq_idx=None, chunk_indices=None, chunk_offsets=None, dt_softplus: bool = False,
                              dt_limit: tuple[float, float] = NO_LIMIT, cu_seqlens=None,
                              return_final_states: bool = False, return_varlen_states: bool = False):
    """SSD scan. x: [b, l, heads, head_dim]; dt: [b, l, heads]; A: [heads]; B, C: [b, l, groups,
    state]; D: [heads] or [heads, head_dim]; z: like x; initial_states: [b, heads, head_dim,
    state]. Returns y like x (and the final state [b, heads, head_dim, state], float32)."""
    _refuse_packing(seq_idx=seq_idx, chunk_indices=chunk_indices, chunk_offsets=chunk_offsets,
                    cu_seqlens=cu_seqlens, return_varlen_states=return_varlen_states)
    batch, length, heads, head_dim = x.shape
    state_dim = B.shape[-1]
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    # heads share B and C within groups of consecutive heads
    per_group = heads // B.shape[2]
    B = B.float().repeat_interleave(per_group, dim=2)
    C = C.float().repeat_interleave(per_group, dim=2)
    xf = x.float()

    # zero-padded to whole chunks: a padded step has dt = 0 (no decay, no input)
    pad = (-length) % chunk_size
    chunks = (length + pad) // chunk_size

    def chunked(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, chunks, chunk_size, *t.shape[2:])

    xdt = chunked(xf * dt[..., None])                # b c q h p: the input each step adds
    B, C = chunked(B), chunked(C)                    # b c q h n
    log_decay = chunked(dt * A.float()).cumsum(2)   # b c q h: log of the decay since the chunk start

    # within a chunk: y_t += sum_{s <= t} (C_t . B_s) exp(decay from s to t) dt_s x_s
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    gaps = log_decay[:, :, :, None, :] - log_decay[:, :, None, :, :]                  # b c t s h
    weights = torch.einsum("bcthn,bcshn->bctsh", C, B) * torch.exp(gaps.masked_fill(~causal[..., None], -math.inf))
    y = torch.einsum("bctsh,bcshp->bcthp", weights, xdt)

    # across chunks: the state entering each chunk, decayed to each of its steps
    to_end = torch.exp(log_decay[:, :, -1:, :] - log_decay)                            # b c q h
    chunk_inputs = torch.einsum("bcsh,bcshn,bcshp->bchpn", to_end, B, xdt)
    chunk_decay = torch.exp(log_decay[:, :, -1, :])                                   # b c h
    state = (initial_states.float() if initial_states is not None
             else xf.new_zeros(batch, heads, head_dim, state_dim))
    carried = []
    for c in range(chunks):
        carried.append(torch.einsum("bthn,bhpn->bthp", C[:, c], state) * torch.exp(log_decay[:, c])[..., None])
        state = state * chunk_decay[:, c, :, None, None] + chunk_inputs[:, c]
    y = (y + torch.stack(carried, dim=1)).reshape(batch, chunks * chunk_size, heads, head_dim)[:, :length]

    if D is not None:
        y = y + xf * (D.float()[:, None] if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, state) if return_final_states else y


def mamba_split_conv1d_scan_combined(zxbcdt: torch.Tensor, conv1d_weight: torch.Tensor,
                                     conv1d_bias: torch.Tensor | None, dt_bias: torch.Tensor, A: torch.Tensor,
                                     D: torch.Tensor, chunk_size: int, initial_states: torch.Tensor | None = None,
                                     seq_idx=None, dt_limit: tuple[float, float] = NO_LIMIT,
                                     return_final_states: bool = False, activation: str = "silu",
                                     rmsnorm_weight: torch.Tensor | None = None, rmsnorm_eps: float = 1e-6,
                                     outproj_weight: torch.Tensor | None = None,
                                     outproj_bias: torch.Tensor | None = None, headdim: int | None = None,
                                     ngroups: int = 1, norm_before_gate: bool = True):
    """The fused Mamba-2 mixer core. zxbcdt: [b, l, 2 dim + 2 ngroups state + heads] (in_proj's
    output), conv1d_weight: [dim + 2 ngroups state, width]. Returns [b, l, dim] (or the
    out-projection's output when ``outproj_weight`` is given)."""
    _refuse_packing(seq_idx=seq_idx)
    if D.dim() == 1:
        assert headdim is not None, "headdim is needed when D has one value per head"
        heads = D.shape[0]
    else:
        heads, headdim = D.shape
    dim = heads * headdim
    state_dim = (conv1d_weight.shape[0] - dim) // ngroups // 2
    batch, length, width = zxbcdt.shape
    assert width == 2 * dim + 2 * ngroups * state_dim + heads, (
        f"in_proj output of {width} channels is not [z, x, B, C, dt] of dim {dim}, {ngroups} groups of "
        f"state {state_dim}, {heads} heads")
    z, xBC, dt = zxbcdt.split([dim, dim + 2 * ngroups * state_dim, heads], dim=-1)
    xBC = causal_conv1d(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation).transpose(1, 2)
    x, B, C = xBC.split([dim, ngroups * state_dim, ngroups * state_dim], dim=-1)
    gate = z.unflatten(-1, (heads, headdim)) if rmsnorm_weight is None else None
    out = mamba_chunk_scan_combined(
        x.unflatten(-1, (heads, headdim)), dt, A, B.unflatten(-1, (ngroups, state_dim)),
        C.unflatten(-1, (ngroups, state_dim)), chunk_size, D=D, z=gate, dt_bias=dt_bias,
        initial_states=initial_states, dt_softplus=True, dt_limit=dt_limit, return_final_states=return_final_states)
    y, final = out if return_final_states else (out, None)
    y = y.reshape(batch, length, dim)
    if rmsnorm_weight is not None:
        y = gated_rms_norm(y, z, rmsnorm_weight, rmsnorm_eps, dim // ngroups, norm_before_gate)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return (y, final) if return_final_states else y


# ------------------------------------------------------------------- decode steps
# megatron-core 0.19 decodes with Triton kernels of its own (megatron.core.ssm.ops); these
# take their place, with their signatures: batch first, then the new tokens (one, or a few
# speculative ones), each advancing the cached states in place.
def _refuse_speculation_buffers(**buffers) -> None:
    used = [k for k, v in buffers.items() if v is not None]
    if used:
        raise NotImplementedError(f"Mamba speculative decoding ({', '.join(used)}) needs the Triton kernels and a GPU")


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         silu_activation, conv_state_indices: torch.Tensor | None = None,
                         intermediate_conv_states: torch.Tensor | None = None) -> torch.Tensor:
    """The causal conv for new tokens. x: [batch, tokens, channels] (or [batch, channels]);
    conv_state: [states, channels, state_len], its last ``width - 1`` positions the tokens
    before; ``conv_state_indices`` picks each sequence's row (default: row = batch index).
    Each token shifts its row left by one and enters at the end; its output is the window's
    dot product with ``weight`` [channels, width], plus bias, then SiLU when asked."""
    _refuse_speculation_buffers(intermediate_conv_states=intermediate_conv_states)
    squeeze = x.dim() == 2
    x = x.unsqueeze(1) if squeeze else x
    rows = conv_state_indices.long() if conv_state_indices is not None else torch.arange(x.shape[0])
    state = conv_state[rows].float()
    width = weight.shape[-1]
    outs = []
    for t in range(x.shape[1]):
        state = torch.cat([state[..., 1:], x[:, t, :, None].float()], dim=-1)
        out = (state[..., -width:] * weight.float()).sum(-1)
        out = out + bias.float() if bias is not None else out
        outs.append(F.silu(out) if silu_activation else out)
    conv_state[rows] = state.to(conv_state.dtype)
    out = torch.stack(outs, dim=1).to(x.dtype)
    return out.squeeze(1) if squeeze else out


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                           C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                           dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
                           state_batch_indices: torch.Tensor | None = None,
                           intermediate_ssm_states: torch.Tensor | None = None) -> torch.Tensor:
    """The SSM recurrence for new tokens (the scan of ``mamba_chunk_scan_combined``, one step
    per token). state: [states, heads, head_dim, state_dim]; x, dt, z: [batch, tokens, heads,
    head_dim] (or without the tokens axis); A: [heads, head_dim, state_dim]; B, C: [batch,
    tokens, groups, state_dim]; D, dt_bias: [heads, head_dim]. Returns y like x."""
    _refuse_speculation_buffers(intermediate_ssm_states=intermediate_ssm_states)
    assert state.dim() == 4, "the state has a heads axis: [states, heads, head_dim, state_dim]"
    squeeze = x.dim() == 3
    if squeeze:
        x, dt, B, C = x.unsqueeze(1), dt.unsqueeze(1), B.unsqueeze(1), C.unsqueeze(1)
        z = z.unsqueeze(1) if z is not None else None
    heads = x.shape[2]
    rows = state_batch_indices.long() if state_batch_indices is not None else torch.arange(x.shape[0])
    h = state[rows].float()
    per_group = heads // B.shape[2]
    ys = []
    for t in range(x.shape[1]):
        step = dt[:, t].float() + (dt_bias.float() if dt_bias is not None else 0.0)
        step = F.softplus(step) if dt_softplus else step
        Bt = B[:, t].float().repeat_interleave(per_group, dim=1)[:, :, None, :]  # [batch, heads, 1, state_dim]
        Ct = C[:, t].float().repeat_interleave(per_group, dim=1)[:, :, None, :]
        xt = x[:, t].float()
        h = h * torch.exp(step[..., None] * A.float()) + (step * xt)[..., None] * Bt
        y = (h * Ct).sum(-1)
        y = y + D.float() * xt if D is not None else y
        ys.append(y * F.silu(z[:, t].float()) if z is not None else y)
    state[rows] = h.to(state.dtype)
    y = torch.stack(ys, dim=1).to(x.dtype)
    return y.squeeze(1) if squeeze else y
