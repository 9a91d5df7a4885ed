"""Pictures of the importance scores (PNG, matplotlib's Agg backend). Each ``*_figure``
builds a figure (tests read its axes); ``write_plots`` saves them."""

from __future__ import annotations

from pathlib import Path

import torch

from nemo_minitron.runtime.plotting import integer_ticks, plain_log_labels, pyplot, save_figure


def layers_figure(block_importance: torch.Tensor, loss_drop: torch.Tensor, blocks: dict):
    plt = pyplot()
    layers = list(range(len(block_importance)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7, len(layers) * 0.28), 6), sharex=True)
    top.bar(layers, block_importance.tolist(), color="tab:blue")
    top.set_ylabel("block importance\n1 - cos(in, out)")
    bottom.bar(layers, loss_drop.tolist(), color="tab:red")
    bottom.set_ylabel("LM loss increase\nwhen skipped")
    bottom.set_xlabel("layer")
    integer_ticks(bottom.xaxis)  # one bar per layer: ticks on layers, not between them
    for k, best in blocks.items():
        bottom.axvspan(best["start"] - 0.5, best["start"] + int(k) - 0.5, color="grey", alpha=0.15)
        bottom.annotate(f"best {k}-block to drop (+{best['loss_increase']:.3f})", (best["start"], 0),
                        xytext=(0, 4), textcoords="offset points", fontsize=8)
    top.set_title("Layer importance")
    for ax in (top, bottom):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def heatmap_figure(scores: torch.Tensor, title: str, xlabel: str, sort: bool = False):
    """Layers x units; with ``sort``, each layer's units in descending order (shows the spread)."""
    plt = pyplot()
    data = scores.float()
    if sort:
        data = data.sort(dim=1, descending=True).values
    data = data / data.amax(dim=1, keepdim=True).clamp(min=1e-12)  # each layer relative to its best unit
    fig, ax = plt.subplots(figsize=(8, max(3, 0.18 * data.shape[0] + 1.5)))
    image = ax.imshow(data.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    integer_ticks(ax.xaxis)  # a cell's centre is its index: no half-step ticks between cells
    integer_ticks(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="score / layer's max")
    fig.tight_layout()
    return fig


def hidden_figure(hidden: torch.Tensor):
    plt = pyplot()
    ranked = hidden.float().sort(descending=True).values
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(ranked.numpy())
    ax.set_xlabel("embedding channel (ranked)")
    ax.set_ylabel("score (sum over norms)")
    ax.set_yscale("log")
    plain_log_labels(ax.yaxis)
    ax.set_title("Embedding channel importance")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_plots(tensors: dict[str, torch.Tensor], blocks: dict, directory: Path) -> list[str]:
    figures = {
        "layer_importance.png": layers_figure(tensors["layer_block_importance"], tensors["layer_loss_drop"], blocks),
        "heads.png": heatmap_figure(tensors["heads"], "Attention head importance", "head (grouped by query group)"),
    }
    if tensors["ffn"].numel():
        figures["ffn.png"] = heatmap_figure(tensors["ffn"], "MLP neuron importance (sorted within each layer)",
                                            "neuron rank", sort=True)
    if "experts" in tensors:  # a mixture of experts
        figures["experts.png"] = heatmap_figure(tensors["experts"], "Expert importance", "expert")
    figures["hidden.png"] = hidden_figure(tensors["hidden"])
    for name, fig in figures.items():
        save_figure(fig, directory / name)
    return list(figures)
