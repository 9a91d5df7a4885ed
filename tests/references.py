"""Independent references computed from the Hugging Face implementation of the same
weights (float64), for checks that must not reuse the code under test."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def hf_loss(model, samples: torch.Tensor) -> float:
    """Mean next-token cross-entropy of ``samples [n, s+1]``."""
    with torch.no_grad():
        logits = model(samples[:, :-1]).logits.double()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), samples[:, 1:].flatten()).item()


def hf_layer_scores(hf_dir: Path, calibration: torch.Tensor, layer_samples: int,
                    block_sizes: tuple[int, ...] = ()) -> dict:
    """Depth importance by definition: the loss increase when a layer (or a contiguous block)
    is deleted from the HF model, on the first ``layer_samples`` samples; Block Importance
    1 - mean cos(layer input, layer output) over all calibration tokens; greedy elimination
    (each step deletes the layer whose deletion, with the earlier ones deleted, leaves the
    lowest loss) down to the largest block size."""
    from nemo_minitron.checkpoint.verify import load_hf_model

    model = load_hf_model(hf_dir).double().eval()
    layer_set = calibration[:layer_samples]
    full = hf_loss(model, layer_set)
    n = len(model.model.layers)

    def without(layers) -> float:
        copy_ = copy.deepcopy(model)
        for i in sorted(layers, reverse=True):
            del copy_.model.layers[i]
        return hf_loss(copy_, layer_set)

    cos_sum, count = torch.zeros(n, dtype=torch.float64), 0
    seen = {}
    hooks = [layer.register_forward_hook(
        lambda m, a, o, i=i: seen.__setitem__(i, (a[0], o[0] if isinstance(o, tuple) else o)))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(calibration[:, :-1])
    for h in hooks:
        h.remove()
    for i, (x_in, x_out) in seen.items():
        cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)
        cos_sum[i] = cos.sum()
        count = cos.numel()
    blocks = {}
    for k in block_sizes:
        losses = [without(range(s, s + k)) for s in range(n - k + 1)]
        start = min(range(len(losses)), key=losses.__getitem__)
        blocks[k] = {"start": start, "layers": list(range(start, start + k)), "losses": losses}
    greedy: list[dict] = []
    for _ in range(max(block_sizes, default=0)):
        gone = [e["layer"] for e in greedy]
        losses = {j: without(gone + [j]) for j in range(n) if j not in gone}
        layer = min(losses, key=losses.__getitem__)
        greedy.append({"layer": layer, "loss": losses[layer], "candidates": losses})
    return {"full_loss": full, "loss_drop": [without([i]) - full for i in range(n)],
            "block_importance": (1 - cos_sum / count).tolist(), "blocks": blocks, "greedy": greedy}
