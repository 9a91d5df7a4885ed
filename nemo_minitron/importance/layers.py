"""Depth importance by language-model loss: what the model loses without a layer or a block.

loss_drop[i] = LM loss with layer i skipped (its output replaced by its input) minus the
full model's LM loss, on the same samples. For each requested block size k, every
contiguous run of k layers is skipped in turn and the run whose removal raises the loss
least is the best block to drop (the paper found this beats dropping the k individually
least important layers). Skipping works on whichever pipeline stage holds the layer.

No single rule wins at every depth (benchmarks/pruning_quality.py): for each block size k
``drop_set_losses`` also measures, on the same samples, the loss without the k layers of
lowest loss drop and without the k of lowest Block Importance (ModelOpt's rule), and
names the set of the three whose removal costs least (``--layer-metric best``).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch

from nemo_minitron.evaluate import evaluate
from nemo_minitron.model.params import unwrap


@contextlib.contextmanager
def skipped_layers(model, layers: Iterable[int]):
    """Within the block, the given global layers pass their input through unchanged."""
    wanted = set(layers)
    patched = []
    for layer in unwrap(model).decoder.layers:
        if layer.layer_number - 1 in wanted:
            def identity(*args, **kwargs):
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                return hidden, kwargs.get("context")
            layer.forward = identity
            patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward  # back to the class's forward


def loss_without(model, vocab_size: int, samples: torch.Tensor, layers: Sequence[int], micro_batch: int) -> float:
    with skipped_layers(model, layers):
        return evaluate(model, vocab_size, samples, micro_batch=micro_batch).loss


def layer_loss_drops(model, vocab_size: int, num_layers: int, samples: torch.Tensor, micro_batch: int,
                     full_loss: float, progress=None) -> list[float]:
    drops = []
    for i in range(num_layers):
        drops.append(loss_without(model, vocab_size, samples, [i], micro_batch) - full_loss)
        if progress is not None:
            progress.update(1)
    return drops


def best_contiguous_blocks(model, vocab_size: int, num_layers: int, samples: torch.Tensor, micro_batch: int,
                           full_loss: float, block_sizes: Sequence[int], progress=None) -> dict[str, dict]:
    """{k: {"start", "layers", "loss", "loss_increase", "candidates": [loss per start]}}."""
    best: dict[str, dict] = {}
    for k in block_sizes:
        losses = []
        for start in range(num_layers - k + 1):
            losses.append(loss_without(model, vocab_size, samples, range(start, start + k), micro_batch))
            if progress is not None:
                progress.update(1)
        start = min(range(len(losses)), key=losses.__getitem__)
        best[str(k)] = {"start": start, "layers": list(range(start, start + k)), "loss": losses[start],
                        "loss_increase": losses[start] - full_loss, "candidates": losses}
    return best


def drop_set_losses(model, vocab_size: int, samples: torch.Tensor, micro_batch: int, blocks: dict[str, dict],
                    loss_drop: Sequence[float], block_importance: Sequence[float]) -> dict[str, dict]:
    """{k: {"contiguous"|"loss"|"block": {"layers", "loss"}, "best": the metric of least loss}}
    for every block size of ``blocks`` (ties go to the first of contiguous, loss, block)."""
    out: dict[str, dict] = {}
    for k, block in blocks.items():
        candidates = {"contiguous": list(block["layers"])}
        for metric, scores in (("loss", loss_drop), ("block", block_importance)):
            candidates[metric] = sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[: int(k)])
        sets = {metric: {"layers": layers, "loss": loss_without(model, vocab_size, samples, layers, micro_batch)}
                for metric, layers in candidates.items()}
        sets["best"] = min(("contiguous", "loss", "block"), key=lambda m: sets[m]["loss"])
        out[k] = sets
    return out
