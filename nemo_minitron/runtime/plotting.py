"""Plots are files, never windows: every figure of the project is drawn through ``pyplot()``."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend. Imported here, when a plot is drawn:
    choosing a backend at import would change it for a program that imports nemo_minitron."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def integer_ticks(axis) -> None:
    """Ticks at whole numbers only (layers, heads, cells of an image: never 0.5)."""
    axis.set_major_locator(pyplot().MaxNLocator(integer=True))


def plain_log_labels(axis) -> None:
    """A log axis labelled 26 and 0.003 rather than 2.6x10^1 and 3x10^-3: matplotlib's choice
    of which ticks to label (minor ones on a range of less than a decade), plain numbers."""
    class Plain(pyplot().LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            return f"{x:g}"

    axis.set_major_formatter(Plain())
    axis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
