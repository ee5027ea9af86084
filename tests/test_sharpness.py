"""Sharpness measures against the closed forms of quadratics and plain per-point loops."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch.func import functional_call

from minefield.config import ConfigError, ModelConfig
from minefield.curvature import dense_hessian
from minefield.hvp import NonFiniteLoss, Objective, model_objective
from minefield.loss import nll
from minefield.measures import MEASURES, SharpnessConfig
from minefield.models import build_model
from minefield.sharpness import (
    average_sharpness,
    m_sharpness,
    pac_bayes_sigma,
    worst_case_sharpness,
)
from minefield.stacked import flatten, member, one, unflatten
from minefield.train import init_stack


def _quad(ev, m=2, centre=None, seed=0):
    n = len(ev)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    a = q @ torch.diag(torch.as_tensor(ev, dtype=torch.float64)) @ q.T
    c = torch.zeros(n, dtype=torch.float64) if centre is None else centre
    w = {"w": c.expand(m, n).clone()}
    return Objective.from_function(w, lambda p: (p["w"] - c) @ a @ (p["w"] - c) / 2), a


EV = [4.0, 2.0] + torch.linspace(0.1, 1.0, 18).tolist()


def _mlp(m=3, n=40, activation="relu"):
    model = build_model(ModelConfig(widths=(8, 8), activation=activation), (2,), 2)
    p = {k: v.double() for k, v in init_stack(model, "glorot_uniform", range(m)).items()}
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,),
                                                                              generator=g)
    return model, p, (x, y)


def test_worst_case_l2_of_a_quadratic_is_rho2_lambda_max_over_2():
    obj, _ = _quad(EV)
    for rho in (0.01, 0.3):
        s = worst_case_sharpness(obj, rho, steps=30, restarts=2)
        torch.testing.assert_close(s.value, torch.full((2,), rho ** 2 * 4.0 / 2,
                                                       dtype=torch.float64), rtol=1e-6, atol=0)
        assert s.value.le(rho ** 2 * 4.0 / 2 * (1 + 1e-12)).all()  # a maximum found, never above


def test_worst_case_linf_of_a_diagonal_quadratic_is_the_corner():
    ev = torch.tensor(EV, dtype=torch.float64)
    w = {"w": torch.zeros(1, len(ev), dtype=torch.float64)}
    obj = Objective.from_function(w, lambda p: (ev * p["w"] ** 2).sum() / 2)
    s = worst_case_sharpness(obj, 0.05, norm="linf", steps=3)
    torch.testing.assert_close(s.value, (0.05 ** 2 * ev.sum() / 2).reshape(1), rtol=1e-12, atol=0)


def test_worst_linf_default_finds_the_brute_force_corner_where_2_restarts_fail():
    """A convex loss peaks at a corner of the box, so enumerating all 2^10 corners is the
    oracle. Sign ascent stops at corners that are only local maxima: 2 restarts miss the
    maximum here; the measure's default (8 L-inf restarts) finds it at every seed, and its
    spread column shows the restarts ending apart."""
    n, rho = 10, 0.1
    u = torch.randn(3, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = u.T @ torch.diag(torch.tensor([1.0, 0.9, 0.8], dtype=torch.float64)) @ u
    obj = Objective.from_function({"w": torch.zeros(1, n, dtype=torch.float64)},
                                  lambda p: p["w"] @ a @ p["w"] / 2)
    corners = rho * torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)),
                                 dtype=torch.float64)
    best = float(((corners @ a) * corners).sum(1).max() / 2)
    two = [float(worst_case_sharpness(obj, rho, "linf", restarts=2, seed=s).value)
           for s in range(10)]
    assert sum(v < 0.99 * best for v in two) >= 2  # 2 restarts miss it at some seeds
    spreads = []
    for seed in range(10):
        cols = MEASURES["worst_linf"](obj, SharpnessConfig(rho_linf=rho, seed=seed))
        assert float(cols[""]) == pytest.approx(best, rel=1e-12), seed
        assert math.isnan(float(cols["_stderr"]))
        spreads.append(float(cols["_spread"]))
    assert max(spreads) > 0.1 * best and min(spreads) >= 0
    # one maximum (a diagonal quadratic peaks at every corner alike): no spread
    d = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    flat = Objective.from_function({"w": torch.zeros(1, 2, dtype=torch.float64)},
                                   lambda p: p["w"] @ d @ p["w"] / 2)
    assert float(worst_case_sharpness(flat, rho, "linf", restarts=8).spread) == 0.0


def test_adaptive_ball_scales_with_the_weights():
    c = torch.linspace(-2.0, 3.0, len(EV), dtype=torch.float64)
    obj, a = _quad(EV, m=1, centre=c)
    t = torch.diag(c.abs() + 0.01)
    lam = float(torch.linalg.eigvalsh(t @ a @ t)[-1])
    s = worst_case_sharpness(obj, 0.1, adaptive=True, steps=60, restarts=2)
    torch.testing.assert_close(s.value, torch.tensor([0.01 * lam / 2], dtype=torch.float64),
                               rtol=1e-5, atol=0)


def test_worst_case_is_batched_without_changing_any_member():
    model, p, data = _mlp(m=3)
    obj = model_objective(model, p, data)
    stacked = worst_case_sharpness(obj, 0.2, restarts=3, steps=5)
    for i in range(3):
        single = model_objective(model, one(p, i), data)
        torch.testing.assert_close(worst_case_sharpness(single, 0.2, restarts=3, steps=5).value,
                                   stacked.value[i:i + 1], rtol=1e-10, atol=1e-12)
    # the ascent beats the best of 200 random points on the sphere
    g = torch.Generator().manual_seed(0)
    w = flatten(one(p, 0))
    z = torch.randn(200, w.shape[1], generator=g, dtype=torch.float64)
    pts = unflatten(w + 0.2 * z / z.norm(dim=1, keepdim=True), p)
    x, y = data
    net = copy.deepcopy(model).double()
    rand = max(float(nll(functional_call(net, member(pts, j), (x,)), y).mean())
               for j in range(200))
    assert float(stacked.value[0]) > rand - float(obj.losses()[0])


def test_average_sharpness_quadratic_and_engine_against_loops():
    obj, a = _quad(EV, m=1)
    s = average_sharpness(obj, 0.1, n_samples=400)
    truth = 0.1 ** 2 * a.trace() / 2
    assert abs(float(s.value[0]) - float(truth)) < 4 * float(s.stderr[0])
    model, p, data = _mlp(m=2)
    obj = model_objective(model, p, data)
    sig, k = 0.02, 16
    got = average_sharpness(obj, sig, n_samples=k, seed=5)
    x, y = data
    net = copy.deepcopy(model).double()
    for i in range(2):  # the same antithetic probes, one perturbed model at a time
        w = flatten({kk: v[i:i + 1] for kk, v in p.items()})
        z = torch.randn(k, w.shape[1], generator=torch.Generator().manual_seed(5),
                        dtype=torch.float64)

        def loss(flat):
            return float(nll(functional_call(net, {kk: v[0] for kk, v in
                                                    unflatten(flat[None], p).items()}, (x,)),
                             y).mean())

        base = loss(w[0])
        incs = torch.tensor([(loss(w[0] + sig * z[j]) + loss(w[0] - sig * z[j])) / 2 - base
                             for j in range(k)], dtype=torch.float64)
        torch.testing.assert_close(got.value[i], incs.mean(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.stderr[i], incs.std() / math.sqrt(k), rtol=1e-7, atol=0)
    # small sigma on a smooth (tanh) net: sigma^2 tr(H) / 2, up to O(sigma^4) and the
    # Monte-Carlo error (ReLU kinks break the Taylor expansion at any finite sigma)
    model, p, data = _mlp(m=2, activation="tanh")
    obj = model_objective(model, p, data)
    small = average_sharpness(obj, 1e-3, n_samples=400, seed=1)
    tr = dense_hessian(model, p, data).diagonal(dim1=1, dim2=2).sum(1)
    assert ((small.value - 1e-6 * tr / 2).abs() <= 4 * small.stderr + 1e-9).all()


def test_m_sharpness_with_m_equal_to_n_is_the_worst_case():
    model, p, data = _mlp(m=2, n=30)
    obj = model_objective(model, p, data)
    full = worst_case_sharpness(obj, 0.1, steps=4)
    torch.testing.assert_close(m_sharpness(obj, 0.1, m=30, steps=4).value, full.value,
                               rtol=1e-10, atol=1e-12)
    # m = 10: three disjoint subsets, averaged
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    parts = [worst_case_sharpness(obj.restrict(perm[j * 10:(j + 1) * 10]), 0.1, steps=4).value
             for j in range(3)]
    got = m_sharpness(obj, 0.1, m=10, steps=4)
    torch.testing.assert_close(got.value, torch.stack(parts).mean(0))
    assert (got.value > full.value).all()  # smaller batches: a sharper worst case


def test_pac_bayes_sigma_of_a_quadratic():
    obj, a = _quad(EV, m=1)
    n, k, bound = len(EV), 64, 0.01
    z = torch.randn(k, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean_q = float(torch.einsum("kn,nj,kj->k", z, a, z).mean())
    sig = pac_bayes_sigma(obj, bound=bound, n_samples=k, rtol=1e-4)
    # with the same probes at every sigma: deviation = sigma^2 mean(z^T A z) / 2 exactly
    torch.testing.assert_close(sig, torch.tensor([math.sqrt(2 * bound / mean_q)],
                                                 dtype=torch.float64), rtol=1e-4, atol=0)
    many = pac_bayes_sigma(obj, bound=bound, n_samples=2000, rtol=1e-4)
    assert abs(float(many) / math.sqrt(2 * bound / float(a.trace())) - 1) < 0.03



def test_pac_bayes_sigma_outside_the_first_bracket_is_found_not_clipped():
    """sigma' beyond [lo, hi] widens the bracket: it used to come back as hi (or lo), so a
    flat model showed sigma' = 1.0 (the measure's hi) whatever its flatness."""
    obj, a = _quad(EV, m=1)
    k = 64
    z = torch.randn(k, len(EV), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean_q = float(torch.einsum("kn,nj,kj->k", z, a, z).mean())
    for bound, kw in ((1e6, {"hi": 0.5}), (1e-12, {"lo": 0.1}), (0.01, {"lo": 0.5, "hi": 0.6})):
        want = math.sqrt(2 * bound / mean_q)  # deviation = sigma^2 mean(z^T A z) / 2
        got = float(pac_bayes_sigma(obj, bound=bound, n_samples=k, rtol=1e-4, **kw))
        assert abs(got / want - 1) < 2e-4, (bound, kw, got, want)
    flat = Objective.from_function({"w": torch.zeros(1, 3, dtype=torch.float64)},
                                   lambda p: 0 * p["w"].sum())
    assert float(pac_bayes_sigma(flat)) == math.inf  # no noise level crosses the bound


def test_bad_inputs_raise_one_clear_error():
    obj, _ = _quad(EV)
    with pytest.raises(ConfigError, match="rho must be a finite number > 0, got -0.1"):
        worst_case_sharpness(obj, -0.1)
    with pytest.raises(ConfigError, match="steps and restarts must be >= 1"):
        worst_case_sharpness(obj, 0.1, steps=0)
    with pytest.raises(ConfigError, match="norm: 'l1' is not one of"):
        worst_case_sharpness(obj, 0.1, norm="l1")
    with pytest.raises(ConfigError, match="sigma must be a finite number > 0"):
        average_sharpness(obj, 0.0)
    with pytest.raises(ConfigError, match="n_samples must be >= 2"):
        average_sharpness(obj, 0.1, n_samples=1)
    with pytest.raises(ConfigError, match="m-sharpness needs a model objective"):
        m_sharpness(obj, 0.1, m=2)
    with pytest.raises(ConfigError, match="need 0 < lo < hi"):
        pac_bayes_sigma(obj, lo=1.0, hi=0.5)
    with pytest.raises(ConfigError, match="bound must be a finite number > 0"):
        pac_bayes_sigma(obj, bound=-1)
    with pytest.raises(ConfigError, match="n_samples must be >= 1, got 0"):  # had read 1e-5
        pac_bayes_sigma(obj, n_samples=0)
    for field, bad, msg in (("steps", 2.5, "an integer"), ("seed", 2**70, "an integer"),
                            ("rho", "0.1", "a number"), ("m", True, "an integer")):
        with pytest.raises(ConfigError, match=f"{field} must be {msg}"):
            SharpnessConfig(**{field: bad})
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match="eta must be a finite number >= 0"):
            worst_case_sharpness(obj, 0.1, adaptive=True, eta=bad)
        with pytest.raises(ConfigError, match="eta must be a finite number >= 0"):
            average_sharpness(obj, 0.1, adaptive=True, eta=bad)
        with pytest.raises(ConfigError, match="eta must be a finite number >= 0"):
            pac_bayes_sigma(obj, adaptive=True, eta=bad)
    for bad in (math.inf, math.nan):
        with pytest.raises(ConfigError, match="rho must be a finite number > 0"):
            worst_case_sharpness(obj, bad)
        with pytest.raises(ConfigError, match="sigma must be a finite number > 0"):
            average_sharpness(obj, bad)
    with pytest.raises(ConfigError, match="hi must be a finite number > 0"):
        pac_bayes_sigma(obj, hi=math.inf)
    model, p, data = _mlp(m=1, n=10)
    with pytest.raises(ConfigError, match=r"m must be in \[1, 10\]"):
        m_sharpness(model_objective(model, p, data), 0.1, m=11)
    for bad in (0, -1):  # no subset: torch.stack of nothing, a raw RuntimeError
        with pytest.raises(ConfigError, match=f"n_subsets must be >= 1 .*, got {bad}"):
            m_sharpness(model_objective(model, p, data), 0.1, m=2, n_subsets=bad)
    # counts that are not integers: one ConfigError each, not a TypeError deep in torch
    mobj = model_objective(model, p, data)
    for call, name in ((lambda: worst_case_sharpness(obj, 0.1, steps=2.5), "steps"),
                       (lambda: worst_case_sharpness(obj, 0.1, restarts=2.5), "restarts"),
                       (lambda: average_sharpness(obj, 0.1, n_samples=4.5), "n_samples"),
                       (lambda: pac_bayes_sigma(obj, n_samples=4.5), "n_samples"),
                       (lambda: m_sharpness(mobj, 0.1, m=2.5), "m"),
                       (lambda: m_sharpness(mobj, 0.1, m=2, n_subsets=1.5), "n_subsets")):
        with pytest.raises(ConfigError, match=f"{name} must be an integer"):
            call()
    p["0.bias"][0, 0] = float("inf")
    with pytest.raises(NonFiniteLoss, match="NaN or infinite"):
        average_sharpness(model_objective(model, p, data), 0.1)


def test_batchnorm_policies_through_the_engine_match_a_plain_loop():
    from tests.test_hvp import _resnet

    model, p, x, y, bufs = _resnet()
    k, sig = 3, 0.05
    for bn in ("eval", "batch"):
        obj = model_objective(model, p, (x, y), bufs if bn == "eval" else None, bn=bn)
        got = average_sharpness(obj, sig, n_samples=k, seed=2)
        net = copy.deepcopy(model).double().train(bn == "batch")
        for i in range(2):
            w = flatten({kk: v[i:i + 1] for kk, v in p.items()})
            z = torch.randn(k, w.shape[1], generator=torch.Generator().manual_seed(2),
                            dtype=torch.float64)
            state = {kk: v[i] for kk, v in bufs.items()} if bn == "eval" else {}

            def loss(flat, state=state, net=net):
                q = {kk: v[0] for kk, v in unflatten(flat[None], p).items()}
                out = functional_call(net, (q, {kk: v.clone() for kk, v in state.items()}), (x,))
                return float(nll(out, y).mean())

            base = loss(w[0])
            incs = torch.tensor([(loss(w[0] + sig * z[j]) + loss(w[0] - sig * z[j])) / 2 - base
                                 for j in range(k)], dtype=torch.float64)
            torch.testing.assert_close(got.value[i], incs.mean(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("norm, adaptive", [("l2", False), ("linf", False), ("l2", True)])
def test_worst_case_sharpness_is_never_below_zero(norm, adaptive):
    """delta = 0 is in the ball: at a local maximum (L = w^T A w / 2, A < 0, at w = 0)
    ascent from random starts had reported -4.3e-2 (L-inf), -2.0e-3 (L2)."""
    obj, _ = _quad([-v for v in EV], m=1)
    if adaptive:  # ASAM scales by |w| + eta: a centre away from 0, the maximum still there
        obj, _ = _quad([-v for v in EV], m=1, centre=torch.full((len(EV),), 0.5,
                                                               dtype=torch.float64))
    r = worst_case_sharpness(obj, 0.1, norm=norm, adaptive=adaptive)
    assert r.value.item() == 0.0


def test_measure_functions_default_to_the_cli_settings():
    """``mf.pac_bayes_sigma(obj)`` and the other measure functions, called with their
    defaults, use ``SharpnessConfig``'s (the CLI's) settings: pac_bayes_sigma drew 32
    pairs for the CLI's 64 (sigma' 0.450 for 0.400 on a blobs MLP)."""
    import inspect

    c = SharpnessConfig()
    want = {worst_case_sharpness: {"steps": c.steps, "restarts": c.restarts, "eta": c.eta,
                                   "seed": c.seed},
            average_sharpness: {"n_samples": c.n_samples, "eta": c.eta, "seed": c.seed},
            pac_bayes_sigma: {"bound": c.bound, "n_samples": c.n_samples, "eta": c.eta,
                              "seed": c.seed}}
    for fn, kw in want.items():
        got = {k: inspect.signature(fn).parameters[k].default for k in kw}
        assert got == kw, fn.__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("adaptive", [False, True])
def test_antithetic_probes_are_the_formula_in_contiguous_tensors(dtype, adaptive):
    """[T z, -T z] with z ~ N(0, I) drawn in float64 from the seed and rounded to the
    parameters' dtype, T = |w| + eta (ASAM) or I; each parameter's own contiguous tensor,
    which the engine takes without a copy (hunt 47: 5-6 probe-sized copies before)."""
    from minefield.sharpness import _probes

    model = build_model(ModelConfig(widths=(7, 5)), (3,), 3).to(dtype)
    p = {k: v.to(dtype) for k, v in init_stack(model, "glorot_uniform", [0, 1]).items()}
    obj = model_objective(model, p, (torch.randn(20, 3, dtype=dtype), torch.randint(0, 3, (20,))))
    w = flatten(one(p, 1))
    z = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64).to(dtype)
    d = (w.abs() + 0.01) * z if adaptive else z
    want = unflatten(torch.cat([d, -d]), p)
    got = _probes(obj, 5, 3, adaptive, 0.01, 1)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) and got[k].is_contiguous() for k in want)
