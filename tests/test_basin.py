import math
import warnings

import pytest
import torch
from scipy.special import gammaln

from minefield.basin import (
    BasinResult,
    BasinWarning,
    VolumeConfig,
    basin_members,
    basin_radii,
    bootstrap_log10_volume,
    find_radii,
    log10_volume,
    log_volume,
    radius_grid,
    rollouts,
    volume_from_radii,
)
from minefield.config import ConfigError, ModelConfig
from minefield.directions import DirectionSpec, random_directions
from minefield.engine import evaluate_points_loop
from minefield.models import build_model, init_params
from minefield.stacked import flatten, member, stack


def _quadratic(a, centre, dirs):
    """L(t) = 1/2 sum_i a_i (c_i + t d_i)^2 along directions (K, n); ts (K,) or (K, T)."""
    def loss_fn(ts):
        p = centre + (ts[..., None] if ts.dim() == 2 else ts[:, None]) * (
            dirs[:, None] if ts.dim() == 2 else dirs)
        return 0.5 * (a * p**2).sum(-1)
    return loss_fn


def _unit_dirs(k, n, seed=0):
    d = torch.randn(k, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("method,rtol", [("bisect", 1e-3), ("bisect", 1e-8), ("grid", None)])
def test_isotropic_bowl_radius_and_ball_volume(method, rtol):
    # PAPER check 9: L = a/2 |theta|^2, unit directions: r = sqrt(2c/a), V = omega_n r^n.
    n, a, c = 7, 3.0, 0.4
    r_true = math.sqrt(2 * c / a)
    dirs = _unit_dirs(20, n)
    f = _quadratic(torch.full((n,), a, dtype=torch.float64), torch.zeros(n), dirs)
    if method == "grid":
        # linear interpolation of a quadratic on a fine linear grid: error ~ h^2
        r, evals = find_radii(f, 20, c, 1.0, method="grid", grid_points=2001, grid="linear")
        tol = 1e-6
    else:
        r, evals = find_radii(f, 20, c, 1.0, rtol=rtol)
        tol = rtol
    assert ((r - r_true).abs() / r_true).max() <= tol
    ball = 0.5 * n * math.log(math.pi) - gammaln(n / 2 + 1) + n * math.log(r_true)
    assert abs(float(log_volume(torch.full((5,), r_true, dtype=torch.float64), n)) - ball) < 1e-12
    assert abs(float(log_volume(r, n)) - ball) < n * tol * 1.01
    assert evals > 20


def test_anisotropic_bowl_radii_match_closed_form():
    n, c = 4, 0.5
    a = torch.tensor([1.0, 4.0, 9.0, 0.5], dtype=torch.float64)
    dirs = _unit_dirs(50, n, seed=1)
    r, _ = find_radii(_quadratic(a, torch.zeros(n), dirs), 50, c, r_max=10.0, rtol=1e-9)
    want = torch.sqrt(2 * c / (dirs**2 * a).sum(1))
    torch.testing.assert_close(r, want, rtol=1e-9, atol=0)


def test_volume_estimator_converges_to_ellipsoid_volume():
    # Star-body estimator with uniform unit directions -> ellipsoid volume omega_n prod sqrt(2c/a_i)
    n, c = 3, 0.5
    a = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    exact = (0.5 * n * math.log(math.pi) - gammaln(n / 2 + 1)
             + float(torch.log(torch.sqrt(2 * c / a)).sum()))
    errs = []
    for k in (30, 300, 30000):
        theta = {"w": torch.zeros(1, n, dtype=torch.float64)}
        d = random_directions(theta, k, "gaussian", "zero", torch.Generator().manual_seed(5))
        dirs = d["w"][:, 0]
        r, _ = find_radii(_quadratic(a, torch.zeros(n), dirs), k, c, r_max=10.0, rtol=1e-8)
        errs.append(abs(float(log_volume(r, n)) - exact))
    assert errs[-1] < 0.02  # 2% in volume at 30,000 directions
    assert errs[-1] < errs[0]


def test_first_crossing_not_a_later_one():
    # loss rises above the cutoff at t=0.2, falls back, and rises again at t=0.8; the
    # bump covers the bracket point 0.25 (narrower bumps between bracket points are missed)
    def f(ts):
        return torch.where((ts > 0.2) & (ts < 0.6), 2.0, 0.0) + torch.where(ts > 0.8, 2.0, 0.0)
    r, _ = find_radii(f, 3, 1.0, r_max=1.0, rtol=1e-6)
    torch.testing.assert_close(r, torch.full((3,), 0.2, dtype=torch.float64), rtol=1e-6, atol=0)
    rg, _ = find_radii(f, 3, 1.0, r_max=1.0, method="grid", grid_points=1001, grid="linear")
    assert ((rg - 0.2).abs() <= 1e-3).all()


def test_zero_radius_and_r_max():
    def f(ts):
        return 0.5 + 0.0 * ts
    r0, _ = find_radii(f, 4, 0.4)
    assert torch.equal(r0, torch.zeros(4, dtype=torch.float64))
    r1, _ = find_radii(f, 4, 0.6, r_max=0.7)
    assert torch.equal(r1, torch.full((4,), 0.7, dtype=torch.float64))
    r2, _ = find_radii(f, 4, 0.6, r_max=0.7, method="grid")
    assert torch.equal(r2, torch.full((4,), 0.7, dtype=torch.float64))


def test_log_volume_never_overflows_for_huge_n():
    n = 10**8
    r = torch.tensor([0.5, 0.25, 0.0], dtype=torch.float64)
    got = log10_volume(r, n)
    want = (0.5 * n * math.log(math.pi) - gammaln(n / 2 + 1) + n * math.log(0.5)
            + math.log(1.0 + 0.5**n) - math.log(3)) / math.log(10)
    assert math.isfinite(got) and abs(got - want) < 1e-6 * abs(want)
    assert log10_volume(torch.zeros(3), 5) == -math.inf


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    r = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lo, hi = bootstrap_log10_volume(r, 10, 500, seed=1)
    est = log10_volume(r, 10)
    assert lo <= est <= hi
    assert (lo, hi) == bootstrap_log10_volume(r, 10, 500, seed=1)
    assert (lo, hi) != bootstrap_log10_volume(r, 10, 500, seed=2)


def _symmetric_pairs(axes, k, seed):
    """Radii of the ellipsoid ``|x / axes| <= 1`` along ``+d_1..+d_K, -d_1..-d_K`` (equal)."""
    r = 1 / (_unit_dirs(k, len(axes), seed) / axes).norm(dim=1)
    return torch.cat([r, r])


def test_bootstrap_resamples_pairs_of_directions():
    # the radii along d and -d share their direction: one draw. On a symmetric body
    # (equal pairs) the pair bootstrap is, replicate for replicate, the bootstrap of
    # the K independent radii; resampling the 2K radii one by one was sqrt(2) too narrow
    r = _symmetric_pairs(torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64), 40, 0)
    assert bootstrap_log10_volume(r, 3, 300, seed=4) == pytest.approx(bootstrap_log10_volume(
        r[:40], 3, 300, seed=4, pairs=False), rel=1e-12)
    with pytest.raises(ConfigError, match="5 radii are not pairs"):
        bootstrap_log10_volume(torch.ones(5, dtype=torch.float64), 3)


