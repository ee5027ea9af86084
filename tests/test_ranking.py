"""Scores of a measure against the gap: oracles (self, random, reversed) and hand computations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import kendalltau

from minefield.ranking import cmi_score, granulated_tau, kendall_tau, score_measures


def test_kendall_tau_of_a_measure_with_itself_is_one_and_reversed_minus_one():
    x = np.random.default_rng(0).normal(size=50)  # continuous: no ties
    assert kendall_tau(x, x) == 1.0
    assert kendall_tau(x, -x) == -1.0
    assert kendall_tau(x, np.exp(x)) == 1.0  # only the order counts


def test_kendall_tau_of_a_random_column_is_near_zero():
    # sd of tau under independence: sqrt(2 (2n + 5) / (9 n (n - 1))) = 0.033 at n = 400
    rng = np.random.default_rng(1)
    taus = [kendall_tau(rng.normal(size=400), rng.normal(size=400)) for _ in range(20)]
    assert all(abs(t) < 4 * 0.0334 for t in taus)
    assert abs(np.mean(taus)) < 4 * 0.0334 / math.sqrt(20)


def test_kendall_tau_is_tau_a_and_agrees_with_scipy_without_ties():
    rng = np.random.default_rng(2)
    g, m = rng.normal(size=30), rng.normal(size=30)
    assert kendall_tau(g, m) == pytest.approx(kendalltau(g, m).statistic, abs=1e-12)
    # with ties, a tie counts 0 (Jiang et al. eq. 2): 3 concordant of 6 ordered pairs
    assert kendall_tau([1, 2, 3], [1, 1, 2]) == pytest.approx(4 / 6)


def test_kendall_tau_leaves_out_nan_and_needs_two_models():
    assert kendall_tau([1, 2, float("nan"), 3], [1, 2, 0, 3]) == 1.0
    assert math.isnan(kendall_tau([1.0], [2.0]))
    with pytest.raises(ValueError, match="1-d of one length"):
        kendall_tau([1, 2], [1, 2, 3])


def test_infinite_values_are_values_and_tie_with_each_other():
    # log10 V = -inf (radius 0) is the smallest volume: dropping it turned -0.5 into +1.0
    gap, vol = [0.1, 0.2, 0.8, 0.9], [-200.0, -100.0, -math.inf, -math.inf]
    assert kendall_tau(gap, vol) == -0.5  # tau-a: 4 discordant, 1 concordant, 1 tied of 6
    g = np.random.default_rng(0).random(12)
    mu = np.where(g > 0.6, -np.inf, -100 * g)  # scipy ranks -inf as the smallest value
    n, c = 12, kendall_tau(g, mu) * 12 * 11 / 2  # concordant minus discordant pairs
    ties = sum((mu == v).sum() * ((mu == v).sum() - 1) / 2 for v in set(mu.tolist()))
    want = kendalltau(g, mu).statistic * math.sqrt(n * (n - 1) / 2 * (n * (n - 1) / 2 - ties))
    assert c == pytest.approx(want, abs=1e-9)
    row = score_measures([{"gap": a, "v": b, "lr": i} for i, (a, b) in enumerate(zip(gap, vol))],
                         ["v"], ["lr"])[0]
    assert row["n"] == 4 and row["kendall_tau"] == -0.5


def test_equal_gaps_from_accuracy_differences_tie():
    # 2/200 as a difference of two accuracies: three floats; tau counted their order
    train, test = [150 / 200, 163 / 200, 150 / 200], [148 / 200, 161 / 200, 148 / 200]
    assert len({a - b for a, b in zip(train, test)}) > 1  # the rounding noise is real
    rows = [{"gap": a - b, "m": m, "lr": i} for i, (a, b, m) in
            enumerate(zip(train, test, [1.0, 2.0, 0.0]))]  # unrounded: tau -0.667
    assert score_measures(rows, ["m"], ["lr"])[0]["kendall_tau"] == 0.0


def test_equal_gaps_tie_where_the_exact_gap_is_a_tie_of_the_rounding():
    # 8192 train / 1000 test points: both gaps are -0.0088779296875 exactly (13 decimals),
    # the float differences fall on either side of it: rounded alone, -0.008877929687 and
    # -0.008877929688, an order the taus counted (tau -1.0, not 0)
    from minefield.sweep import sweep_rows

    pairs = [(1 / 8192, 9 / 1000), (1025 / 8192, 134 / 1000)]
    assert len({round(a - b, 12) for a, b in pairs}) == 2  # the noise is real
    basin = SimpleNamespace(mean_radius=1.0, median_radius=1.0, log10_volume=0.0,
                            n_mean_log10_r=0.0, ci_log10_volume=(0.0, 0.0), centre_loss=0.0,
                            n_at_r_max=0)
    metrics = {"train_acc": [a for a, _ in pairs], "test_acc": [b for _, b in pairs],
               **{k: [0.0, 0.0] for k in ("poison_acc", "train_loss", "test_loss")}}
    rows = sweep_rows([(0.0, 0), (0.0, 1)], metrics, [basin, basin])
    assert rows[0]["gap"] == rows[1]["gap"] == round(-0.0088779296875, 12)
    assert kendall_tau([r["gap"] for r in rows], [0.0, 1.0]) == 0.0

    from minefield.ranking import accuracy_gap

    assert accuracy_gap(0.75, 0.5) == 0.25 and accuracy_gap(2 / 3, 1 / 3) == round(1 / 3, 12)
    assert math.isnan(accuracy_gap(0.5, float("nan")))


def _grid_3x2():
    # lr in {1, 2, 3} x bs in {8, 64}
    design = [{"lr": lr, "bs": bs} for bs in (8, 64) for lr in (1, 2, 3)]
    gap = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    mu = [1.0, 3.0, 2.0, 4.0, 5.0, 1.5]
    return gap, mu, design


def test_granulated_tau_against_a_hand_computation():
    gap, mu, design = _grid_3x2()
    psi, per_axis = granulated_tau(gap, mu, design, ("lr", "bs"))
    # lr varies, bs = 8: gaps .1 .2 .3, measure 1 3 2: pairs +1 +1 -1 -> tau = 2 * 1 / 6 = 1/3
    # lr varies, bs = 64: gaps .4 .5 .6, measure 4 5 1.5: pairs +1 -1 -1 -> tau = -1/3
    assert per_axis["lr"] == pytest.approx(0.0)
    # bs varies at lr = 1, 2, 3: (.1, .4) vs (1, 4): +1; (.2, .5) vs (3, 5): +1;
    # (.3, .6) vs (2, 1.5): -1 -> psi_bs = 1/3
    assert per_axis["bs"] == pytest.approx(1 / 3)
    assert psi == pytest.approx(1 / 6)


def test_granulated_tau_holds_replicates_fixed_and_rejects_unknown_axes():
    gap, mu, design = _grid_3x2()
    # two seeds with the same numbers: each group is per seed, the means do not change
    d2 = [{**d, "seed": s} for s in (0, 1) for d in design]
    psi, per_axis = granulated_tau(gap * 2, mu * 2, d2, ("lr", "bs"))
    assert psi == pytest.approx(1 / 6) and per_axis["bs"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="not design columns"):
        granulated_tau(gap, mu, design, ("width",))
    with pytest.raises(ValueError, match="design rows"):
        granulated_tau(gap, mu, design[:3], ("lr",))


def _cube(mu_of):
    design = [{"a": a, "b": b, "c": c} for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    gap = [float(d["c"]) for d in design]
    return gap, [mu_of(d) for d in design], design


def test_cmi_score_against_a_hand_computation():
    # gap = c. The measure agrees with c where a = 0 and is reversed where a = 1.
    gap, mu, design = _cube(lambda d: float(d["c"] if d["a"] == 0 else 1 - d["c"]))
    # Conditioning on (a, b) leaves c free: each of the 16 cells holds 4 ordered pairs.
    # Cells with a_i = a_j = 0: V_mu = V_g, counts (+,+)=1, (-,-)=3:
    #   I = H(V_g) = H(1/4) = 0.811278 bits.
    # The other 12 cells: (+g,-mu)=1, (-g,+mu)=1, (-g,-mu)=2:
    #   I = 2 * 1/4 log2(4/3) + 1/2 log2(8/9) = 0.122556 bits.
    # Score (a, b) = mean I / mean H = (0.811278 + 3 * 0.122556) / 4 / 0.811278 = 0.363300.
    # Conditioning on (a, c) or (b, c) fixes c, so the gap's sign: H = 0, skipped.
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    i_rest = 0.5 * math.log2(4 / 3) + 0.5 * math.log2(8 / 9)
    expected = (h + 3 * i_rest) / 4 / h
    assert expected == pytest.approx(0.363300, abs=1e-6)
    assert cmi_score(gap, mu, design, ("a", "b", "c")) == pytest.approx(expected, abs=1e-12)


def test_cmi_score_is_one_for_the_gap_itself_and_small_for_noise():
    rng = np.random.default_rng(3)
    design = [{"a": a, "b": b, "c": c} for a in range(3) for b in range(3) for c in range(3)]
    gap = rng.normal(size=len(design))
    assert cmi_score(gap, gap, design, ("a", "b", "c")) == pytest.approx(1.0)
    assert cmi_score(gap, np.exp(gap), design, ("a", "b", "c")) == pytest.approx(1.0)
    noise = [cmi_score(gap, rng.normal(size=len(design)), design, ("a", "b", "c"))
             for _ in range(10)]
    assert max(noise) < 0.25


def test_cmi_score_is_nan_where_the_grid_does_not_allow_it():
    gap, mu, design = _cube(lambda d: float(d["a"] + d["c"]))
    assert math.isnan(cmi_score(gap[:4], mu[:4], design[:4], ("a", "b")))  # two hparams
    assert math.isnan(cmi_score(gap[:7], mu[:7], design[:7], ("a", "b", "c")))  # incomplete
    assert math.isnan(cmi_score(gap, [float("nan")] + mu[1:], design, ("a", "b", "c")))
    with pytest.raises(ValueError, match="design rows"):
        cmi_score(gap, mu, design[:3], ("a", "b", "c"))


def test_score_measures_one_row_per_measure_and_flatness_negated_for_cmi():
    gap, mu, design = _cube(lambda d: float(d["c"] if d["a"] == 0 else 1 - d["c"]))
    rows = [{**d, "gap": g, "m": m, "r": -m} for d, g, m in zip(design, gap, mu)]
    out = score_measures(rows, ["m", "r"], ["a", "b", "c"], replicates=["c"], flatness=["r"])
    assert [s["measure"] for s in out] == ["m", "r"]
    assert set(out[0]) >= {"psi_a", "psi_b"} and "psi_c" not in out[0]
    assert out[1]["kendall_tau"] == pytest.approx(-out[0]["kendall_tau"])
    assert out[1]["granulated_tau"] == pytest.approx(-out[0]["granulated_tau"])
    assert out[0]["cmi"] == out[1]["cmi"] == pytest.approx(0.363300, abs=1e-6)
    assert out[0]["n"] == 8


def test_cmi_score_leaves_out_a_hyper_parameter_with_one_value():
    """A design field with one value (``--vary train.seed=0`` beside lr and batch size)
    conditions on nothing: it had counted as the third hyper-parameter (0.63 where two
    varied fields are NaN) and, beside three varied ones, lowered the score (0.442 for
    0.543) through the sets that paired it with one real hyper-parameter."""
    rng = np.random.default_rng(0)
    two = [{"lr": a, "bs": b} for a in range(3) for b in range(3)]
    g = rng.random(9)
    mu = g + 0.3 * rng.random(9)
    assert math.isnan(cmi_score(g, mu, two, ("lr", "bs")))
    assert math.isnan(cmi_score(g, mu, [{**d, "seed": 0} for d in two], ("lr", "bs", "seed")))
    three = [{"lr": a, "bs": b, "w": c} for a in range(3) for b in range(2) for c in range(2)]
    g = rng.random(12)
    mu = g + 0.5 * rng.random(12)
    want = cmi_score(g, mu, three, ("lr", "bs", "w"))
    assert math.isfinite(want)
    got = cmi_score(g, mu, [{**d, "seed": 0} for d in three], ("lr", "bs", "w", "seed"))
    assert got == pytest.approx(want, abs=1e-12)


def test_n_counts_the_models_the_scores_use():
    """An infinite target beside an infinite measure (loss_gap inf, log10 V -inf) is a
    model the taus use; n had summed the two columns and counted inf - inf = NaN out."""
    inf = math.inf
    rows = [{"loss_gap": inf, "v": -inf, "lr": 0}, {"loss_gap": 1.0, "v": -1.0, "lr": 1},
            {"loss_gap": 2.0, "v": -2.0, "lr": 2}]
    (row,) = score_measures(rows, ["v"], ["lr"], target="loss_gap")
    assert row["kendall_tau"] == -1.0 and row["n"] == 3
