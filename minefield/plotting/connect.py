"""Mode-connectivity figure: loss and accuracy along t for the line and the Bezier curve."""

from __future__ import annotations

import matplotlib.pyplot as plt

from ..connectivity import ConnectResult
from .style import BAD, GOOD

__all__ = ["plot_connect"]


def plot_connect(result: ConnectResult, axs=None, pair: int = 0, title: str | None = None):
    """Train/test loss (left, log scale) and accuracy (right) along ``t`` of pair ``pair``.

    The straight line is dashed, the trained Bezier curve solid; train in
    :data:`~minefield.plotting.style.GOOD`, test in ``BAD`` colour. Returns the two axes.
    """
    if axs is None:
        _, axs = plt.subplots(1, 2, figsize=(8.0, 3.4))
    t = result.ts.numpy()
    for path, ls in ((result.line, "--"), (result.curve, "-")):
        name = "line" if path is result.line else "curve"
        for split, color in (("train", GOOD), ("test", BAD)):
            axs[0].plot(t, path[f"{split}_loss"][pair].numpy(), ls=ls, color=color,
                        label=f"{split}, {name}")
            axs[1].plot(t, path[f"{split}_acc"][pair].numpy(), ls=ls, color=color)
    axs[0].set_yscale("log")
    axs[0].set_xlabel("t")
    axs[0].set_ylabel("loss (nats)")
    axs[1].set_xlabel("t")
    axs[1].set_ylabel("accuracy")
    axs[0].legend(fontsize=7)
    if title:
        axs[0].set_title(title)
    return axs
