"""Study figures: each measure against the generalization gap, the scores, a trajectory,
and the models grouped by setting (replicates side by side)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..study import REPLICATES, TRAJECTORY
from .style import CMAP_ACC, axes, note_minus_inf, save_figure

__all__ = ["plot_measure", "plot_scores", "plot_trajectory", "plot_groups", "group_label",
           "diverged_note", "study_figures"]

_TARGET = {"gap": "generalization gap (train - test accuracy)",
           "loss_gap": "test loss - train loss"}


def _colour_field(design: list[str]) -> str | None:
    axes_ = [d for d in design if d not in REPLICATES]
    return axes_[0] if axes_ else (design[0] if design else None)


def _value_order(v: str) -> tuple:
    """Sort key of a field's value (its JSON text): numbers by value, then the rest by
    text. The colours of :func:`plot_measure` run along a sequential map in this order:
    sorted as text, batch sizes 8, 16, 32, 128 came out 128, 16, 32, 8."""
    x = json.loads(v)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return (0, float(x), v)
    return (1, 0.0, v)


def diverged_note(rows: list[dict], fields: list[str]) -> str:
    """``"2 of 6 models diverged (loss NaN/inf), not drawn: lr=1e+30 (2)"``, or ``""``.

    A diverged model's row is NaN: no axis shows it, and without this note a figure
    looked like the whole study (a setting whose every replicate diverged was simply
    not on it)."""
    bad = [r for r in rows if r.get("diverged")]
    if not bad:
        return ""
    where = {}
    for r in bad:
        lab = group_label(r, fields) if fields else ""
        where[lab] = where.get(lab, 0) + 1
    named = ", ".join(f"{lab} ({k})" for lab, k in where.items() if lab)
    return (f"{len(bad)} of {len(rows)} models diverged (loss NaN/inf), not drawn"
            + (f": {named}" if named else ""))


def plot_measure(result, measure: str, target: str = "gap", ax=None):
    """``measure`` (y) against the gap (x), one dot per model, coloured by the study's
    first varied field (its values in numeric order along the colour map, and in the
    legend); the title holds its Kendall tau and granulated tau. Models at
    -inf (log10 V of a basin of radius 0) are counted in a note (:func:`note_minus_inf`),
    and so are diverged models (:func:`diverged_note`)."""
    ax = axes(ax)
    rows = result.rows
    x = np.array([r[target] for r in rows], dtype=float)
    y = np.array([r.get(measure, np.nan) for r in rows], dtype=float)
    by = _colour_field(result.design)
    if by is None:
        ax.scatter(x, y, s=14)
    else:
        values = sorted({json.dumps(r[by]) for r in rows}, key=_value_order)
        cmap = plt.get_cmap(CMAP_ACC, max(len(values), 2))
        for k, v in enumerate(values):
            sel = np.array([json.dumps(r[by]) == v for r in rows])
            ax.scatter(x[sel], y[sel], s=14, color=cmap(k), label=f"{by} {v}")
        if len(values) <= 12:
            ax.legend(fontsize=7)
    score = next((s for s in result.scores if s["measure"] == measure), None)
    title = measure
    if score is not None:
        title += f"  (tau {score['kendall_tau']:+.2f}, Psi {score['granulated_tau']:+.2f})"
    ax.set_title(title)
    note_minus_inf(ax, x, y, measure)
    note = diverged_note(rows, [d for d in result.design if d not in REPLICATES])
    if note:
        ax.text(0.5, 0.98, note, transform=ax.transAxes, ha="center", va="top", fontsize=7,
                color="C3")
    ax.set_xlabel(_TARGET.get(target, target))
    ax.set_ylabel(measure)
    return ax


def plot_scores(result, ax=None):
    """Kendall tau and granulated tau of every measure against the study's target (the
    generalization gap by default), as bars. A NaN score (too few models, a constant
    column) is written "NaN" where its bar would start: a bar of NaN is not drawn, and
    looked exactly like a score of 0."""
    ax = axes(ax, figsize=(6.0, 0.35 * len(result.scores) + 1.2))
    names = [s["measure"] for s in result.scores]
    pos = np.arange(len(names))
    for key, shift, label in (("kendall_tau", -0.2, "Kendall tau"),
                              ("granulated_tau", 0.2, "granulated tau")):
        vals = np.array([s[key] for s in result.scores], dtype=float)
        ax.barh(pos + shift, vals, 0.4, label=label)
        for k in np.flatnonzero(np.isnan(vals)):
            ax.text(0.02, pos[k] + shift, "NaN", ha="left", va="center", fontsize=6,
                    color="C3")
    ax.set_yticks(pos, names)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlim(-1, 1)
    ax.invert_yaxis()
    target = getattr(result, "target", "gap")
    ax.set_xlabel(f"rank correlation with the {_TARGET.get(target, target)}")
    ax.legend(fontsize=7)
    return ax


def plot_trajectory(result, columns: tuple[str, ...] = ("mean_radius", "lambda_max",
                                                         "test_err"), x: str = TRAJECTORY):
    """One panel per column against the step, one line per model of the study
    (``test_err`` is 1 - test accuracy). Returns the figure."""
    cols = [c for c in columns if c == "test_err" or any(c in r for r in result.rows)]
    fig, axs = plt.subplots(len(cols), 1, figsize=(4.5, 1.9 * len(cols)), sharex=True,
                            squeeze=False)
    lines: dict[tuple, list] = {}
    for r in result.rows:
        lines.setdefault((r["stack"], r["member"]), []).append(r)
    for ax, c in zip(axs[:, 0], cols):
        for rs in lines.values():
            rs = sorted(rs, key=lambda r: r[x])
            ys = [1 - r["test_acc"] if c == "test_err" else r[c] for r in rs]
            ax.plot([r[x] for r in rs], ys, "-o", ms=2, lw=1)
        ax.set_ylabel(c)
    axs[-1, 0].set_xlabel(x)
    return fig


#: Columns of :func:`plot_groups`, those a study has.
GROUP_COLUMNS = ("test_acc", "gap", "mean_radius", "log10_volume", "lambda_max", "trace",
                 "worst_l2", "asam", "average")
#: Most settings :func:`study_figures` draws side by side in ``groups.png``.
MAX_GROUPS = 16


def group_label(row: dict, fields: list[str]) -> str:
    """``"sam=asam, rho=0.5"``: a row's values of ``fields`` (dotted names, section dropped)."""
    return ", ".join(f"{f.split('.', 1)[-1]}={row[f]}" for f in fields)


