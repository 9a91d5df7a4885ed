"""Activation statistics for every prunable width unit, streamed over calibration batches.

Per token, each unit has one activation value x[b, s, u]:
- attention head u:   ``token`` (default): the L2 norm of the head's output (its head_dim
                      values at the input of the output projection), as the paper's
                      ||Attn_u(X)||, aggregated like any unit; ``channel`` (ModelOpt's
                      order): each of the head's channels aggregated on its own (sequence,
                      then samples), then the L2 norm over the head's channels;
- query group:        the sum of its heads' final scores;
- MLP neuron u:       the input of the second MLP linear (``post``, default), or the
                      pre-activation X.W1_u (``pre``, the paper's; with a gate, X.W_gate,u);
- embedding channel:  the output of a norm (input norm, pre-MLP norm, final norm; a
                      hybrid model's Mamba layers' norms too);
- mixtures of experts: each expert, each expert's neurons, the shared expert's neurons
                      (``experts.py``);
- Mamba-2 head u (hybrid models): ``output`` (default): the head's head_dim channels at the
                      input of the mixer's out_proj (the gated norm's output: the SSM
                      output with its D skip, gated by silu(z), normalised per B/C group,
                      times the norm weight), scored as attention heads are (``head_score``);
                      ``x`` (ModelOpt's and the Minitron-SSM paper's): the head's channels
                      of in_proj's x section (before the conv and the scan);
- Mamba head channel p: the same activations, each (head, channel) aggregated, then the
                      L2 norm over the heads (one ranking per layer shared by its heads).

Aggregation, first over the sequence of each sample, then over all samples:
    seq   mean: mean_s |x|      l2: sqrt(sum_s x^2)      var: mean_s (x - mean_s x)^2
    batch mean: mean_b v        l2: sqrt(sum_b v^2)      var: mean_b (v - mean_b v)^2
(default seq=mean, batch=l2). Only sum_b v, sum_b v^2 and the sample count are kept
(float64), so nothing scales with the number of samples, and data-parallel ranks add
their sums. Channel scores are computed per norm and summed over all norms.

With ``second_moments`` the collector also sums x x^T over all tokens of the inputs of
each layer's output projection and second MLP linear (the Gram matrices the pruning
stage's least-squares refit solves with; float64, TP-gathered, so each is [n, n]).

Layers: Block Importance BI = 1 - mean over tokens of cos(layer input, layer output).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from nemo_minitron.importance.experts import ExpertHooks, ExpertStats, is_moe_layer
from nemo_minitron.model.params import unwrap
from nemo_minitron.runtime.distributed import layout

AGGREGATIONS = ("mean", "l2", "var")
NEURON_ACTIVATIONS = ("post", "pre")
HEAD_SCORES = ("token", "channel")
MAMBA_ACTIVATIONS = ("output", "x")


def aggregate_sequence(x: torch.Tensor, kind: str) -> torch.Tensor:
    """megatron's [s, b, ...] -> [b, ...] (float64 result, float32 arithmetic).

    The default (mean of |x|) sums in float32 without a float32 copy of the activations:
    the hooks run inside the forward pass, whose cost they must barely change."""
    if kind == "mean":
        v = x.abs().sum(dim=0, dtype=torch.float32) / x.shape[0]
    elif kind == "l2":
        v = x.float().square().sum(dim=0).sqrt()
    else:
        v = x.float().var(dim=0, unbiased=False)
    return v.double()


#: dimensions a statistic may have (per unit, or per expert and unit)
MAX_DIMS = 4


class BatchStat:
    """Running sum and sum of squares of per-sample values, for one axis of one layer."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.total_sq: torch.Tensor | None = None
        self.count = 0

    def add(self, per_sample: torch.Tensor) -> None:
        s, sq = per_sample.sum(dim=0), per_sample.square().sum(dim=0)
        if self.total is None:
            self.total, self.total_sq = s, sq
        else:
            self.total += s
            self.total_sq += sq
        self.count += per_sample.shape[0]

    def all_reduce(self, group) -> None:
        """Sum over ``group``. A rank that saw nothing (its total is None: a stat no hook of
        this layer feeds, such as the dense MLP's of a mixture of experts, or an expert no
        token of its share reached) takes part with zeros of the others' size."""
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return

        device = self.total.device if self.total is not None else layout().device
        # the shape (at most MAX_DIMS dimensions, 0-padded): ranks that saw nothing send zeros
        dims = torch.zeros(MAX_DIMS, dtype=torch.long, device=device)
        if self.total is not None:
            dims[:self.total.dim()] = torch.tensor(self.total.shape, dtype=torch.long)
        dist.all_reduce(dims, op=dist.ReduceOp.MAX, group=group)
        shape = tuple(int(d) for d in dims.tolist() if d > 0)
        if not shape:
            return  # nobody saw anything
        n = math.prod(shape)
        zeros = torch.zeros(n, dtype=torch.float64, device=device)
        total = zeros if self.total is None else self.total.reshape(-1).double()
        total_sq = zeros if self.total_sq is None else self.total_sq.reshape(-1).double()
        packed = torch.cat([total, total_sq, torch.tensor([float(self.count)], dtype=torch.float64, device=device)])
        dist.all_reduce(packed, group=group)
        self.total, self.total_sq = packed[:n].reshape(shape), packed[n:2 * n].reshape(shape)
        self.count = int(packed[-1].item())

    def finalize(self, kind: str) -> torch.Tensor:
        n = max(self.count, 1)
        if kind == "mean":
            return self.total / n
        if kind == "l2":
            return self.total_sq.sqrt()
        mean = self.total / n
        return (self.total_sq / n - mean.square()).clamp(min=0)


