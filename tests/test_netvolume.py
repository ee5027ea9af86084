import math

import pytest
import torch

from minefield.basin import BasinResult, BasinWarning, VolumeConfig, basin_radii
from minefield.bodies import QuadraticNet, log_spaced_axes, random_rotation
from minefield.config import ConfigError, ModelConfig
from minefield.curvature import dense_hessian
from minefield.directions import DirectionSpec, random_directions
from minefield.engine import evaluate_points, evaluate_points_loop
from minefield.models import build_model, init_params
from minefield.netvolume import NetworkLines, _coordinates, adam_curvature, network_curvature
from minefield.precondition import Preconditioner
from minefield.stacked import stack

F64 = torch.float64
LN10 = math.log(10)


def _quadratic_net(n=6, seed=0):
    a = log_spaced_axes(n, 1.0)
    rot = random_rotation(n, torch.Generator().manual_seed(seed))
    net = QuadraticNet((rot * a.pow(-2)) @ rot.T)
    params = {k: v.detach()[None].clone() for k, v in net.named_parameters()}
    return net, params, net.body().log_volume / LN10


def _cfg(**kw):
    base = dict(cutoff=QuadraticNet.cutoff, r_max=50.0, rtol=1e-8, n_directions=100,
                directions=DirectionSpec("gaussian"))
    return VolumeConfig(**(base | kw))


def test_is_with_the_dense_hessian_is_exact_through_the_network_api():
    net, params, truth = _quadratic_net()
    res = basin_radii(net, params, QuadraticNet.data(), _cfg(estimator="is",
                                                             preconditioner="hessian"))
    assert res.estimator == "is" and res.n == 6
    assert res.log10_volume == pytest.approx(truth, abs=1e-6)
    assert res.diagnostics["ess"] == pytest.approx(200, rel=1e-6)
    assert res.ci_log10_volume[0] <= truth <= res.ci_log10_volume[1]
    again = BasinResult.from_dict(res.to_dict())
    assert again.estimator == "is" and again.diagnostics["ess"] == res.diagnostics["ess"]


def test_learnt_power_through_the_network_api():
    # an axis-aligned quadratic: the axis radii are its semi-axes and the learnt shape is
    # the ellipsoid (p = 2), so the estimate is exact; the pilot rays are counted
    n = 6
    a = log_spaced_axes(n, 1.0)
    net = QuadraticNet(torch.diag(a.pow(-2)))
    params = {k: v.detach()[None].clone() for k, v in net.named_parameters()}
    truth = net.body().log_volume / LN10
    res = basin_radii(net, params, QuadraticNet.data(),
                      _cfg(estimator="is", preconditioner="axes", power="auto",
                           n_directions=20))
    assert res.diagnostics["power"] == 2.0 and len(res.diagnostics["power_scores"]) == 7
    assert res.log10_volume == pytest.approx(truth, abs=1e-6)
    fixed = basin_radii(net, params, QuadraticNet.data(),
                        _cfg(estimator="is", preconditioner="axes", n_directions=20))
    assert res.n_evaluations > fixed.n_evaluations and "power_scores" not in fixed.diagnostics


@pytest.mark.parametrize("estimator,pre", [("naive", "none"), ("is", "hutchinson"),
                                           ("is", "axes"), ("mcmc", "hessian")])
def test_other_estimators_land_near_the_ellipsoid(estimator, pre):
    net, params, truth = _quadratic_net()
    res = basin_radii(net, params, QuadraticNet.data(),
                      _cfg(estimator=estimator, preconditioner=pre, n_directions=400,
                           rtol=1e-4, **(dict(n_chains=32, n_replicates=4, walk_length=6)
                                         if estimator == "mcmc" else {})))
    assert abs(res.log10_volume - truth) < 0.5  # 6 dims, 1 decade of semi-axes: ~1.4 log10
    if estimator == "naive":  # its normal interval sits around its estimate
        lo, hi = res.diagnostics["ci_log10_normal"]
        assert lo <= res.log10_volume <= hi and hi - res.log10_volume < 1
    assert res.n_evaluations > 0 and "warnings" in res.diagnostics