def plot_groups(result, columns: tuple[str, ...] = GROUP_COLUMNS):
    """One panel per column (those the study has), one position per setting (the
    values of every varied field but the replicates, in the order of the table),
    a dot per model (replicates) and a bar at their mean. A model at -inf (log10 V of
    a basin of radius 0) is counted at the foot of its setting ("2 at -inf") and its
    setting gets no bar: its mean is -inf, not the mean of the others. Diverged models
    (rows of NaN) are not drawn; the figure's title says how many and where
    (:func:`diverged_note`). Returns the figure."""
    fields = [d for d in result.design if d not in REPLICATES]
    rows = [r for r in result.rows if not r.get("diverged")]
    labels = list(dict.fromkeys(group_label(r, fields) for r in rows))
    cols = [c for c in columns if any(not np.isnan(float(r.get(c, np.nan))) for r in rows)]
    n = max(len(cols), 1)
    ncol = min(n, 3)
    nrow = -(-n // ncol)
    fig, axs = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.3 * nrow), squeeze=False)
    pos = np.arange(len(labels))
    for ax, c in zip(axs.flat, cols):
        for k, lab in enumerate(labels):
            ys = np.array([float(r.get(c, np.nan)) for r in rows
                           if group_label(r, fields) == lab])
            low = int(np.isneginf(ys).sum())
            ys = ys[np.isfinite(ys)]
            ax.scatter(np.full(len(ys), k), ys, s=10, color="0.3", zorder=3)
            if low:
                ax.text(k, 0.02, f"{low} at\n-inf", transform=ax.get_xaxis_transform(),
                        ha="center", va="bottom", fontsize=6, color="C3")
            elif len(ys):
                ax.hlines(ys.mean(), k - 0.3, k + 0.3, color="C3", lw=2)
        ax.set_xticks(pos, labels, rotation=40, ha="right", fontsize=6)
        ax.set_xlim(-0.5, len(labels) - 0.5)  # also when nothing finite is drawn
        ax.set_title(c)
    for ax in list(axs.flat)[len(cols):]:
        ax.set_visible(False)
    note = diverged_note(result.rows, fields)
    if note:
        fig.suptitle(note, fontsize=7, color="C3")
    return fig


def study_figures(result, out_dir: str | Path) -> list[Path]:
    """Every figure of a study: ``<measure>.png`` per measure, ``scores.png``; when the
    study varies ``train.steps``, ``trajectory.png``, else when it has replicates
    (seeds) of at most :data:`MAX_GROUPS` settings, ``groups.png``
    (:func:`plot_groups`); returns the written paths."""
    out_dir = Path(out_dir)
    paths = []
    target = result.target
    for m in result.measures:
        ax = plot_measure(result, m, target)
        paths += save_figure(ax.figure, out_dir / m, ("png",))
    paths += save_figure(plot_scores(result).figure, out_dir / "scores", ("png",))
    if TRAJECTORY in result.design:
        paths += save_figure(plot_trajectory(result), out_dir / "trajectory", ("png",))
    elif _grouped(result):
        paths += save_figure(plot_groups(result), out_dir / "groups", ("png",))
    return paths


def _grouped(result) -> bool:
    fields = [d for d in result.design if d not in REPLICATES]
    if not fields or len(fields) == len(result.design):
        return False
    return len({group_label(r, fields) for r in result.rows}) <= MAX_GROUPS
