"""Decision boundaries of 2-D classifiers (the paper's Figure 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import ListedColormap

from ..data import Dataset
from ..functional import one, stacked_forward
from ..loss import predict
from .style import axes, save_figure

__all__ = ["plot_boundary", "boundary_grid", "boundary_row"]


@torch.no_grad()
def boundary_grid(model, params, x: torch.Tensor, buffers=None, resolution: int = 300,
                  margin: float = 0.1):
    """Predicted class on a ``resolution**2`` grid covering ``x``: ``(xx, yy, classes)``."""
    lo, hi = x.min(0).values.cpu().numpy(), x.max(0).values.cpu().numpy()
    pad = (hi - lo) * margin
    gx = np.linspace(lo[0] - pad[0], hi[0] + pad[0], resolution)
    gy = np.linspace(lo[1] - pad[1], hi[1] + pad[1], resolution)
    xx, yy = np.meshgrid(gx, gy)
    pts = torch.tensor(np.stack([xx.ravel(), yy.ravel()], 1), dtype=x.dtype, device=x.device)
    first, b = one(params, 0), one(buffers or None, 0)
    cls = predict(stacked_forward(model, first, pts, b))[0].cpu().numpy().reshape(xx.shape)
    return xx, yy, cls


@torch.no_grad()
def plot_boundary(model, params, data: Dataset, buffers=None, ax=None, title: str | None = None,
                  show_test: bool = True, resolution: int = 300):
    """Decision regions of member 0 of ``params`` with train (dots) and test (+) points.

    Misclassified points are drawn as black-edged crosses, as in the paper's Fig. 3.
    Returns the Axes.
    """
    if len(data.input_shape) != 1 or data.input_shape[0] != 2:
        raise ValueError(f"decision boundaries need 2-D inputs; {data.name} has shape "
                         f"{data.input_shape}")
    ax = axes(ax)
    xall = torch.cat([data.x_train, data.x_test])
    xx, yy, cls = boundary_grid(model, params, xall, buffers, resolution)
    ax.contourf(xx, yy, cls, levels=[-0.5, 0.5, 1.5], cmap=ListedColormap(["#aec7e8", "#f7b6b2"]),
                alpha=0.8)
    colors = np.array(["#1f4e9c", "#9c1f1f"])
    first, b = one(params, 0), one(buffers or None, 0)
    splits = [("train", "o", 14)] + ([("test", "P", 16)] if show_test else [])
    for split, marker, size in splits:
        x, y = data.split(split)
        pred = predict(stacked_forward(model, first, x, b))[0]
        xn, yn, wrong = x.cpu().numpy(), y.cpu().numpy(), (pred != y).cpu().numpy()
        ax.scatter(xn[~wrong, 0], xn[~wrong, 1], c=colors[yn[~wrong]], s=size, marker=marker,
                   linewidths=0, label=f"{split}")
        if wrong.any():
            ax.scatter(xn[wrong, 0], xn[wrong, 1], c=colors[yn[wrong]], s=size * 2.5,
                       marker="X", edgecolors="k", linewidths=0.6,
                       label=f"{split} errors ({int(wrong.sum())})")
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="lower left", fontsize=7)
    if title:
        ax.set_title(title)
    return ax


def boundary_row(model, params, data, titles: list[str], path: str | Path,
                 show_test: bool = False, resolution: int = 200) -> list[Path]:
    """Decision boundaries of every member of ``params`` side by side (Fig. 8), written
    as ``path.png`` and ``path.pdf``; returns the paths."""
    import matplotlib.pyplot as plt

    m = len(titles)
    fig, axs = plt.subplots(1, m, figsize=(3.4 * m, 3.4), squeeze=False)
    for i, ax in enumerate(axs[0]):
        plot_boundary(model, one(params, i), data, ax=ax, show_test=show_test,
                      resolution=resolution,
                      title=titles[i])
    return save_figure(fig, path)
