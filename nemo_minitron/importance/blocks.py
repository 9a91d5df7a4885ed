"""Per-layer block-variant scores (Puzzle's "replace one block"): for every layer and every
variant of its attention or MLP (prune/variants.py), the LM-loss change and the KL
divergence from the parent when that variant replaces the parent's block, every other
block the parent's.

No heterogeneous model is built: each variant is the parent with a few weights changed,
whose outputs equal the resized block's exactly:
- an MLP of width f: the dropped neurons' columns of ``linear_fc2`` zeroed; scored a second
  time with the kept columns refit by least squares (prune/refit.py) from the layer's second
  moments when the importance run keeps them (``--second-moments``, for ``prune --refit``),
  so that ``prune --per-layer --refit`` chooses by what its refit widths are worth. The refit
  for a score leaves the scored samples out of the second moments (their Gram matrices
  subtracted): fit on the tokens it is scored on, a refit looks nearly free at any width
  (exact once a width exceeds the tokens), and the choice would cut MLPs by what the refit
  does in-sample, not by what it keeps on other text;
- an MLP removed: ``linear_fc2`` (weight and bias) zeroed, so the block adds nothing to the
  residual stream;
- g K/V groups: each merged run's K and V rows (and biases) replaced by the run's mean;
  every query head then attends over its run's mean K/V, as in the resized attention;
- an attention removed: ``linear_proj`` (weight and bias) zeroed.

Cost: one parent pass per micro-batch records every layer's input; a variant at layer i
then runs from layer i on (the earlier layers return the recorded input instead of
computing), so the work is about half a forward pass per variant and micro-batch. The
parent's probabilities of the micro-batch are held for the KL (``[b, s, vocab]`` floats).
Runs at TP=1, PP=1 (data parallel over ranks: token sums all-reduced).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from nemo_minitron.data.dataset import data_parallel_slice
from nemo_minitron.importance.collect import add_gram
from nemo_minitron.importance.layers import layer_inputs, starting_at
from nemo_minitron.importance.local_distill import TrainedVariants, VariantLayout, trained_variant
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.forward import position_ids, split_microbatches
from nemo_minitron.model.params import unwrap
from nemo_minitron.prune.refit import refit_columns
from nemo_minitron.prune.variants import BlockVariants, kept_neurons, merged_groups
from nemo_minitron.runtime.distributed import layout


@contextlib.contextmanager
def _edited(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Within the block the given parameters may be changed in place; restored after."""
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)


def _present(*tensors) -> list[torch.Tensor]:
    return [t for t in tensors if t is not None]


@contextlib.contextmanager
def ffn_variant(layer, width: int, ffn_scores: torch.Tensor, gram: torch.Tensor | None = None) -> Iterator[None]:
    """``layer``'s MLP behaves as one of ``width`` neurons (0: removed); ``gram``: the
    layer's second moments at ``linear_fc2``'s input, the kept columns refit from them."""
    fc2 = layer.mlp.linear_fc2
    bias = getattr(fc2, "bias", None)
    with _edited(_present(fc2.weight, bias)), torch.no_grad():
        if width == 0:
            fc2.weight.zero_()
            if bias is not None:
                bias.zero_()
        else:
            kept = kept_neurons(ffn_scores, width)
            if gram is not None:
                fc2.weight[:, kept.to(fc2.weight.device)] = refit_columns(fc2.weight, gram, kept)
            dropped = torch.ones(fc2.weight.shape[1], dtype=torch.bool)
            dropped[kept] = False
            fc2.weight[:, dropped.to(fc2.weight.device)] = 0
        yield


@contextlib.contextmanager
def attention_variant(layer, desc: ModelDescription, groups: int, group_scores: torch.Tensor) -> Iterator[None]:
    """``layer``'s attention behaves as one with ``groups`` K/V groups (0: removed)."""
    attention = layer.self_attention
    if groups == 0:
        proj = attention.linear_proj
        bias = getattr(proj, "bias", None)
        with _edited(_present(proj.weight, bias)), torch.no_grad():
            proj.weight.zero_()
            if bias is not None:
                bias.zero_()
            yield
        return
    qkv = attention.linear_qkv
    bias = getattr(qkv, "bias", None)
    d, hpg = desc.head_dim, desc.heads_per_group
    with _edited(_present(qkv.weight, bias)), torch.no_grad():
        for tensor in _present(qkv.weight, bias):
            rows = tensor.view(desc.num_query_groups, hpg + 2, d, *tensor.shape[1:])  # [group][q..., k, v]
            for run in merged_groups(group_scores, groups):
                mean = rows[run, hpg:].mean(dim=0)
                rows[run, hpg:] = mean
        yield