@dataclasses.dataclass
class LayerStats:
    heads: BatchStat = dataclasses.field(default_factory=BatchStat)
    ffn: BatchStat = dataclasses.field(default_factory=BatchStat)
    input_norm: BatchStat = dataclasses.field(default_factory=BatchStat)
    pre_mlp_norm: BatchStat = dataclasses.field(default_factory=BatchStat)
    cos_sum: torch.Tensor | float = 0.0  # stays on the device: no synchronisation per batch
    cos_tokens: int = 0
    moe: ExpertStats | None = None  # a mixture-of-experts layer's experts (experts.py)
    proj_gram: torch.Tensor | None = None  # sum over tokens of x x^T at the input of linear_proj
    fc2_gram: torch.Tensor | None = None   # ... and of linear_fc2
    mamba_channels: BatchStat = dataclasses.field(default_factory=BatchStat)  # per (head, channel)
    mamba_heads: BatchStat = dataclasses.field(default_factory=BatchStat)     # per head (head_score token)


def fused_norm_output(x: torch.Tensor, module, config) -> torch.Tensor:
    """The output of the norm TE fused into ``module`` (RMSNorm, or LayerNorm with bias;
    zero-centred weights apply as weight + 1), in float32."""
    eps = getattr(module, "eps", config.layernorm_epsilon)
    weight = module.layer_norm_weight.float() + (1 if config.layernorm_zero_centered_gamma else 0)
    xf = x.float()
    if config.normalization == "LayerNorm":
        return torch.nn.functional.layer_norm(xf, xf.shape[-1:], weight, module.layer_norm_bias.float(), eps)
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)) * weight


