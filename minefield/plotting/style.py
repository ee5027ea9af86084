"""One shared look for every figure, and atomic saving to PNG/PDF."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..runs import atomic_write  # noqa: E402

__all__ = ["STYLE", "axes", "save_figure", "GOOD", "BAD", "CMAP_STEP", "CMAP_ACC"]

GOOD = "#d62728"  # SGD iterates / good models (the paper draws them red)
BAD = "#1f77b4"  # bad minima / poisoned models (blue)
CMAP_STEP = "autumn"
CMAP_ACC = "viridis"

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "figure.constrained_layout.use": True,
}
plt.rcParams.update(STYLE)


def axes(ax=None, figsize=(4.5, 4.0)):
    """``ax`` if given, else a fresh figure's axes."""
    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=figsize)
    return ax


def save_figure(fig, path: str | Path, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Write ``fig`` as ``path.<fmt>`` for each format, atomically; closes the figure."""
    path = Path(path)
    out = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, bbox_inches="tight")
        target = path.with_suffix(f".{fmt}")
        atomic_write(target, buf.getvalue())
        out.append(target)
    plt.close(fig)
    return out