def _variant(layer, desc: ModelDescription, i: int, kind: str, size: int, ffn_scores: torch.Tensor,
             group_scores: torch.Tensor, trained: TrainedVariants | None, fc2_grams: torch.Tensor | None):
    """The context in which layer ``i``'s block of ``kind`` (attention, ffn, ffn_refit) behaves
    as its variant of ``size``."""
    tensors = trained.block(i, kind, size) if trained is not None else None
    if tensors is not None:
        shape = VariantLayout.of(desc, kind, size, ffn_scores, group_scores)
        return trained_variant(layer, kind, shape.expand(tensors))
    if kind == "ffn":
        return ffn_variant(layer, size, ffn_scores)
    if kind == "ffn_refit":
        return ffn_variant(layer, size, ffn_scores, fc2_grams[i])
    return attention_variant(layer, desc, size, group_scores)


def _held_out_grams(model, samples: torch.Tensor, micro_batch: int, fc2_grams: torch.Tensor) -> torch.Tensor:
    """``fc2_grams`` less the Gram matrices of ``linear_fc2``'s inputs on ``samples`` (this
    rank's part; summed over data-parallel ranks), float64: the second moments of the other
    calibration tokens."""
    layers = unwrap(model).decoder.layers
    mine: list[torch.Tensor | None] = [None] * len(layers)
    handles = []
    for i, layer in enumerate(layers):
        def hook(module, args, _i=i):
            mine[_i] = add_gram(mine[_i], args[0])
        handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(hook))
    device = layout().device
    try:
        with torch.no_grad():
            for batch in split_microbatches(samples, micro_batch):
                tokens = batch["tokens"].to(device)
                model(tokens, position_ids(tokens), None)
    finally:
        for h in handles:
            h.remove()
    n = fc2_grams.shape[-1]
    scored = torch.stack([g if g is not None else torch.zeros(n, n, dtype=torch.float64, device=device)
                          for g in mine])
    if dist.is_initialized() and ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(scored, group=ps.get_data_parallel_group())
    return fc2_grams.double() - scored.cpu()


def _log_probs(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)


