"""Pictures of the importance scores (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

from pathlib import Path

import torch

from nemo_minitron.runtime.plotting import pyplot


def plot_layers(block_importance: torch.Tensor, loss_drop: torch.Tensor, blocks: dict, out: Path) -> None:
    plt = pyplot()
    layers = list(range(len(block_importance)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7, len(layers) * 0.28), 6), sharex=True)
    top.bar(layers, block_importance.tolist(), color="tab:blue")
    top.set_ylabel("block importance\n1 - cos(in, out)")
    bottom.bar(layers, loss_drop.tolist(), color="tab:red")
    bottom.set_ylabel("LM loss increase\nwhen skipped")
    bottom.set_xlabel("layer")
    for k, best in blocks.items():
        bottom.axvspan(best["start"] - 0.5, best["start"] + int(k) - 0.5, color="grey", alpha=0.15)
        bottom.annotate(f"best {k}-block to drop (+{best['loss_increase']:.3f})", (best["start"], 0),
                        xytext=(0, 4), textcoords="offset points", fontsize=8)
    top.set_title("Layer importance")
    for ax in (top, bottom):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_heatmap(scores: torch.Tensor, title: str, xlabel: str, out: Path, sort: bool = False) -> None:
    """Layers x units; with ``sort``, each layer's units in descending order (shows the spread)."""
    plt = pyplot()
    data = scores.float()
    if sort:
        data = data.sort(dim=1, descending=True).values
    data = data / data.amax(dim=1, keepdim=True).clamp(min=1e-12)  # each layer relative to its best unit
    fig, ax = plt.subplots(figsize=(8, max(3, 0.18 * data.shape[0] + 1.5)))
    image = ax.imshow(data.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="score / layer's max")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_hidden(hidden: torch.Tensor, out: Path) -> None:
    plt = pyplot()
    ranked = hidden.float().sort(descending=True).values
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(ranked.numpy())
    ax.set_xlabel("embedding channel (ranked)")
    ax.set_ylabel("score (sum over norms)")
    ax.set_yscale("log")
    ax.set_title("Embedding channel importance")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def write_plots(tensors: dict[str, torch.Tensor], blocks: dict, directory: Path) -> list[str]:
    plot_layers(tensors["layer_block_importance"], tensors["layer_loss_drop"], blocks, directory / "layer_importance.png")
    plot_heatmap(tensors["heads"], "Attention head importance", "head (grouped by query group)", directory / "heads.png")
    written = ["layer_importance.png", "heads.png"]
    if tensors["ffn"].numel():
        plot_heatmap(tensors["ffn"], "MLP neuron importance (sorted within each layer)", "neuron rank",
                     directory / "ffn.png", sort=True)
        written.append("ffn.png")
    if "experts" in tensors:  # a mixture of experts
        plot_heatmap(tensors["experts"], "Expert importance", "expert", directory / "experts.png")
        written.append("experts.png")
    plot_hidden(tensors["hidden"], directory / "hidden.png")
    return written + ["hidden.png"]
