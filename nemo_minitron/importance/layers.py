"""Depth importance by language-model loss: what the model loses without a layer or a block.

loss_drop[i] = LM loss with layer i skipped (its output replaced by its input) minus the
full model's LM loss, on the same samples. For each requested block size k, every
contiguous run of k layers is skipped in turn and the run whose removal raises the loss
least is the best block to drop (the paper found this beats dropping the k individually
least important layers). Skipping works on whichever pipeline stage holds the layer.

Greedy backward elimination (``greedy_drop_order``) accounts for how layers interact:
it removes one layer at a time, each time the one whose removal raises the loss least
with the earlier ones already gone; its first k removals are the k-layer set.

No single rule wins at every depth (benchmarks/pruning_quality.py): for each block size k
``drop_set_losses`` measures, on the same samples, the loss without the contiguous block,
the greedy set, the k layers of lowest loss drop and the k of lowest Block Importance
(ModelOpt's rule), and names the set whose removal costs least (``--layer-metric best``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Sequence

import torch
from megatron.core import parallel_state as ps

from nemo_minitron.data.dataset import data_parallel_bounds
from nemo_minitron.evaluate import evaluate, mean_token_loss
from nemo_minitron.model.forward import lm_forward_step, run_forward_only, split_microbatches
from nemo_minitron.model.params import unwrap
from nemo_minitron.runtime.distributed import layout

#: at most this many bytes of recorded layer inputs (SkipLosses); beyond, every k-th layer's
RECORDED_INPUT_BYTES = 2 << 30


def passed_through(*args, **kwargs):
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return hidden, kwargs.get("context")


@contextlib.contextmanager
def replaced_forwards(model, forwards: dict[int, Callable]):
    """Within the block, the given global layers run ``forwards[layer]`` (taking the layer's
    arguments, returning its (hidden, context)) instead of their own forward."""
    patched = []
    for layer in unwrap(model).decoder.layers:
        if layer.layer_number - 1 in forwards:
            layer.forward = forwards[layer.layer_number - 1]
            patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward  # back to the class's forward


def _starting_forwards(layer: int, hidden: torch.Tensor | None) -> dict[int, Callable]:
    def recorded(*args, **kwargs):
        return hidden, kwargs.get("context")

    return {i: recorded if i == layer - 1 else passed_through for i in range(layer)}


def starting_at(model, layer: int, hidden: torch.Tensor | None):
    """Layers before ``layer`` do no work: the one just before returns ``hidden`` (the
    recorded input of ``layer``), the others pass their input through."""
    return replaced_forwards(model, _starting_forwards(layer, hidden))


def layer_inputs(model) -> tuple[list, list]:
    """Forward pre-hooks recording every layer's input hidden states (filled per forward)."""
    inputs: list[torch.Tensor | None] = [None] * len(unwrap(model).decoder.layers)
    handles = []
    for i, module in enumerate(unwrap(model).decoder.layers):
        def hook(mod, args, kwargs, _i=i):
            inputs[_i] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return inputs, handles


def skipped_layers(model, layers: Iterable[int]):
    """Within the block, the given global layers pass their input through unchanged."""
    return replaced_forwards(model, {i: passed_through for i in layers})


def loss_without(model, vocab_size: int, samples: torch.Tensor, layers: Sequence[int], micro_batch: int) -> float:
    with skipped_layers(model, layers):
        return evaluate(model, vocab_size, samples, micro_batch=micro_batch).loss


