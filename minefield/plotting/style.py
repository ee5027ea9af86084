"""One shared look for every figure, and atomic saving to PNG/PDF."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..runs import atomic_write  # noqa: E402

__all__ = ["STYLE", "axes", "save_figure", "note_minus_inf", "GOOD", "BAD", "CMAP_STEP", "CMAP_ACC"]

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


# No creation date in the files, so the same figure gives the same bytes on every run
# (PNG stores none; PDF would store the time of writing, or $SOURCE_DATE_EPOCH).
_METADATA = {"pdf": {"CreationDate": None}}


def save_figure(fig, path: str | Path, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Write ``fig`` as ``path.<fmt>`` for each format, atomically; closes the figure.
    The same figure gives byte-identical files whenever it is written."""
    path = Path(path)
    out = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, bbox_inches="tight", metadata=_METADATA.get(fmt))
        target = path.with_suffix(f".{fmt}")
        atomic_write(target, buf.getvalue())
        out.append(target)
    plt.close(fig)
    return out


def note_minus_inf(ax, x, y, name: str) -> str:
    """Say on ``ax`` how many dots ``(x, y)`` are not drawn because ``y`` is -inf, and
    return that note (``""`` when none is): ``"3 of 12 models not drawn: log10_volume =
    -inf (a volume of 0)"``, centred when nothing is drawn at all.

    A basin of radius 0 (the centre's loss above the cutoff) has log10 V = -inf: a
    real value, not a missing one, but no axis can show it, and a figure must not
    drop it silently (or be an empty axes with no word why)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    k = int(np.isneginf(y).sum())
    if not k:
        return ""
    if k == int((~np.isnan(y)).sum()):
        note = f"all {k} models have {name} = -inf (a volume of 0): nothing to draw"
    else:
        note = f"{k} of {len(y)} models not drawn: {name} = -inf (a volume of 0)"
    empty = not (np.isfinite(x) & np.isfinite(y)).any()
    ax.text(0.5, 0.5 if empty else 0.02, note, transform=ax.transAxes, ha="center",
            va="center" if empty else "bottom", fontsize=7, color="C3")
    return note