def test_gaussian_measure_of_a_round_network_basin():
    # A = I: the basin is the unit ball, its mass under N(0, s^2 I) is P(chi_n <= 1/s)
    n, sigma = 5, 0.3
    net = QuadraticNet(torch.eye(n, dtype=F64))
    params = {k: v.detach()[None].clone() for k, v in net.named_parameters()}
    res = basin_radii(net, params, QuadraticNet.data(), _cfg(estimator="gaussian",
                                                             sigma=sigma, n_directions=10))
    want = net.body().gaussian_log_mass(sigma) / LN10
    assert res.log10_volume == pytest.approx(want, abs=1e-7)
    # every volume in the result is log10: the normal interval too (it was stored in nats)
    lo, hi = res.diagnostics["ci_log10_normal"]
    assert "ci_normal" not in res.diagnostics and lo <= res.log10_volume <= hi


def test_engine_lines_from_starts_match_the_loop():
    model = build_model(ModelConfig(widths=(5,)), (2,), 2).double()
    g0 = torch.Generator().manual_seed(0)
    theta = {k: v.double() for k, v in init_params(model, "torch", g0).items()}
    centre = stack([theta])
    g = torch.Generator().manual_seed(0)
    d = random_directions(theta, 3, "gaussian", "include", g)
    s = random_directions(theta, 3, "gaussian", "include", g)
    x, y = torch.randn(7, 2, generator=g, dtype=F64), torch.randint(0, 2, (7,), generator=g)
    ts = torch.linspace(0, 1, 4, dtype=F64).expand(3, 4)
    got = evaluate_points(model, centre, d, ts, x, y, starts=s)[0]
    for k in range(3):
        moved = {kk: v + s[kk][k:k + 1] for kk, v in centre.items()}
        one = {kk: v[k:k + 1] for kk, v in d.items()}
        want = evaluate_points_loop(model, moved, one, ts[k:k + 1], x, y)[0]
        assert torch.allclose(got[k:k + 1], want, atol=1e-12)


def test_filter_units_and_given_curvature():
    model = build_model(ModelConfig(widths=(4,)), (2,), 2).double()
    theta = {k: v.double()[None]
             for k, v in init_params(model, "torch", torch.Generator().manual_seed(0)).items()}
    x, y = torch.zeros(3, 2, dtype=F64), torch.zeros(3, dtype=torch.long)
    lines = NetworkLines(model, theta, x, y, DirectionSpec("filter"))
    w0 = theta["0.weight"][0]
    assert lines.n == sum(v[0].numel() for v in theta.values() if v.dim() > 2)  # weights
    assert lines.scale[0] == pytest.approx(float(w0[0].norm() * math.sqrt(lines.n / 2)))
    u = torch.randn(4000, lines.n, generator=torch.Generator().manual_seed(0), dtype=F64)
    d = lines.to_params(u / u.norm(dim=1, keepdim=True))["0.weight"]  # (4000, 4, 2)
    assert d.pow(2).sum(-1).mean(0).sqrt().tolist() == pytest.approx(
        w0.norm(dim=1).tolist(), rel=0.05)  # filters move by |theta_f| on average
    given = {k: torch.full_like(v[0], 2.0) for k, v in theta.items()}
    pre = network_curvature(lines, "given", 1e-9, torch.Generator(), given=given)
    assert isinstance(pre, Preconditioner) and pre.kind == "diagonal"
    with pytest.raises(ConfigError, match="needs a curvature"):
        network_curvature(lines, "given", 1e-9, torch.Generator())
    with pytest.raises(ConfigError, match="lacks"):
        network_curvature(lines, "given", 1e-9, torch.Generator(), given={})
    assert not pre.isotropic
    tiny = {k: torch.full_like(v[0], 1e-12) for k, v in theta.items()}  # all under the floor
    assert network_curvature(lines, "given", 1.0, torch.Generator(), given=tiny).isotropic
    zero = {k: torch.zeros_like(v) for k, v in theta.items()}
    with pytest.raises(ConfigError, match="use directions of kind 'gaussian'"):
        NetworkLines(model, zero, x, y, DirectionSpec("filter"))