class SkipLosses:
    """``losses(layers)``: the LM loss on fixed samples with ``layers`` skipped, each set
    measured once (the depth rules below ask for many sets more than once: a drop set is
    often the contiguous block or the greedy set). ``known``: losses measured before (a
    resumed run); ``on_measure(losses)``, if given, is called after every new measurement.

    The layers before the first skipped one compute what they compute in the full model:
    with one pipeline stage, every layer's input on these samples is recorded in one full
    pass (every k-th layer's when all would exceed ``RECORDED_INPUT_BYTES``), and a pass
    starts at the last recorded layer at or before the first skipped one. The same
    arithmetic on the same inputs as a pass from the embedding, in the same order: the
    losses are the same bits, at about half the layer compute of the passes from the start."""

    def __init__(self, model, vocab_size: int, samples: torch.Tensor, micro_batch: int,
                 known: dict[str, float] | None = None, on_measure: Callable[[dict[str, float]], None] | None = None):
        self.model, self.vocab_size, self.samples, self.micro_batch = model, vocab_size, samples, micro_batch
        self.measured: dict[str, float] = dict(known or {})
        self.on_measure = on_measure
        self.recorded: list[dict[int, torch.Tensor]] | None = None  # per micro-batch of this rank: layer -> input

    def __call__(self, layers: Iterable[int] = ()) -> float:
        skipped = sorted(set(layers))
        key = " ".join(map(str, skipped))
        if key not in self.measured:
            if ps.get_pipeline_model_parallel_world_size() > 1:  # a layer's input may live on another stage
                self.measured[key] = loss_without(self.model, self.vocab_size, self.samples, skipped,
                                                  self.micro_batch)
            else:
                self.measured[key] = self._from_recorded(skipped)
            if self.on_measure is not None:
                self.on_measure(self.measured)
        return self.measured[key]

    def _batches(self) -> list[dict]:
        """This rank's micro-batches, as ``evaluate`` splits the samples."""
        lo, hi = data_parallel_bounds(len(self.samples), ps.get_data_parallel_rank(),
                                      ps.get_data_parallel_world_size())
        return split_microbatches(self.samples[lo:hi], self.micro_batch)

    def _record(self, batches: list[dict], step) -> list[dict]:
        """The full model's pass, recording the layer inputs; its loss reports."""
        num_layers = len(unwrap(self.model).decoder.layers)
        tokens = sum(batch["tokens"].numel() for batch in batches)
        per_layer = tokens * unwrap(self.model).config.hidden_size * next(self.model.parameters()).element_size()
        stride = max(1, -(-per_layer * num_layers // RECORDED_INPUT_BYTES))
        self.recorded, reported = [], []
        for batch in batches:
            inputs, handles = layer_inputs(self.model)
            try:
                reported += run_forward_only(self.model, [batch], step)
            finally:
                for h in handles:
                    h.remove()
            self.recorded.append({i: inputs[i] for i in range(stride, num_layers, stride)})
        return reported

    def _from_recorded(self, skipped: list[int]) -> float:
        was_training = self.model.training
        self.model.eval()
        step = lm_forward_step(self.vocab_size, layout().device)
        batches = self._batches()
        if self.recorded is None:
            full = mean_token_loss(self._record(batches, step))[0]
            if not skipped:
                self.model.train(was_training)
                return full
            if "" not in self.measured:  # the recording pass measured the full model
                self.measured[""] = full
        reported = []
        for batch, inputs in zip(batches, self.recorded):
            start = max((i for i in inputs if i <= skipped[0]), default=0) if skipped else 0
            forwards = {**(_starting_forwards(start, inputs[start]) if start else {}),
                        **{i: passed_through for i in skipped}}
            with replaced_forwards(self.model, forwards):
                reported += run_forward_only(self.model, [batch], step)
        self.model.train(was_training)
        return mean_token_loss(reported)[0]


def _tick(progress) -> None:
    if progress is not None:
        progress.update(1)


def layer_loss_drops(losses: SkipLosses, num_layers: int, progress=None) -> list[float]:
    full = losses()
    drops = []
    for i in range(num_layers):
        drops.append(losses([i]) - full)
        _tick(progress)
    return drops


def best_contiguous_blocks(losses: SkipLosses, num_layers: int, block_sizes: Sequence[int],
                           progress=None) -> dict[str, dict]:
    """{k: {"start", "layers", "loss", "loss_increase", "candidates": [loss per start]}}."""
    full = losses()
    best: dict[str, dict] = {}
    for k in block_sizes:
        candidates = []
        for start in range(num_layers - k + 1):
            candidates.append(losses(range(start, start + k)))
            _tick(progress)
        start = min(range(len(candidates)), key=candidates.__getitem__)
        best[str(k)] = {"start": start, "layers": list(range(start, start + k)), "loss": candidates[start],
                        "loss_increase": candidates[start] - full, "candidates": candidates}
    return best


def greedy_drop_order(losses: SkipLosses, num_layers: int, steps: int, progress=None, done: Sequence[dict] = (),
                      on_step=None) -> list[dict]:
    """Backward elimination by LM loss: at each step skip, in addition to the layers already
    removed, the layer whose removal raises the loss least (ties: the lower index), and
    re-score the rest with it gone. Returns one entry per step, ``{"layer", "loss",
    "candidates": [loss without each layer too, None for those already removed]}``; the
    first k entries are the k layers to drop. Costs sum over steps of (layers left) passes.
    ``done``: steps of an interrupted run to resume from; ``on_step(entries)`` is called
    after each step."""
    order = list(done)
    removed = [e["layer"] for e in order]
    while len(order) < steps:
        candidates: list[float | None] = [None] * num_layers
        for j in range(num_layers):
            if j in removed:
                continue
            candidates[j] = losses(removed + [j])
            _tick(progress)
        layer = min((j for j in range(num_layers) if j not in removed), key=lambda j: (candidates[j], j))
        removed.append(layer)
        order.append({"layer": layer, "loss": candidates[layer], "candidates": candidates})
        if on_step is not None:
            on_step(order)
    return order


def drop_set_losses(losses: SkipLosses, blocks: dict[str, dict], loss_drop: Sequence[float],
                    block_importance: Sequence[float], greedy: Sequence[dict] = (), progress=None) -> dict[str, dict]:
    """{k: {"contiguous"|"greedy"|"loss"|"block": {"layers", "loss"}, "best": the metric of least
    loss}} for every block size of ``blocks``, each set's loss measured on ``losses``' samples;
    ``greedy`` (``greedy_drop_order``'s steps) adds its first k removals where it reaches k.
    Ties go to the first of contiguous, greedy, loss, block."""
    out: dict[str, dict] = {}
    for k, block in blocks.items():
        candidates = {"contiguous": list(block["layers"])}
        if len(greedy) >= int(k):
            candidates["greedy"] = sorted(e["layer"] for e in greedy[: int(k)])
        for metric, scores in (("loss", loss_drop), ("block", block_importance)):
            candidates[metric] = sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[: int(k)])
        sets = {}
        for metric, layers in candidates.items():
            sets[metric] = {"layers": layers, "loss": losses(layers)}
            _tick(progress)
        sets["best"] = min(candidates, key=lambda m: sets[m]["loss"])
        out[k] = sets
    return out