def test_bootstrap_interval_covers_an_ellipsoid_at_its_rate():
    # 100 seeds of 95% intervals on the (1, 1/2, 1/3) ellipsoid, 50 pairs each: the
    # pair bootstrap covers in 92, the old bootstrap over single radii in 80;
    # Binomial(100, 0.92) >= 87 with probability 0.96
    a = torch.tensor([1.0, 0.5, 1 / 3], dtype=torch.float64)
    truth = math.log10(4 / 3 * math.pi * float(a.prod()))
    hits = 0
    for s in range(100):
        lo, hi = bootstrap_log10_volume(_symmetric_pairs(a, 50, s), 3, 400, seed=s)
        hits += lo <= truth <= hi
    assert hits >= 87


def test_volume_errors():
    with pytest.raises(ValueError, match="n must be >= 1"):
        log_volume(torch.ones(3), 0)
    with pytest.raises(ValueError, match="radii must be >= 0"):
        log_volume(torch.tensor([-1.0]), 3)
    with pytest.raises(ConfigError, match="method: 'newton' is not one of bisect, grid"):
        find_radii(lambda t: t, 2, 1.0, method="newton")
    for kw in (dict(grid_power=0.0), dict(grid_power=math.nan), dict(bracket_ratio=math.nan)):
        with pytest.raises(ConfigError, match="bracket_ratio > 1 and a positive grid_power"):
            find_radii(lambda t: t, 2, 1.0, method="grid", **kw)