@pytest.mark.parametrize("kw", [dict(), dict(estimator="is", preconditioner="hessian"),
                                dict(estimator="gaussian"),
                                dict(estimator="mcmc", n_chains=4, n_replicates=2,
                                     walk_length=2)])
def test_every_estimator_warns_when_radii_reach_r_max(kw):
    # semi-axes 0.1 .. 1 within r_max = 0.05: every ray stops at r_max (only naive warned)
    net, params, _ = _quadratic_net(3)
    with pytest.warns(BasinWarning, match="radii reached r_max=0.05 .* raise r_max"):
        res = basin_radii(net, params, net.data(), _cfg(r_max=0.05, n_directions=4, **kw))
    assert res.n_at_r_max == (64 if kw.get("estimator") == "mcmc" else 8)


def test_adam_curvature_reads_second_moments():
    state = {"opt.0.exp_avg_sq": torch.arange(6.0).reshape(2, 3)}
    got = adam_curvature(state, ["w"], 1)
    assert torch.equal(got["w"], torch.tensor([3.0, 4.0, 5.0]))
    # times the batch size: E[g^2] of a minibatch mean is about F / B at a minimum
    assert torch.equal(adam_curvature(state, ["w"], 1, 32)["w"], torch.tensor([96., 128, 160]))
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        adam_curvature(state, ["w"], 1, 0)
    with pytest.raises(ConfigError, match="trained with Adam"):
        adam_curvature({}, ["w"], 0)


def test_volume_config_errors():
    with pytest.raises(ConfigError, match="estimator: .* is not one of naive, is, mcmc, gaussian"):
        VolumeConfig(estimator="exact")
    with pytest.raises(ConfigError, match="preconditioner: .* is not one of"):
        VolumeConfig(preconditioner="magic")
    with pytest.raises(ConfigError, match="needs a preconditioner"):
        VolumeConfig(estimator="is")
    with pytest.raises(ConfigError, match="sigma must be"):
        VolumeConfig(estimator="gaussian", sigma=0.0)
    with pytest.raises(ConfigError, match="n_chains and n_replicates"):
        VolumeConfig(estimator="mcmc", n_replicates=1)
    assert VolumeConfig.from_dict(VolumeConfig(estimator="mcmc").to_dict()).estimator.value \
        == "mcmc"


def test_curvature_preconditioners_in_filter_units_match_the_dense_reference():
    # C_x = S H S over the perturbed weights only (biases excluded), against
    # torch.func.hessian of the line's own loss in x coordinates (the slow reference)
    model = build_model(ModelConfig(widths=(3,)), (2,), 2).double()
    theta = {k: v.double()[None]
             for k, v in init_params(model, "torch", torch.Generator().manual_seed(1)).items()}
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 2, generator=g, dtype=F64), torch.randint(0, 2, (20,), generator=g)
    lines = NetworkLines(model, theta, x, y, DirectionSpec("filter"))
    want = torch.func.hessian(lines.loss_at)(torch.zeros(lines.n, dtype=F64))
    lam = torch.linalg.eigvalsh(want)
    floor = 1e-3 * float(lam.abs().max())  # well above round-off in the flat directions
    pre = network_curvature(lines, "hessian", floor, torch.Generator())
    ref = Preconditioner.dense(torch.linalg.eigh(want)[1] @ torch.diag(lam.clamp(min=floor))
                               @ torch.linalg.eigh(want)[1].T)
    assert pre.logdet == pytest.approx(ref.logdet, rel=1e-8)
    u = torch.randn(5, lines.n, generator=g, dtype=F64)
    assert torch.allclose(pre.quad(u), ref.quad(u), rtol=1e-8)
    probes = 4000
    diag = network_curvature(lines, "hutchinson", floor, torch.Generator().manual_seed(0),
                             probes=probes)
    # Hutchinson's error on entry i: sd sqrt(sum_{j != i} H_ij^2 / probes) over all the
    # parameters (biases too), times s_i^2 in x units
    full = dense_hessian(model, theta, (x, y))[0]
    idx = _coordinates(lines)
    sd = ((full.pow(2).sum(1) - full.diagonal().pow(2)) / probes).sqrt()[idx] * lines.scale**2
    err = (diag._p["d"] - want.diagonal().clamp(min=floor)).abs()
    assert bool((err <= 4 * sd).all())