class ActivationCollector:
    """Forward hooks on this rank's layers; ``with collector.active(): run forward``.

    Works on megatron-core's local spec and on the Transformer Engine spec (where the
    input and pre-MLP norms are fused into ``linear_qkv`` / ``linear_fc1`` and their
    outputs are recomputed here from the fused module's input and its norm weight)."""

    def __init__(self, model, *, seq_agg: str, neuron_activation: str, head_score: str,
                 second_moments: bool = False, mamba_activation: str = MAMBA_ACTIVATIONS[0]) -> None:
        assert seq_agg in AGGREGATIONS and neuron_activation in NEURON_ACTIVATIONS and head_score in HEAD_SCORES
        assert mamba_activation in MAMBA_ACTIVATIONS
        self.model = unwrap(model)
        self.seq_agg = seq_agg
        self.neuron_activation = neuron_activation
        self.head_score = head_score
        self.mamba_activation = mamba_activation
        self.second_moments = second_moments
        self.layers = {layer.layer_number - 1: layer for layer in self.model.decoder.layers}
        self.stats = {i: LayerStats() for i in self.layers}
        for i, layer in self.layers.items():
            if is_moe_layer(getattr(layer, "mlp", None)):
                shared = BatchStat() if getattr(layer.mlp, "shared_experts", None) is not None else None
                self.stats[i].moe = ExpertStats(BatchStat(), BatchStat(), shared)
        self.final_norm = BatchStat()
        self._last_output_sq: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ hooks
    def _per_sample(self, x: torch.Tensor) -> torch.Tensor:
        """megatron activations are [s, b, ...]; aggregate each sample's sequence."""
        return aggregate_sequence(x.detach(), self.seq_agg)

    def _hooks(self) -> Iterator[tuple[torch.nn.Module, str, Callable]]:
        for index, layer in self.layers.items():
            st = self.stats[index]
            # a GPT layer has attention and an MLP; a hybrid model's layer one of them, or a Mamba mixer
            attn, mlp, mixer = (getattr(layer, name, None) for name in ("self_attention", "mlp", "mixer"))
            if hasattr(attn, "linear_proj"):
                yield from self._attention_hooks(layer, attn, st)
            if hasattr(mlp, "linear_fc2") or is_moe_layer(mlp):
                yield from self._mlp_hooks(layer, mlp, st)
            if mixer is not None:
                yield from self._mamba_hooks(layer, mixer, st)
            if self.second_moments:  # dense models only (the API refuses the others)
                def grams(module, args, st=st, name="proj_gram"):
                    setattr(st, name, add_gram(getattr(st, name), args[0]))
                yield attn.linear_proj, "pre", grams
                yield mlp.linear_fc2, "pre", functools.partial(grams, st=st, name="fc2_gram")

            def block(module, args, kwargs, output, st=st):
                x_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                x_out = output[0] if isinstance(output, tuple) else output
                x_in, x_out = x_in.detach(), x_out.detach()
                # products in the activations' dtype, sums in float32; a layer's input is the
                # previous layer's output, whose squared norms were computed one hook earlier
                cached = self._last_output_sq
                in_sq = cached[1] if cached is not None and cached[0] is x_in else (x_in * x_in).sum(
                    -1, dtype=torch.float32)
                out_sq = (x_out * x_out).sum(-1, dtype=torch.float32)
                self._last_output_sq = (x_out, out_sq)
                dot = (x_in * x_out).sum(-1, dtype=torch.float32)
                cos = dot / (in_sq * out_sq).sqrt().clamp(min=1e-12)
                st.cos_sum += cos.double().sum()
                st.cos_tokens += cos.numel()
            yield layer, "post_kwargs", block

        final = getattr(self.model.decoder, "final_layernorm", None) or getattr(self.model.decoder, "final_norm", None)
        if final is not None:  # (a MambaStack's is final_norm)
            def final_out(module, args, output):
                self.final_norm.add(self._per_sample(output))
            yield final, "post", final_out

    def _norm_hook(self, layer, norm_name: str, fused_into, stat: BatchStat) -> Iterator[tuple]:
        """The output of the layer's norm ``norm_name``, or (TE) of the norm fused into the next linear."""
        if hasattr(fused_into, "layer_norm_weight"):  # TE: norm fused into the next linear
            def fused(module, args):
                stat.add(self._per_sample(fused_norm_output(args[0].detach(), module, self.model.config)))
            yield fused_into, "pre", fused
        else:
            def norm_out(module, args, output):
                stat.add(self._per_sample(output))
            yield getattr(layer, norm_name), "post", norm_out

    def _heads(self, x: torch.Tensor, head_dim: int, channels: BatchStat | None, tokens: BatchStat | None) -> None:
        """Heads of ``head_dim`` channels in ``x`` [s, b, heads_local * head_dim]: each channel
        into ``channels`` (a head's norm over its channels is taken in finalize), each token's
        head norm into ``tokens`` (float32 norms without a float32 copy of the activations)."""
        x = x.detach()
        if channels is not None:
            channels.add(self._per_sample(x))
        if tokens is not None:
            tokens.add(self._per_sample(torch.linalg.vector_norm(x.unflatten(-1, (-1, head_dim)), dim=-1,
                                                                 dtype=torch.float32)))

    def _attention_hooks(self, layer, attn, st: LayerStats) -> Iterator[tuple]:
        head_dim, by_channel = attn.hidden_size_per_attention_head, self.head_score == "channel"

        def heads(module, args):
            self._heads(args[0], head_dim, st.heads if by_channel else None, None if by_channel else st.heads)
        yield attn.linear_proj, "pre", heads
        yield from self._norm_hook(layer, "input_layernorm", attn.linear_qkv, st.input_norm)

    def _mlp_hooks(self, layer, mlp, st: LayerStats) -> Iterator[tuple]:
        if st.moe is not None:
            yield from ExpertHooks(mlp, st.moe, self.seq_agg, self.neuron_activation, self._per_sample).hooks()
        elif self.neuron_activation == "post":
            def neurons(module, args):
                st.ffn.add(self._per_sample(args[0]))
            yield mlp.linear_fc2, "pre", neurons
        else:
            def neurons(module, args, output):
                out = output[0] if isinstance(output, tuple) else output
                if self.model.config.gated_linear_unit:
                    out = out.chunk(2, dim=-1)[0]  # [gate; up] per TP shard: the gate
                st.ffn.add(self._per_sample(out))
            yield mlp.linear_fc1, "post", neurons
        yield from self._norm_hook(layer, "pre_mlp_layernorm", getattr(mlp, "linear_fc1", None), st.pre_mlp_norm)

    def _mamba_hooks(self, layer, mixer, st: LayerStats) -> Iterator[tuple]:
        """A Mamba-2 mixer's heads and head channels (see the module doc), and its layer's norm."""
        heads = st.mamba_heads if self.head_score == "token" else None  # channels: always (head dims)
        if self.mamba_activation == "output":
            def output(module, args):
                self._heads(args[0], mixer.headdim, st.mamba_channels, heads)
            yield mixer.out_proj, "pre", output
        else:
            def x_section(module, args, out):  # this rank's in_proj rows: [z_r, x_r, B_r, C_r, dt_r]
                zxbcdt = out[0] if isinstance(out, tuple) else out
                d = mixer.d_inner_local_tp
                self._heads(zxbcdt[..., d:2 * d], mixer.headdim, st.mamba_channels, heads)
            yield mixer.in_proj, "post", x_section
        yield from self._norm_hook(layer, "norm", mixer.in_proj, st.input_norm)

    @contextlib.contextmanager
    def active(self):
        handles = []
        for module, kind, fn in self._hooks():
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            elif kind == "post":
                handles.append(module.register_forward_hook(fn))
            else:
                handles.append(module.register_forward_hook(fn, with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._last_output_sq = None

    # ------------------------------------------------------------------ reduction
    def finalize(self, num_layers: int, batch_agg: str) -> dict[str, torch.Tensor]:
        """Collective: reduce over DP (sums), TP (sharded units), PP (layers); global scores."""
        dp_group, tp_group, pp_group = (ps.get_data_parallel_group(), ps.get_tensor_model_parallel_group(),
                                        ps.get_pipeline_model_parallel_group())
        desc_heads = self.model.config.num_attention_heads
        ffn = self.model.config.ffn_hidden_size
        hidden = self.model.config.hidden_size
        device = next(self.model.parameters()).device
        out = {
            "heads": torch.zeros(num_layers, desc_heads, dtype=torch.float64, device=device),
            "ffn": torch.zeros(num_layers, ffn, dtype=torch.float64, device=device),
            "hidden_per_layer": torch.zeros(num_layers, hidden, dtype=torch.float64, device=device),
            "layer_block_importance": torch.zeros(num_layers, dtype=torch.float64, device=device),
            "final_norm": torch.zeros(hidden, dtype=torch.float64, device=device),
        }
        config = self.model.config
        if config.num_moe_experts:  # a GPT model's every layer is a mixture of experts: no dense MLP
            E = config.num_moe_experts
            if not config.is_hybrid_model:  # (a hybrid's MLP layers are dense beside its MoE layers)
                out["ffn"] = torch.zeros(num_layers, 0, dtype=torch.float64, device=device)
            out["experts"] = torch.zeros(num_layers, E, dtype=torch.float64, device=device)
            out["moe_ffn"] = torch.zeros(num_layers, E, config.moe_ffn_hidden_size, dtype=torch.float64, device=device)
            if config.moe_shared_expert_intermediate_size:
                out["shared_ffn"] = torch.zeros(num_layers, config.moe_shared_expert_intermediate_size,
                                                dtype=torch.float64, device=device)
        if config.is_hybrid_model:
            out["mamba_heads"] = torch.zeros(num_layers, config.mamba_num_heads, dtype=torch.float64, device=device)
            out["mamba_head_dim"] = torch.zeros(num_layers, config.mamba_head_dim, dtype=torch.float64, device=device)
        for index, st in self.stats.items():
            # which statistics a layer feeds follows from its kind, the same on every rank
            attn, mlp, mixer = (getattr(self.layers[index], name, None) for name in ("self_attention", "mlp", "mixer"))
            hidden_stats = []
            if hasattr(attn, "linear_proj"):
                st.heads.all_reduce(dp_group)
                heads = st.heads.finalize(batch_agg)
                if self.head_score == "channel":
                    heads = heads.view(-1, attn.hidden_size_per_attention_head).norm(dim=-1)
                out["heads"][index] = _gather_tp(heads, tp_group)
                hidden_stats.append(st.input_norm)
            if st.moe is not None:
                for key, stat in (("experts", st.moe.experts), ("moe_ffn", st.moe.moe_ffn),
                                  ("shared_ffn", st.moe.shared_ffn)):
                    if stat is not None:
                        stat.all_reduce(dp_group)
                        # expert scores are whole on every rank; neurons split over TP like a dense MLP's
                        value = stat.finalize(batch_agg)
                        out[key][index] = value if key == "experts" else _gather_tp(value, tp_group)
            elif hasattr(mlp, "linear_fc2"):
                st.ffn.all_reduce(dp_group)
                out["ffn"][index] = _gather_tp(st.ffn.finalize(batch_agg), tp_group)
            if st.moe is not None or hasattr(mlp, "linear_fc2"):
                hidden_stats.append(st.pre_mlp_norm)
            if mixer is not None:
                out["mamba_heads"][index], out["mamba_head_dim"][index] = self._mamba_scores(
                    st, mixer.headdim, batch_agg, dp_group, tp_group)
                hidden_stats.append(st.input_norm)
            for stat in hidden_stats:
                stat.all_reduce(dp_group)
                out["hidden_per_layer"][index] += stat.finalize(batch_agg)
            cos = torch.tensor([float(st.cos_sum), float(st.cos_tokens)], dtype=torch.float64, device=device)
            if dist.is_initialized():
                dist.all_reduce(cos, group=dp_group)
            out["layer_block_importance"][index] = 1.0 - cos[0] / cos[1].clamp(min=1)
        if self.final_norm.total is not None:
            self.final_norm.all_reduce(dp_group)
            out["final_norm"] = self.final_norm.finalize(batch_agg)
        if self.second_moments:
            out.update(self._grams(num_layers, dp_group, pp_group, device))
        if dist.is_initialized() and dist.get_world_size(pp_group) > 1:
            for tensor in out.values():
                dist.all_reduce(tensor, group=pp_group)
        return out

    def _mamba_scores(self, st: LayerStats, head_dim: int, batch_agg: str, dp_group,
                      tp_group) -> tuple[torch.Tensor, torch.Tensor]:
        """A mixer's head scores [heads] and head-channel scores [head_dim]. TP ranks hold
        contiguous runs of heads (and their groups): gathered in rank order."""
        st.mamba_channels.all_reduce(dp_group)
        channels = _gather_tp(st.mamba_channels.finalize(batch_agg), tp_group).view(-1, head_dim)  # [H, P]
        if self.head_score == "channel":
            heads = channels.norm(dim=1)
        else:
            st.mamba_heads.all_reduce(dp_group)
            heads = _gather_tp(st.mamba_heads.finalize(batch_agg), tp_group)
        return heads, channels.norm(dim=0)

    def _grams(self, num_layers: int, dp_group, pp_group, device) -> dict[str, torch.Tensor]:
        """[layers, n, n] Gram matrices, summed over DP; zeros for layers of other stages."""
        cfg = self.model.config
        sizes = {"proj_gram": cfg.num_attention_heads * self.model.decoder.layers[0].self_attention.
                 hidden_size_per_attention_head, "fc2_gram": cfg.ffn_hidden_size}
        out = {k: torch.zeros(num_layers, n, n, dtype=torch.float64, device=device) for k, n in sizes.items()}
        for index, st in self.stats.items():
            for key in sizes:
                gram = getattr(st, key)
                if dist.is_initialized():
                    dist.all_reduce(gram, group=dp_group)
                out[key][index] = gram
        return out


def add_gram(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """total + sum over tokens of x x^T, x being [s, b, n_local] split over TP ranks
    (gathered first: the Gram matrix couples units of different ranks)."""
    x = gather_from_tensor_model_parallel_region(x.detach()).flatten(0, 1).float()
    gram = (x.T @ x).double()  # float32 products: the refit tolerates 1e-6 relative error
    return gram if total is None else total.add_(gram)


def _gather_tp(local: torch.Tensor, group) -> torch.Tensor:
    """Heads and neurons are split contiguously over TP ranks: concatenate in rank order
    (along the last dimension: an expert's neurons are ``[experts, neurons / tp]``)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
