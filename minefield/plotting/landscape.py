"""Landscape figures: 1-D slices and 2-D surfaces (contour, filled contour, 3-D)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..landscape import Slice, Surface
from .style import BAD, GOOD, axes

__all__ = ["plot_slice", "plot_surface", "SURFACE_KINDS"]

SURFACE_KINDS = ("contour", "contourf", "surface3d")


def plot_slice(result: Slice, ax=None, metric: str = "loss", log: bool | None = None,
               ends: tuple[str, str] | None = None):
    """Metric along a 1-D slice: ``loss`` or ``acc`` one curve per split (train solid,
    test dashed), or one split's values (``test_loss``).

    ``ends`` labels t = 0 and t = 1 (e.g. the good and the bad model of a line).
    Loss uses a log axis unless ``log=False``.
    """
    ax = axes(ax)
    ts = result.ts.numpy()
    styles = {"train": ("-", GOOD), "test": ("--", BAD), "poison": (":", "#2ca02c")}
    kind = metric.rsplit("_", 1)[-1]
    keys = ([metric] if metric in result.values else
            [k for k in result.values if k.endswith(f"_{metric}")])
    if not keys:
        raise ValueError(f"no {metric!r} values in this slice; have {sorted(result.values)}")
    for k in keys:
        split = k[: -len(kind) - 1]
        ls, color = styles.get(split, ("-", "k"))
        ax.plot(ts, result.values[k].numpy(), ls=ls, color=color, label=split)
    if (log if log is not None else kind == "loss"):
        ax.set_yscale("log")
    if ends:
        for t, name in zip((0.0, 1.0), ends):
            ax.axvline(t, color="0.6", lw=0.6)
            ax.annotate(name, (t, 1.0), xycoords=("data", "axes fraction"), ha="center",
                        va="bottom", fontsize=8)
    ax.set_xlabel("t")
    ax.set_ylabel(metric)
    ax.legend()
    return ax


def plot_surface(result: Surface, ax=None, kind: str = "contour", metric: str = "train_loss",
                 log: bool | None = None, levels: int = 20):
    """A 2-D landscape as ``contour``, ``contourf`` or ``surface3d`` (NaN rows left blank).

    ``surface3d`` needs a 3-D axes (one is made when ``ax`` is None). Losses are
    drawn as log10 unless ``log=False``.
    """
    if kind not in SURFACE_KINDS:
        raise ValueError(f"unknown surface kind {kind!r}; choose from {', '.join(SURFACE_KINDS)}")
    if metric not in result.values:
        raise ValueError(f"no {metric!r} in this surface; have {sorted(result.values)}")
    z = result.values[metric].numpy().T  # rows of the plot are ys
    use_log = log if log is not None else metric.endswith("loss")
    if use_log:
        z = np.log10(np.clip(z, 1e-12, None))
    xx, yy = np.meshgrid(result.xs.numpy(), result.ys.numpy())
    label = f"log10 {metric}" if use_log else metric
    if kind == "surface3d":
        if ax is None:
            fig = plt.figure(figsize=(5, 4))
            ax = fig.add_subplot(projection="3d")
        elif getattr(ax, "name", "") != "3d":
            raise ValueError("surface3d needs a 3-D axes (projection='3d')")
        ax.plot_surface(xx, yy, np.ma.masked_invalid(z), cmap="viridis", linewidth=0)
        ax.set_zlabel(label)
    else:
        ax = axes(ax)
        fn = ax.contour if kind == "contour" else ax.contourf
        cs = fn(xx, yy, np.ma.masked_invalid(z), levels=levels, cmap="viridis")
        ax.figure.colorbar(cs, ax=ax, label=label)
        ax.plot([0], [0], "k*", ms=8)
        ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    return ax