@pytest.mark.parametrize("kw,msg", [
    (dict(cutoff=0.0), "volume.cutoff must be"), (dict(r_max=-1.0), "volume.r_max must be"),
    (dict(rtol=1.0), "rtol must be"), (dict(n_directions=0), "n_directions"),
    (dict(grid_points=1), "grid_points"),
    # t = r_max u^p with p <= 0 scans no [0, r_max]: at p = -1 a 3-d ellipsoid's log10 V
    # came out -8.66 (truth -0.16), at p = 0 -2.52; NaN gave a raw "radii ... not NaN"
    (dict(grid_power=-1.0), "grid_power a positive number"),
    (dict(grid_power=0.0), "grid_power a positive number"),
    (dict(grid_power=math.nan), "grid_power a positive number"),
    (dict(bracket_ratio=math.nan), "bracket_ratio > 1"),
    (dict(grid="log"), "volume.grid: 'log' is not one of power, linear"),
    (dict(cutoff_kind="ratio"), "volume.cutoff_kind: 'ratio' is not one of abs, relative"),
    (dict(n_bootstrap=-1), "volume.n_bootstrap must be >= 0"),
    # seed -1 is torch's 2**64 - 1: the same bootstrap under a second key
    (dict(seed=-1), r"seed in \[0, 2\*\*32\), got 1000 and -1"),
    (dict(n_directions=10.5), "volume.n_directions must be an integer, got 10.5"),
    (dict(n_directions="7"), "volume.n_directions must be an integer, got '7'"),
    (dict(estimator="mcmc", walk_length=2.5), "volume.walk_length must be an integer"),
    (dict(estimator="mcmc", walk_length=0), "volume.walk_length must be >= 1"),
    (dict(estimator="mcmc", walk_length=-3), "volume.walk_length must be >= 1"),
    # options the estimator ignores changed the result's key only (a silent no-op)
    (dict(power="inf"), "volume.power 'inf' shapes .* naive with preconditioner 'none'"),
    (dict(estimator="gaussian", power="auto"), "volume.power 'auto' shapes .* gaussian"),
    (dict(estimator="mcmc", preconditioner="axes", power="4"), "volume.power '4' shapes"),
    (dict(sigma=0.1), "volume.sigma is the gaussian estimator's; naive has none"),
    (dict(estimator="is", preconditioner="axes", sigma=0.1), "volume.sigma is the gaussian"),
    (dict(walk_length=5), "volume.walk_length is mcmc's; naive takes no walk"),
    (dict(estimator="gaussian", walk_length=5), "volume.walk_length is mcmc.s"),
    (dict(estimator="gaussian", precision="bf16"), "volume.precision 'bf16' is the naive"),
    (dict(estimator="mcmc", precision="tf32"), "volume.precision 'tf32' is the naive"),
    (dict(estimator="mcmc", method="grid"), "volume.method 'grid' is the naive estimator's"),
    (dict(estimator="is", preconditioner="axes", grid_points=50), "volume.grid_points 50"),
    (dict(estimator="gaussian", bracket_ratio=2.0), "volume.bracket_ratio 2.0 is the naive"),
    # and so did the radius method's: --grid-points 50 under bisect gave the same radii
    (dict(grid_points=50), "volume.grid_points 50 is the grid method's option; method bisect"),
    (dict(grid="linear"), "volume.grid 'linear' is the grid method's"),
    (dict(grid_power=3.0), "volume.grid_power 3.0 is the grid method's"),
    (dict(method="grid", bracket_points=8), "volume.bracket_points 8 is the bisect method's"),
    (dict(method="grid", bracket_ratio=2.0), "volume.bracket_ratio 2.0 is the bisect method"),
    (dict(n_chains=16), "volume.n_chains 16 is the mcmc estimator's option; naive ignores"),
    (dict(estimator="gaussian", n_replicates=4), "volume.n_replicates 4 is the mcmc"),
    # a preconditioner shapes is / gaussian / mcmc; naive would drop it (or, with adam,
    # run the Adam-shaped x-unit estimator and call it naive)
    (dict(preconditioner="hessian"), "volume.preconditioner 'hessian' .* naive .* uniform"),
    (dict(preconditioner="given"), "volume.preconditioner 'given' .* naive .* uniform"),
])
def test_volume_config_validation(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        VolumeConfig(**kw)


def test_volume_power_has_one_spelling():
    """--power 2.0 and 2 (INF and inf) are one proposal: one config, one result key (two
    spellings used to store and compute the same estimate twice)."""
    base = dict(estimator="is", preconditioner="axes")
    for a, b in (("2.0", "2"), ("INF", "inf"), ("4.00", 4.0), ("Infinity", "inf")):
        assert VolumeConfig(**base, power=a) == VolumeConfig(**base, power=b)
        assert VolumeConfig(**base, power=a).to_dict() == VolumeConfig(**base, power=b).to_dict()
    assert VolumeConfig(**base, power="2.5").power == "2.5"
    assert VolumeConfig().power == "2"  # the default's key is unchanged


def test_radius_grid_is_the_papers_u5():
    g = radius_grid(0.5, 100)
    assert g[0] == 0 and g[-1] == 0.5
    assert float(g[50]) == pytest.approx(0.5 * (50 / 99) ** 5, rel=1e-12)


# --- the network path --------------------------------------------------------------------


def _net(seed=0):
    model = build_model(ModelConfig(widths=(6, 5), init="torch"), (2,), 2)
    g = torch.Generator().manual_seed(seed)
    th = {k: v.double() for k, v in init_params(model, "torch", g).items()}
    x = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    return model, stack([th]), x, y


def test_network_radii_equal_bisection_over_the_reference_loop():
    model, c, x, y = _net()
    cfg = VolumeConfig(cutoff=1.5, cutoff_kind="relative", n_directions=4, rtol=1e-6,
                       r_max=3.0, directions=DirectionSpec("filter", "zero", 3), n_bootstrap=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BasinWarning)
        res = basin_radii(model, c, (x, y), cfg)
    th = member(c, 0)
    d = random_directions(th, 4, "filter", "zero", torch.Generator().manual_seed(3))
    d = {k: torch.cat([v, -v]) for k, v in d.items()}

    def loop_fn(ts):
        return evaluate_points_loop(model, c, d, ts, x, y)[0]
    ref, _ = find_radii(loop_fn, 8, 1.5 * res.centre_loss, 3.0, 1e-6)
    torch.testing.assert_close(res.radii, ref, rtol=1e-9, atol=1e-12)
    assert res.n == 2 * 6 + 6 + 6 * 5 + 5 + 5 + 1
    assert res.cutoff == pytest.approx(1.5 * res.centre_loss)
    assert res.mean_radius == pytest.approx(float(ref.mean()))
    assert res.n_mean_log10_r == pytest.approx(res.n * float(torch.log10(ref).mean()))
    assert res.log10_volume == pytest.approx(log10_volume(ref, res.n))
    # the loss at the radius sits at the cutoff (where the radius is not clipped at r_max)
    inside = ref < 3.0
    at_r = loop_fn(ref)[inside]
    torch.testing.assert_close(at_r, torch.full_like(at_r, res.cutoff), rtol=1e-4, atol=0)
    assert res.n_at_r_max == int((~inside).sum())
    back = BasinResult.from_dict(res.to_dict())
    assert torch.equal(back.radii, res.radii) and back.config == res.config
    assert back.n_at_r_max == res.n_at_r_max


def test_radii_at_r_max_are_counted_and_warned():
    # regression: a volume set by r_max (two learning rates, one log10 V) went unflagged
    model, c, x, y = _net()
    cfg = VolumeConfig(cutoff=1.5, cutoff_kind="relative", n_directions=4, n_bootstrap=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BasinWarning)
        free = basin_radii(model, c, (x, y), cfg.replace(r_max=50.0))
    assert free.n_at_r_max == 0 and float(free.radii.max()) < 50.0
    clipped_at = float(free.radii.sort().values[3])  # below 4 of the 8 radii
    with pytest.warns(BasinWarning, match=r"radii reached r_max=.* raise r_max"):
        clipped = basin_radii(model, c, (x, y), cfg.replace(r_max=clipped_at))
    assert clipped.n_at_r_max == int((free.radii >= clipped_at).sum()) >= 4
    old = clipped.to_dict()
    del old["n_at_r_max"]  # files written before the count existed
    assert BasinResult.from_dict(old).n_at_r_max == clipped.n_at_r_max


def test_zero_filters_are_refused_not_counted_at_r_max():
    # a filter-normalised direction is 0 on a filter that is exactly 0: the naive path
    # put every radius of a QuadraticNet at r_max ("raise r_max", which cannot help)
    from minefield.bodies import QuadraticNet

    net = QuadraticNet(torch.eye(3, dtype=torch.float64))
    params = {k: v.detach()[None].clone() for k, v in net.named_parameters()}
    with pytest.raises(ConfigError, match=r"filter units are zero in weight \(weights exactly 0"
                                          r" .*kind 'gaussian'$"):
        basin_radii(net, params, net.data(), VolumeConfig(cutoff=net.cutoff))
    model, c, x, y = _net()
    c = {k: torch.zeros_like(v) if k.endswith("bias") else v for k, v in c.items()}
    cfg = VolumeConfig(cutoff=1.5, cutoff_kind="relative", n_directions=2,
                       directions=DirectionSpec("filter", "include"))
    with pytest.raises(ConfigError, match=r"zero in 0.bias, 2.bias, 4.bias \(biases exactly 0"
                                          r".* or bias 'exclude'"):
        basin_radii(model, c, (x, y), cfg)
    res = basin_radii(model, c, (x, y), cfg.replace(  # the weights alone are fine
        directions=DirectionSpec("filter", "exclude"), n_bootstrap=0, r_max=50.0))
    assert res.n == 2 * 6 + 6 * 5 + 5 and res.n_at_r_max == 0


def test_bias_zero_is_a_naive_convention_only():
    # 'zero' counts the biases in n but never moves them; is / gaussian / mcmc left them
    # out of n (naive n = 3614 vs is n = 3457 on the swiss-roll net)
    from minefield.netvolume import NetworkLines

    spec = DirectionSpec("filter", "zero")
    for est, pre in (("is", "hessian"), ("gaussian", "none"), ("mcmc", "none")):
        with pytest.raises(ConfigError, match=f"bias 'zero' .* naive estimator; {est} "):
            VolumeConfig(estimator=est, preconditioner=pre, directions=spec)
    model, c, x, y = _net()
    with pytest.raises(ConfigError, match="bias 'zero' is a convention of the naive"):
        NetworkLines(model, c, x, y, spec)


def test_members_grid_and_bisect_agree():
    model, c, x, y = _net()
    _, c2, _, _ = _net(1)
    two = {k: torch.cat([c[k], c2[k]]) for k in c}
    base = VolumeConfig(cutoff=2.0, cutoff_kind="relative", n_directions=3, r_max=40.0,
                        n_bootstrap=0)
    bis = basin_members(model, two, (x, y), base.replace(rtol=1e-4))
    grd = basin_members(model, two, (x, y), base.replace(method="grid", grid="linear",
                                                           grid_points=2001))
    assert len(bis) == 2
    for b, g in zip(bis, grd):
        assert ((b.radii - g.radii).abs() <= 2e-3 * b.radii.clamp(min=1e-3)).all()
    with pytest.raises(ValueError, match="single member"):
        basin_radii(model, two, (x, y), base)


def test_rollouts_follow_the_basin_directions():
    model, c, x, y = _net()
    spec = DirectionSpec(seed=2)
    ro = rollouts(model, c, (x, y), 3, torch.linspace(-1, 1, 5, dtype=torch.float64), spec)
    assert ro.loss.shape == (3, 5)
    d = random_directions(member(c, 0), 3, generator=spec.generator())
    ref = evaluate_points_loop(model, c, d, torch.linspace(-1, 1, 5).expand(3, -1), x, y)[0]
    torch.testing.assert_close(ro.loss, ref, rtol=1e-10, atol=1e-12)
    assert flatten(c).shape[1] > 0


def test_adam_preconditioner_scales_by_the_batch_actually_drawn():
    # a batch larger than the training set is the full set (train._batch_indices)
    from types import SimpleNamespace

    from minefield.stages.basin import _adam_batch
    data = SimpleNamespace(y_train=torch.zeros(40))
    exp = lambda bs: SimpleNamespace(train=SimpleNamespace(batch_size=bs))  # noqa: E731
    assert [_adam_batch(exp(bs), data) for bs in (None, 8, 40, 256)] == [40, 8, 40, 40]


@pytest.mark.parametrize("method", ["bisect", "grid"])
def test_a_nan_loss_is_outside_the_basin(method):
    # float32 logits overflow far from the centre: NaN there must end the basin, not
    # report every radius at r_max (the loss crosses the cutoff at 0.3 here)
    from minefield.radii import check_radii, find_radii
    def loss(t):
        return torch.where(t < 0.3, t * 0 + 0.1, torch.where(t < 2, t * 0 + 5, t * torch.nan))
    r, _ = find_radii(loss, 4, 1.0, r_max=1e3, rtol=1e-6, method=method)
    assert bool(((r > 0.25) & (r < 0.35)).all()), r  # the grid interpolates between points
    nan_past = lambda t: torch.where(t < 0.3, t * 0 + 0.1, t * torch.nan)  # noqa: E731
    r, _ = find_radii(nan_past, 4, 1.0, r_max=1e3, rtol=1e-6, method="bisect")
    torch.testing.assert_close(r, torch.full((4,), 0.3, dtype=torch.float64), rtol=1e-5, atol=0)
    assert bool(check_radii(nan_past, r, 1.0, 1e-5, 1e3).all())
    assert not bool(check_radii(nan_past, torch.full((4,), 1e3), 1.0, 1e-5, 1e3).any())
    r, _ = find_radii(lambda t: t * torch.nan, 3, 1.0)
    assert torch.equal(r, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("r_max", [1.0, 1e40, 1e70, 1e100])
def test_bisection_converges_for_any_finite_r_max(r_max):
    # regression: with every bracket point above the cutoff, halving from r_max / 4^5 hit a
    # 200-step cap and returned 3.04e36 (r_max 1e100) as a radius of the bowl L = t^2
    from minefield.radii import check_radii
    bowl = lambda t: t.double() ** 2  # noqa: E731  # radius at cutoff c: sqrt(c)
    r, _ = find_radii(bowl, 3, 0.5, r_max=r_max, rtol=1e-3)
    torch.testing.assert_close(r, torch.full((3,), math.sqrt(0.5), dtype=torch.float64),
                               rtol=1e-3, atol=0)
    assert bool(check_radii(bowl, r, 0.5, 1e-3, r_max).all())


def test_bisection_near_the_largest_float_does_not_overflow():
    # (lo + hi) / 2 overflowed to inf for a crossing within a factor 4 of float64's max
    r, _ = find_radii(lambda t: (t.double() / 1e308) ** 2, 2, 2.0, r_max=1.7e308)
    torch.testing.assert_close(r, torch.full((2,), math.sqrt(2.0) * 1e308,
                                             dtype=torch.float64), rtol=1e-3, atol=0)


def test_bisection_that_does_not_converge_raises(monkeypatch):
    import minefield.radii
    monkeypatch.setattr(minefield.radii, "_MAX_STEPS", 5)
    with pytest.raises(RuntimeError, match="did not converge in 5 steps"):
        find_radii(lambda t: t.double() ** 2, 3, 0.5, r_max=1e100)


def test_a_basin_of_the_last_checkpoint_is_keyed_by_its_content(tmp_path):
    # "the last checkpoint" moves when an interrupted run resumes: the stored basin of
    # the old last one must not be returned for the new one
    from minefield.basin import VolumeConfig
    from minefield.runs import RunError
    from minefield.stages import basin_run, train_run
    from tests.conftest import tiny_config
    run = train_run(tiny_config("a"), tmp_path, progress=False).run
    cfg = VolumeConfig(n_directions=2, cutoff=0.5)
    first = basin_run(run, cfg, n_rollouts=0, device="cpu")
    assert basin_run(run, cfg, n_rollouts=0, device="cpu").path == first.path  # reused
    run.trajectory()[-1].unlink()  # now the last checkpoint is another one
    with pytest.raises(RunError, match="other settings"):
        basin_run(run, cfg, n_rollouts=0, device="cpu")


def test_no_bootstrap_still_gives_the_honest_bound():
    # n_bootstrap = 0 skips the bootstrap; heavy-tailed radii (one pair far out) get the
    # bound, which needs none: it was (nan, nan)
    r = torch.tensor([1.0, 0.2, 0.2, 0.2, 1.0, 0.2, 0.2, 0.2], dtype=torch.float64)
    res = volume_from_radii(r, 10, 0.0, 1.0, config={"rtol": 1e-3}, n_boot=0, r_max=2.0)
    lo, hi = res.ci_log10_volume
    assert res.diagnostics["interval"] == "bound"
    slack = 10 * math.log10(1 + 1e-3)
    assert lo == pytest.approx(res.log10_volume + math.log10(0.05) - slack, abs=1e-12)
    log_ball = 5 * math.log10(math.pi) - math.log10(120) + 10 * math.log10(2.0)
    assert hi == pytest.approx(log_ball + slack, abs=1e-12)


def test_rollouts_refuse_zero_filters_as_the_radii_do():
    # QuadraticNet at its minimum: every filter direction is 0, the curves were flat
    from minefield.bodies import QuadraticNet

    net = QuadraticNet(torch.eye(3, dtype=torch.float64))
    params = {k: v.detach()[None] for k, v in net.named_parameters()}
    with pytest.raises(ConfigError, match="filter units are zero in weight"):
        rollouts(net, params, QuadraticNet.data(), 2, spec=DirectionSpec("filter"))
    ro = rollouts(net, params, QuadraticNet.data(), 2, spec=DirectionSpec("gaussian"))
    assert float(ro.loss.max() - ro.loss.min()) > 0


def test_the_naive_path_keeps_halls_interval_in_its_diagnostics_and_reports_the_bound():
    # hunt 5, finding 9: the percentile bootstrap labelled normal covered 163/180 (10-d
    # ellipsoid) and 87/98 (100-d) at 95%, Hall's interval computed next to it 166 and 91;
    # the reported interval was then Hall's where the weights looked light-tailed, and
    # since hunt 19 (a body with one long axis: 29 of 81 covered) it is the bound
    g = torch.Generator().manual_seed(0)
    u = torch.randn(50, 10, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    a = torch.logspace(0, 0.25, 10, dtype=torch.float64)  # a 10-d ellipsoid, 0.25 decades
    r = 1 / (torch.cat([u, -u]) / a).norm(dim=1)
    res = volume_from_radii(r, 10, 0.0, 1.0, config={"method": "bisect", "rtol": 1e-9})
    assert res.diagnostics["interval"] == "bound"
    assert "looks light-tailed" in res.diagnostics["warnings"][0]
    hall = res.diagnostics["ci_log10_normal"]
    assert res.ci_log10_volume[0] < hall[0] - 1 and res.ci_log10_volume[1] > hall[1] + 1
    boot = res.diagnostics["ci_log10_bootstrap"]
    assert len(boot) == 2 and boot != pytest.approx(list(res.ci_log10_volume), abs=1e-6)
    truth = (5 * math.log(math.pi) - math.lgamma(6) + float(a.log().sum())) / math.log(10)
    assert res.ci_log10_volume[0] <= truth <= res.ci_log10_volume[1]


def test_bf16_radii_of_split_blocks_equal_the_unsplit_ones():
    # bf16 radii that float32 rejects are redone; the others were kept in a split block
    # where none moved but redone unsplit, so --directions-per-task changed radii by 1.5e-3
    # (and counted the centre once more per redo): only the moved radii are redone now
    from minefield.basin import direction_radii

    model = build_model(ModelConfig(widths=(16, 16), init="torch"), (2,), 2)
    g = torch.Generator().manual_seed(0)
    c = stack([init_params(model, "torch", g)])
    x = torch.randn(200, 2, generator=g)
    y = (x[:, 0] > 0).long()
    cfg = VolumeConfig(n_directions=6, cutoff=1.2, cutoff_kind="relative", rtol=1e-3,
                       r_max=4.0, precision="bf16", n_bootstrap=0)
    r, evals, *_, moved = direction_radii(model, c, (x, y), cfg)
    parts = [direction_radii(model, c, (x, y), cfg, block=(i, i + 1)) for i in range(6)]
    assert 0 < moved < 12 and moved == sum(p[5] for p in parts)  # some, not all
    assert torch.equal(torch.cat([p[0][:1] for p in parts] + [p[0][1:] for p in parts]), r)
    assert evals == sum(p[1] for p in parts) - 5  # the centre once