def _nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss (float64, on the CPU)."""
    return -log_probs.gather(-1, labels[..., None]).double().sum().cpu()


class _Parent:
    """What every variant's loss and KL need of the parent's log-probabilities ``p`` of one
    micro-batch, reduced once: per token sum_v P log p, sum_v P (P = exp p, whose sum
    differs from 1 by float32 rounding) and P itself."""

    def __init__(self, log_probs: torch.Tensor):
        self.probs = log_probs.exp()
        self.neg_entropy = (self.probs * log_probs).sum(-1)
        self.mass = self.probs.sum(-1)

    def variant_terms(self, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int):
        """Summed next-token loss and summed KL(parent || variant) of a variant's ``logits``
        (float64, on the CPU). With q = x - logsumexp(x) the variant's log-probabilities,
        sum_v P (p - q) = sum_v P p - P.x + logsumexp(x) sum_v P: no [tokens, vocab]
        temporary beyond the float32 logits (the log-softmax and the difference were half of a
        variant's cost on SmolLM2's 49,152 ids)."""
        x = logits[..., :vocab_size].float()
        lse = torch.logsumexp(x, dim=-1)
        nll = (lse - x.gather(-1, labels[..., None])[..., 0]).double().sum().cpu()
        kl = (self.neg_entropy - torch.linalg.vecdot(self.probs, x) + lse * self.mass).double().sum().cpu()
        return nll, kl


def score_block_variants(model, desc: ModelDescription, samples: torch.Tensor, variants: BlockVariants,
                         ffn_scores: torch.Tensor, group_scores: torch.Tensor, micro_batch: int,
                         progress=None, trained: TrainedVariants | None = None,
                         fc2_grams: torch.Tensor | None = None, done: dict | None = None,
                         on_batch: Callable[[dict], None] | None = None) -> dict[str, torch.Tensor]:
    """``scores.BLOCK_AXES`` -> [layers, options] (the options of ``variants``; the parent's column
    is 0): mean LM-loss change and mean KL(parent || variant) per token over ``samples``
    (``[N, s+1]``, shared over data-parallel ranks). ``trained``: variants trained by local
    distillation (importance/local_distill.py), scored with their trained weights instead of
    the parent's. ``fc2_grams`` ([layers, ffn, ffn], untrained variants only): besides, the
    MLP widths with their kept columns refit from these second moments less those of
    ``samples`` (``scores.REFIT_BLOCK_AXES``; removal as ``block_ffn_*``: nothing is kept to
    refit). ``progress``: ticked once per variant and micro-batch. ``on_batch(sums)`` gets this
    rank's running sums after each of its micro-batches; given back as ``done`` (same samples,
    micro-batch size and data-parallel size), they resume the scoring after those."""
    assert trained is None or fc2_grams is None
    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_world_size() == 1
    L, device = desc.num_layers, layout().device
    layers = unwrap(model).decoder.layers
    options = {"attention": variants.query_groups, "ffn": variants.ffn}
    if fc2_grams is not None:
        options["ffn_refit"] = variants.ffn
    loss = {kind: torch.zeros(L, len(opts), dtype=torch.float64) for kind, opts in options.items()}
    kl = {kind: torch.zeros(L, len(opts), dtype=torch.float64) for kind, opts in options.items()}
    tokens_seen = torch.zeros(1, dtype=torch.float64)
    skip = 0
    if done is not None:
        loss, kl, tokens_seen, skip = done["loss"], done["kl"], done["tokens"], done["batches"]
    mine = data_parallel_slice(samples, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    was_training = model.training
    model.eval()
    if fc2_grams is not None:
        fc2_grams = _held_out_grams(model, mine, micro_batch, fc2_grams)
    batches = split_microbatches(mine, micro_batch)
    if progress is not None and skip:
        progress.update(skip * variant_passes(desc, variants, refit=fc2_grams is not None))
    with torch.no_grad():
        for b, batch in enumerate(batches[skip:], start=skip):
            tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
            positions = position_ids(tokens)
            inputs, handles = layer_inputs(model)
            try:
                logits = model(tokens, positions, None)
            finally:
                for h in handles:
                    h.remove()
            parent_logp = _log_probs(logits, desc.vocab_size)
            parent_loss = _nll(parent_logp, labels)
            parent = _Parent(parent_logp)
            del parent_logp
            tokens_seen += labels.numel()
            for i in range(L):
                for kind, opts in options.items():
                    for j, size in enumerate(opts[1:], start=1):
                        if kind == "ffn_refit" and size == 0:
                            continue  # the removed MLP: block_ffn_*'s column, copied below
                        variant = _variant(layers[i], desc, i, kind, size, ffn_scores[i], group_scores[i], trained,
                                           fc2_grams)
                        with variant, starting_at(model, i, inputs[i] if i else None):
                            out = model(tokens, positions, None)
                        variant_loss, variant_kl = parent.variant_terms(out, labels, desc.vocab_size)
                        loss[kind][i, j] += variant_loss - parent_loss
                        kl[kind][i, j] += variant_kl
                        if progress is not None:
                            progress.update(1)
            if on_batch is not None:
                on_batch({"batches": b + 1, "loss": loss, "kl": kl, "tokens": tokens_seen})
    model.train(was_training)
    if fc2_grams is not None and variants.ffn[-1] == 0:
        loss["ffn_refit"][:, -1], kl["ffn_refit"][:, -1] = loss["ffn"][:, -1], kl["ffn"][:, -1]
    totals = [*loss.values(), *kl.values(), tokens_seen]
    if dist.is_initialized() and ps.get_data_parallel_world_size() > 1:
        for t in totals:
            moved = t.to(device)
            dist.all_reduce(moved, group=ps.get_data_parallel_group())
            t.copy_(moved.cpu())
    n = tokens_seen.clamp(min=1)
    return {**{f"block_{kind}_loss": (t / n).float() for kind, t in loss.items()},
            **{f"block_{kind}_kl": (t / n).float() for kind, t in kl.items()}}


def variant_passes(desc: ModelDescription, variants: BlockVariants, refit: bool = False) -> int:
    """Variant evaluations per micro-batch (each about half a forward pass on average);
    ``refit``: the refit MLP widths besides."""
    refit_widths = sum(1 for w in variants.ffn[1:] if w) if refit else 0
    return desc.num_layers * (len(variants.query_groups) + len(variants.ffn) - 2 + refit_widths)