def test_isotropic_preconditioners_are_recognised():
    f64 = dict(dtype=torch.float64)
    assert Preconditioner.diagonal(torch.full((3,), 2.0, **f64)).isotropic
    assert not Preconditioner.diagonal(torch.tensor([1.0, 2.0], **f64)).isotropic
    assert Preconditioner.dense(3 * torch.eye(3, **f64)).isotropic
    assert not Preconditioner.dense(torch.diag(torch.tensor([1.0, 2.0, 3.0], **f64))).isotropic


@pytest.mark.parametrize("estimator,pre", [("naive", "none"), ("is", "axes"),
                                           ("is", "hessian"), ("gaussian", "none")])
def test_a_cutoff_below_the_centre_is_an_empty_basin_said_so(estimator, pre):
    # QuadraticNet's centre loss is log 2 = 0.69: a cutoff of 0.5 leaves no basin. The
    # axes preconditioner failed with "curvature holds NaN or infinite values" (1 / (0 *
    # 0)); the others said "heavy-tailed weights or too few draws"
    net, params, _ = _quadratic_net(n=3)
    res = basin_radii(net, params, QuadraticNet.data(),
                      _cfg(cutoff=0.5, estimator=estimator, preconditioner=pre, n_directions=4))
    assert res.log10_volume == -math.inf and res.centre_loss == pytest.approx(math.log(2))
    assert res.diagnostics["warnings"] == ["every radius is 0: the centre's loss is at or "
                                           "above the cutoff, so there is no basin (log V = "
                                           "-inf); raise the cutoff"]


def test_radius_statistics_of_proposal_rays_are_not_reported_as_uniform_ones():
    # hunt 5, finding 8: is with the Hessian read a mean radius of 0.47 on a 20-d
    # ellipsoid whose mean over uniform directions is 0.22 (naive: 0.22)
    n = 20
    a = log_spaced_axes(n, 1.0)
    net = QuadraticNet(torch.diag(a.pow(-2)))
    params = {k: v.detach()[None].clone() for k, v in net.named_parameters()}
    g = torch.randn(20000, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    truth = float((1 / ((g / g.norm(dim=1, keepdim=True)) / a).norm(dim=1)).mean())
    got = {}
    for est, pre in [("naive", "none"), ("is", "hessian"), ("gaussian", "hessian")]:
        got[est] = basin_radii(net, params, QuadraticNet.data(), VolumeConfig(
            cutoff=QuadraticNet.cutoff, r_max=5.0, n_directions=500, rtol=1e-6, estimator=est,
            preconditioner=pre, directions=DirectionSpec("gaussian")))
    assert got["naive"].mean_radius == pytest.approx(truth, rel=0.05)
    for est in ("is", "gaussian"):
        r = got[est]
        assert math.isnan(r.mean_radius) and math.isnan(r.median_radius)
        assert math.isnan(r.n_mean_log10_r) and r.diagnostics["rays"] == "proposal"
        assert any("proposal" in w for w in r.diagnostics["warnings"])
        assert math.isfinite(r.log10_volume)
