"""Basin figures (the paper's Fig. 5): loss along random directions, radius histograms."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..basin import BasinResult, Rollouts
from .style import BAD, GOOD, axes

__all__ = ["plot_rollouts", "plot_radius_hist"]

_COLORS = [GOOD, BAD, "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]


def _labelled(results, kind) -> list[tuple[str, object]]:
    if isinstance(results, kind):
        return [("", results)]
    if isinstance(results, Mapping):
        return list(results.items())
    return [(str(i), r) for i, r in enumerate(results)]


def plot_rollouts(results: Rollouts | Mapping[str, Rollouts | None] | list[Rollouts | None],
                  ax=None, alpha: float = 0.35):
    """Train loss along each random direction against the signed distance, log scale.

    ``results``: one :class:`Rollouts` or ``{label: Rollouts}`` (e.g. good and bad
    model, drawn in the shared GOOD/BAD colours); the cutoff is a dashed line.
    A ``None`` (a run saved without rollouts) draws nothing but keeps its colour, so
    each run has the colour it has in :func:`plot_radius_hist` beside it.
    """
    ax = axes(ax)
    cutoffs = set()
    for i, (label, ro) in enumerate(_labelled(results, Rollouts)):
        if ro is None:
            continue
        color = _COLORS[i % len(_COLORS)]
        ts, loss = ro.ts.numpy(), ro.loss.numpy()
        for k in range(loss.shape[0]):
            ax.plot(ts, loss[k], color=color, lw=0.8, alpha=alpha,
                    label=label if (k == 0 and label) else None)
        if np.isfinite(ro.cutoff):
            cutoffs.add(ro.cutoff)
    for c in sorted(cutoffs):
        ax.axhline(c, color="k", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("distance along filter-normalised direction")
    ax.set_ylabel("train loss")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return ax


def plot_radius_hist(results: BasinResult | Mapping[str, BasinResult] | list[BasinResult],
                     ax=None, bins: int = 30):
    """Histograms of the radii (log10 axis) of several runs side by side.

    Radii of exactly 0 (centre already above the cutoff) cannot sit on a log
    axis; their count is given in the legend.
    """
    ax = axes(ax)
    items = _labelled(results, BasinResult)
    pos = np.concatenate([r.radii.numpy()[r.radii.numpy() > 0] for _, r in items] or [[]])
    if len(pos):
        lo, hi = np.log10(pos.min()), np.log10(pos.max())
        edges = np.logspace(lo - 0.05, hi + 0.05, bins + 1)
    else:
        edges = np.logspace(-3, 0, bins + 1)
    for i, (label, r) in enumerate(items):
        radii = r.radii.numpy()
        zeros = int((radii == 0).sum())
        text = (f"{label}: " if label else "") + f"mean r {r.mean_radius:.3g}, " \
            f"log10 V {r.log10_volume:.4g}" + (f", {zeros} zero" if zeros else "")
        ax.hist(radii[radii > 0], bins=edges, color=_COLORS[i % len(_COLORS)], alpha=0.6,
                label=text)
    ax.set_xscale("log")
    ax.set_xlabel("basin radius")
    ax.set_ylabel("directions")
    ax.legend(fontsize=7)
    return ax
