"""Plots are files, never windows: every figure of the project is drawn through ``pyplot()``."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend. Imported here, when a plot is drawn:
    choosing a backend at import would change it for a program that imports nemo_minitron."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
