"""The picture of a per-layer architecture: each layer's K/V groups and MLP width against
the parent's (PNG through runtime/plotting.py; tests read the figure's axes)."""

from __future__ import annotations

from typing import Sequence

from nemo_minitron.model.description import LayerShape
from nemo_minitron.runtime.plotting import integer_ticks, pyplot


def layer_shapes_figure(shapes: Sequence[LayerShape], parent_groups: int, parent_ffn: int, title: str):
    """Two bar panels over the layers: query groups and MLP width, the parent's as a dashed
    line; a removed block is a red cross at 0."""
    plt = pyplot()
    layers = list(range(len(shapes)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7, len(layers) * 0.28), 5.5), sharex=True)
    for ax, values, parent, label in ((top, [s.num_query_groups for s in shapes], parent_groups, "K/V groups"),
                                      (bottom, [s.ffn_hidden_size for s in shapes], parent_ffn, "MLP width")):
        ax.bar(layers, values, color="tab:blue" if ax is top else "tab:green")
        removed = [i for i, v in enumerate(values) if v == 0]
        ax.scatter(removed, [0] * len(removed), marker="x", color="tab:red", zorder=3,
                   label="removed" if removed else None)
        ax.axhline(parent, linestyle="--", color="grey", linewidth=1, label=f"parent ({parent})")
        ax.set_ylabel(label)
        ax.set_ylim(0, parent * 1.08)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="y", alpha=0.3)
    integer_ticks(top.yaxis)
    integer_ticks(bottom.xaxis)
    bottom.set_xlabel("layer")
    top.set_title(title)
    fig.tight_layout()
    return fig
