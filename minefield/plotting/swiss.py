"""The paper's Figure 3: decision boundaries of a good and a bad minimum, with the
train loss along random directions around each and their basin radii."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from ..functional import one
from .basin import plot_radius_hist, plot_rollouts
from .boundary import plot_boundary
from .style import save_figure

__all__ = ["swiss_figure"]


def swiss_figure(good, bad, rollouts, basins, path: str | Path) -> list[Path]:
    """Boundaries (top), loss along 20 random directions and radius histograms (bottom).

    ``good``/``bad`` are :class:`~minefield.train.TrainResult`; ``rollouts`` and
    ``basins`` the matching (good, bad) pairs. Written as PNG and PDF.
    """
    fig, axs = plt.subplots(2, 2, figsize=(9, 8.4))
    for ax, res, label in ((axs[0, 0], good, "good"), (axs[0, 1], bad, "poisoned")):
        m = res.metrics
        plot_boundary(res.model, one(res.params, 0), res.data, ax=ax, resolution=250,
                      title=f"{label} minimum: train {m['train_acc'][0]:.0%}, "
                            f"test {m['test_acc'][0]:.0%}")
    plot_rollouts({"good": rollouts[0], "poisoned": rollouts[1]}, ax=axs[1, 0])
    axs[1, 0].set_title("train loss along random filter-normalised directions")
    plot_radius_hist({"good": basins[0], "poisoned": basins[1]}, ax=axs[1, 1])
    axs[1, 1].set_title(f"basin radii (cutoff {basins[0].cutoff:g}): log10 V "
                        f"{basins[0].log10_volume:.0f} vs {basins[1].log10_volume:.0f}")
    return save_figure(fig, path)
