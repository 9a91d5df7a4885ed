"""Activation statistics of mixture-of-experts layers (megatron-core's ``MoELayer``).

Per token t and expert e (zero when t is not routed to e, so that an expert that
receives few tokens scores low):
- expert e:          ||p_te * E_e(x_t)||, the norm of what the expert adds to the token's
                     output (its router probability times its output);
- expert neuron n:   the input of the expert's second linear, p_te * act(x_t W1_e)_n
                     (``post``: what megatron computes, the probability applied before the
                     second linear), or the gate pre-activation x_t . W_gate,e,n (``pre``);
- shared neuron n:   as a dense MLP's neuron (every token passes the shared expert).
Then the same aggregation as every axis (``collect.py``): over each sample's sequence
(the zeros included), then over samples.

The experts see the tokens permuted (grouped by expert); the token dispatcher's
permutation gives each row's token. With tensor parallelism (and no sequence
parallelism: importance never uses it) the all-gather dispatcher hands every TP rank
every rank's copy of the same tokens: only the first copy is counted, and an expert's
output, a partial sum on each rank, is summed over the TP group before its norm.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def is_moe_layer(mlp) -> bool:
    return hasattr(mlp, "router") and hasattr(mlp, "experts")


def aggregate_rows(values: torch.Tensor, sample: torch.Tensor, samples: int, seq_len: int, kind: str) -> torch.Tensor:
    """Per-sample sequence aggregation of a sparse activation: ``values [n, U]`` of the
    tokens that have one (``sample [n]``: their sample), every other token of the
    ``seq_len`` being 0. Returns ``[samples, U]`` (float64), as ``collect.aggregate_sequence``
    computes it for a dense ``[seq_len, samples, U]``."""
    x = values.double()
    if kind == "l2":
        return _per_sample(x.square(), sample, samples).sqrt()
    mean = _per_sample(x.abs() if kind == "mean" else x, sample, samples) / seq_len
    if kind == "mean":
        return mean
    return (_per_sample(x.square(), sample, samples) / seq_len - mean.square()).clamp(min=0)


def _per_sample(x: torch.Tensor, sample: torch.Tensor, samples: int) -> torch.Tensor:
    return torch.zeros(samples, *x.shape[1:], dtype=x.dtype, device=x.device).index_add_(0, sample, x)


@dataclasses.dataclass
class ExpertStats:
    """One MoE layer's statistics (``BatchStat`` objects from collect.py)."""

    experts: object
    moe_ffn: object
    shared_ffn: object | None


class ExpertHooks:
    """Hooks that score one MoE layer's experts, expert neurons and shared expert."""

    def __init__(self, mlp, stats: ExpertStats, seq_agg: str, neuron_activation: str,
                 per_sample: Callable[[torch.Tensor], torch.Tensor]) -> None:
        assert not mlp.config.sequence_parallel, "importance runs without sequence parallelism"
        self.mlp, self.stats, self.seq_agg, self.neuron_activation = mlp, stats, seq_agg, neuron_activation
        self.per_sample = per_sample  # dense [s, b, U] -> [b, U], for the shared expert
        self.tp_group = ps.get_expert_tensor_parallel_group()
        self.num_experts = mlp.config.num_moe_experts
        self.gated = mlp.config.gated_linear_unit
        self._rows: list[torch.Tensor] = []

    def hooks(self) -> Iterator[tuple[torch.nn.Module, str, Callable]]:
        experts = self.mlp.experts
        # SequentialMLP (local spec) calls each expert's MLP in turn; TE's grouped MLP one
        # grouped linear for all: either way the rows arrive in expert order
        mlps = list(experts.local_experts) if hasattr(experts, "local_experts") else [experts]
        for expert in mlps:
            if self.neuron_activation == "post":
                yield expert.linear_fc2, "pre", lambda module, args: self._rows.append(args[0].detach())
            else:
                def gate(module, args, output):
                    out = output[0] if isinstance(output, tuple) else output
                    # [gate; up] per TP shard; without a gate (squared ReLU) the one pre-activation
                    self._rows.append(out.detach().chunk(2, dim=-1)[0] if self.gated else out.detach())
                yield expert.linear_fc1, "post", gate
        yield experts, "post", self._experts_done
        shared = getattr(self.mlp, "shared_experts", None)
        if shared is not None:
            if self.neuron_activation == "post":
                yield shared.linear_fc2, "pre", lambda module, args: self.stats.shared_ffn.add(self.per_sample(args[0]))
            else:
                def shared_gate(module, args, output):
                    out = output[0] if isinstance(output, tuple) else output
                    self.stats.shared_ffn.add(self.per_sample(out.chunk(2, dim=-1)[0] if self.gated else out))
                yield shared.linear_fc1, "post", shared_gate

    def _experts_done(self, module, args, output) -> None:
        """All experts of this layer ran: map rows to tokens and record both axes."""
        neurons = torch.cat(self._rows) if self._rows else None
        self._rows = []
        dispatcher = self.mlp.token_dispatcher
        seq_len, batch = dispatcher.hidden_shape[0], dispatcher.hidden_shape[1]
        tokens = dispatcher.reversed_local_input_permutation_mapping  # row -> gathered token index
        counts = torch.as_tensor(args[1]).tolist()
        expert_of_row = torch.repeat_interleave(torch.arange(len(counts), device=tokens.device),
                                                torch.as_tensor(counts, device=tokens.device))
        contribution = output[0] if isinstance(output, tuple) else output  # p * E(x), per TP rank a partial sum
        contribution = contribution.detach().float().clone()  # reduced below: never in the forward's tensor
        if self.tp_group is not None and dist.is_initialized() and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(contribution, group=self.tp_group)
        first_copy = tokens < seq_len * batch  # other TP ranks' copies of the same tokens
        tokens, expert_of_row = tokens[first_copy], expert_of_row[first_copy]
        sample = tokens % batch  # tokens are [s, b] flattened
        norms = torch.linalg.vector_norm(contribution[first_copy], dim=-1)
        per_expert = torch.zeros(batch, self.num_experts, dtype=torch.float64, device=norms.device)
        local = neurons[first_copy] if neurons is not None else None
        ffn = None
        for e in range(len(counts)):
            rows = expert_of_row == e
            per_expert[:, e] = aggregate_rows(norms[rows, None], sample[rows], batch, seq_len, self.seq_agg)[:, 0]
            if local is not None:
                part = aggregate_rows(local[rows], sample[rows], batch, seq_len, self.seq_agg)
                ffn = part.new_zeros(batch, len(counts), part.shape[-1]) if ffn is None else ffn
                ffn[:, e] = part
        self.stats.experts.add(per_expert)
        if ffn is not None:
            self.stats.moe_ffn.add(ffn)
