"""How well a measure ranks models by their generalization gap: three scores.

Given models with a generalization gap ``g`` (train minus test accuracy) and a
measure ``mu`` (basin radius, top Hessian eigenvalue, ...), every score here
looks only at the *signs* of differences between pairs of models.

* **Kendall's tau** as Jiang et al. (2019, "Fantastic generalization measures
  and where to find them", eq. 2) define it, over the set T of models::

      tau(T) = 1 / (|T| (|T| - 1)) * sum_{i != j} sign(mu_i - mu_j) sign(g_i - g_j)

  (tau-a: a tie counts 0). 1: the measure orders the models exactly as the gap
  does; -1: exactly reversed (a *flatness* measure such as the radius should be
  negative); 0: unrelated.
* **Granulated tau** (Jiang et al. 2019, eq. 3): for each hyper-parameter axis
  ``a`` of a grid, ``psi_a`` is the mean of tau over the sets of models that
  differ *only* in ``a`` (one set per fixing of every other design column), and
  ``Psi`` the mean of ``psi_a`` over the axes. A measure that tracks the gap only
  because both follow one hyper-parameter scores well on that axis alone.
* **Conditional mutual information** of the NeurIPS 2020 PGDL competition
  (Jiang et al. 2020): over all ordered pairs of models (i, j), ``V_g =
  [g_i > g_j]`` and ``V_mu = [mu_i > mu_j]``; for a pair of hyper-parameters
  S = {h1, h2}, the pairs are split into cells by ``(h1_i, h1_j, h2_i, h2_j)``;
  the score of S is ``mean_cells I(V_mu; V_g) / mean_cells H(V_g)`` (bits), and
  the measure's score the minimum over S. It needs a complete grid of at least
  three hyper-parameters with two or more values each (conditioning on two leaves a
  third free; a field with one value is no hyper-parameter); sets S that
  fix the gap's sign in every cell (``mean H = 0``) say nothing and are skipped.
  Pairs (i, i) count too, so the score depends on the measure's orientation:
  it expects a measure that *grows* with the gap (a complexity), and
  :func:`score_measures` negates flatness measures (radius, volume) first.

Example::

    >>> g = [0.1, 0.2, 0.3, 0.4]
    >>> kendall_tau(g, [1.0, 2.0, 3.0, 4.0]), kendall_tau(g, [4.0, 3.0, 2.0, 1.0])
    (1.0, -1.0)
    >>> design = [{"lr": 1, "bs": 8}, {"lr": 2, "bs": 8}, {"lr": 1, "bs": 64}, {"lr": 2, "bs": 64}]
    >>> psi, per_axis = granulated_tau(g, [1.0, 2.0, 4.0, 3.0], design, ("lr", "bs"))
    >>> per_axis, psi
    ({'lr': 0.0, 'bs': 1.0}, 0.5)
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

__all__ = ["kendall_tau", "granulated_tau", "cmi_score", "score_measures", "GAP_DECIMALS",
           "accuracy_gap"]


#: decimals a gap is rounded to: a difference of two accuracies (counts / n) comes out
#: as up to 8 floats for one count difference (362 of 401 levels on 200 points), and
#: rounding noise would count as order (three models of gap 2/200: tau -0.667, not 0)
GAP_DECIMALS = 12

#: largest split size :func:`accuracy_gap` recovers a count ratio ``c / n`` for: two ratios
#: of denominators <= this differ by >= 2**-52, far above the float error of ``c / n``
_MAX_SPLIT = 2**26


def accuracy_gap(train_acc: float, test_acc: float) -> float:
    """``train_acc - test_acc`` rounded to :data:`GAP_DECIMALS`, the same float for every
    pair of accuracies (count ratios ``c / n``) with the same exact difference.

    Each accuracy is taken back to its exact fraction ``c / n`` first (``n`` up to
    2**26), so the difference is rounded once, from its exact value. The plain float
    difference is off by an ulp one way or the other, which rounding to 12 decimals
    only hides while the exact gap is not a tie of that rounding: with 8192 training
    and 1000 test points, 1/8192 - 9/1000 and 1025/8192 - 134/1000 are both
    -0.0088779296875 exactly, but came out as -0.008877929687 and -0.008877929688,
    and the taus counted their order. Not finite (an empty split): the plain difference.

    Example::

        >>> accuracy_gap(1 / 8192, 9 / 1000) == accuracy_gap(1025 / 8192, 134 / 1000)
        True
    """
    if not (math.isfinite(train_acc) and math.isfinite(test_acc)):
        return train_acc - test_acc
    a, b = (Fraction(v).limit_denominator(_MAX_SPLIT) for v in (train_acc, test_acc))
    return round(float(a - b), GAP_DECIMALS)


def _known_pairs(gap: Sequence[float], measure: Sequence[float]) -> tuple[np.ndarray, ...]:
    g, mu = np.asarray(gap, dtype=float), np.asarray(measure, dtype=float)
    if g.shape != mu.shape or g.ndim != 1:
        raise ValueError(f"gap and measure must be 1-d of one length, got {g.shape} and "
                         f"{mu.shape}")
    ok = ~np.isnan(g) & ~np.isnan(mu)
    return g[ok], mu[ok]


def _signs(v: np.ndarray) -> np.ndarray:
    """``sign(v_i - v_j)`` by comparison: -inf against -inf is a tie, not NaN."""
    return (v[:, None] > v[None, :]).astype(int) - (v[:, None] < v[None, :])


def kendall_tau(gap: Sequence[float], measure: Sequence[float]) -> float:
    """Jiang et al.'s Kendall tau between ``gap`` and ``measure`` (tau-a; pairs with a
    NaN value are left out; NaN when fewer than two models remain). An infinite value
    is a value: a log-volume of -inf (radius 0) is the smallest, tied only with another
    -inf (dropping it turned tau -0.5 into +1.0 on four models).

    Raises:
        ValueError: the two sequences differ in length.
    """
    g, mu = _known_pairs(gap, measure)
    n = len(g)
    if n < 2:
        return float("nan")
    return float((_signs(g) * _signs(mu)).sum() / (n * (n - 1)))


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def granulated_tau(gap: Sequence[float], measure: Sequence[float],
                   design: Sequence[Mapping[str, Any]], axes: Sequence[str]
                   ) -> tuple[float, dict[str, float]]:
    """``(Psi, {axis: psi_axis})``: Jiang et al.'s granulated Kendall coefficient.

    ``design[i]`` holds model i's design columns (every varied hyper-parameter,
    replicate seeds included); ``axes`` are the columns to granulate over. For
    axis ``a``, models are grouped by all *other* design columns; tau within each
    group of at least two models is averaged into ``psi_a`` (NaN without such a
    group); ``Psi`` is the mean of the finite ``psi_a``.

    Raises:
        ValueError: ``design`` has another length than ``gap``, or an axis is not a
            design column.
    """
    if len(design) != len(gap):
        raise ValueError(f"{len(design)} design rows for {len(gap)} models")
    cols = sorted({k for d in design for k in d})
    missing = [a for a in axes if a not in cols]
    if missing:
        raise ValueError(f"axes {missing} are not design columns {cols}")
    per_axis = {}
    for a in axes:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, d in enumerate(design):
            groups[_key({k: d.get(k) for k in cols if k != a})].append(i)
        taus = [kendall_tau([gap[i] for i in idx], [measure[i] for i in idx])
                for idx in groups.values() if len(idx) > 1]
        taus = [t for t in taus if not math.isnan(t)]
        per_axis[a] = float(np.mean(taus)) if taus else float("nan")
    finite = [v for v in per_axis.values() if not math.isnan(v)]
    return (float(np.mean(finite)) if finite else float("nan")), per_axis


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def _mi_bits(table: np.ndarray) -> float:
    """Mutual information (bits) of a 2 x 2 table of counts."""
    joint = table / table.sum()
    pg, pm = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (pg @ pm)[nz])).sum())


def cmi_score(gap: Sequence[float], measure: Sequence[float],
              design: Sequence[Mapping[str, Any]], hparams: Sequence[str]) -> float:
    """The PGDL conditional-mutual-information score (see the module docstring).

    ``hparams`` that take one value in ``design`` are left out (they condition on
    nothing). NaN when the grid does not allow it: fewer than three ``hparams`` with two
    or more values, a NaN in
    ``gap`` or ``measure``, a grid that is not complete with each combination once,
    or every conditioning set fixing the gap's sign.

    Raises:
        ValueError: ``design`` has another length than ``gap``.
    """
    if len(design) != len(gap) or len(measure) != len(gap):
        raise ValueError(f"{len(design)} design rows, {len(gap)} gaps, {len(measure)} measures")
    g, mu = np.asarray(gap, dtype=float), np.asarray(measure, dtype=float)
    if np.isnan(g).any() or np.isnan(mu).any():
        return float("nan")
    keys = [tuple(_key(d.get(h)) for h in hparams) for d in design]
    # a field with one value conditions on nothing: it is no hyper-parameter of the grid
    # (counted, it made two varied fields a score, and lowered that of three)
    varied = [j for j in range(len(hparams)) if len({k[j] for k in keys}) > 1]
    keys = [tuple(k[j] for j in varied) for k in keys]
    n_cells = math.prod(len({k[j] for k in keys}) for j in range(len(varied)))
    if len(varied) < 3 or len(set(keys)) != len(keys) or len(keys) != n_cells:
        return float("nan")
    vg = (g[:, None] > g[None, :]).astype(int)  # (n, n): V_g of the ordered pair (i, j)
    vm = (mu[:, None] > mu[None, :]).astype(int)
    best = float("nan")
    for a, b in itertools.combinations(range(len(varied)), 2):
        cells: dict[tuple, np.ndarray] = defaultdict(lambda: np.zeros((2, 2)))
        for i, j in itertools.product(range(len(g)), repeat=2):
            cells[(keys[i][a], keys[j][a], keys[i][b], keys[j][b])][vg[i, j], vm[i, j]] += 1
        mi = np.mean([_mi_bits(t) for t in cells.values()])
        h = np.mean([_entropy_bits(t.sum(1)) for t in cells.values()])
        if h > 0:
            best = min(best, mi / h) if not math.isnan(best) else mi / h
    return float(best)


def score_measures(rows: Sequence[Mapping[str, Any]], measures: Sequence[str],
                   design: Sequence[str], replicates: Sequence[str] = (),
                   target: str = "gap", flatness: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per measure: Kendall tau, granulated tau (``Psi`` and one ``psi_<axis>``
    per design column that is not a replicate) and the CMI score against ``target``.

    ``rows`` is a tidy table (one dict per model); ``design`` its varied
    hyper-parameter columns; ``replicates`` (e.g. ``train.seed``) are held fixed in
    the granulated tau but are not axes of it, and are hyper-parameters of the CMI.
    Measures in ``flatness`` (larger = flatter, expected to fall as the gap grows)
    are negated for the CMI only; the taus keep every measure's own sign.
    ``n`` counts the models with a value (not NaN) in both columns. The target is
    rounded to :data:`GAP_DECIMALS` decimals (accuracy differences tie exactly).
    """
    gap = [round(float(r[target]), GAP_DECIMALS) for r in rows]
    des = [{k: r[k] for k in design} for r in rows]
    axes = [d for d in design if d not in replicates]
    out = []
    for m in measures:
        mu = [float(r[m]) if r.get(m) is not None else float("nan") for r in rows]
        psi, per_axis = granulated_tau(gap, mu, des, axes)
        out.append({"measure": m, "n": int((~np.isnan(mu) & ~np.isnan(gap)).sum()),
                    "kendall_tau": kendall_tau(gap, mu), "granulated_tau": psi,
                    **{f"psi_{a}": v for a, v in per_axis.items()},
                    "cmi": cmi_score(gap, [-v for v in mu] if m in flatness else mu, des,
                                     list(design))})
    return out
