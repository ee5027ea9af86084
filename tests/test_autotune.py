"""Per-device defaults, the measured path choice, the looped/channels_last/bf16 engine
paths and the one-member training path, against the reference loops (float64)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from minefield import autotune
from minefield.config import DataConfig, ModelConfig, Optimizer, TrainConfig
from minefield.data import Dataset
from minefield.directions import random_directions
from minefield.engine import (
    evaluate_combinations,
    evaluate_points,
    evaluate_points_loop,
    precision_error,
)
from minefield.functional import (
    buffers_like,
    channels_last_input,
    single_forward,
    stack,
    stacked_forward,
)
from minefield.models import build_model, init_params
from minefield.train import fit

TOL = dict(rtol=1e-10, atol=1e-12)  # float64: the paths differ only by rounding


def _conv(name="cnn", widths=(4, 6), shape=(3, 8, 8), classes=3, n=10, k=3, seed=0):
    model = build_model(ModelConfig(name=name, widths=widths), shape, classes)
    g = torch.Generator().manual_seed(seed)
    th = {k_: v.double() for k_, v in init_params(model, "he_normal", g).items()}
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    d = random_directions(th, k, "filter", "include", g)
    return model, stack([th]), d, x, y


def test_memory_budget_defaults_and_override():
    assert autotune.memory_budget_mb("cpu") == autotune.CPU_BUDGET_MB
    assert autotune.memory_budget_mb("cpu", 12.5) == 12.5
    assert autotune.cache_clamped("cpu")


@pytest.mark.parametrize("path", ["vmap", "loop", "loop_cl"])
def test_conv_paths_equal_loop_float64(path):
    model, c, d, x, y = _conv()
    ts = torch.tensor([[0.0, 0.4], [0.2, -0.3], [1.0, 0.1]], dtype=torch.float64)
    lo, ac = evaluate_points(model, c, d, ts, x, y, path=path, memory_mb=1e-3)
    lo_ref, ac_ref = evaluate_points_loop(model, c, d, ts, x, y)
    torch.testing.assert_close(lo, lo_ref, **TOL)
    torch.testing.assert_close(ac, ac_ref, **TOL)


@pytest.mark.parametrize("bn", ["eval", "batch"])
@pytest.mark.parametrize("path", ["loop", "loop_cl"])
def test_looped_resnet_with_batchnorm_equals_loop(bn, path):
    model, c, d, x, y = _conv("resnet20", (2, 4, 4), (3, 8, 8), 10, n=6, k=2)
    g = torch.Generator().manual_seed(3)
    bufs = {k: v.double() for k, v in buffers_like(model, 1).items()}
    bufs = {k: (v + 0.1 * torch.rand(v.shape, generator=g, dtype=v.dtype)
                if v.is_floating_point() else v) for k, v in bufs.items()}
    before = {k: v.clone() for k, v in bufs.items()}
    ts = torch.tensor([0.3, -0.2], dtype=torch.float64)
    lo, _ = evaluate_points(model, c, d, ts, x, y, bufs, bn=bn, path=path)
    lo_ref, _ = evaluate_points_loop(model, c, d, ts, x, y, bufs, bn=bn)
    torch.testing.assert_close(lo, lo_ref, **TOL)
    for k in bufs:  # the running statistics are never changed
        assert torch.equal(bufs[k], before[k])


def test_auto_probe_is_cached_and_picks_a_candidate():
    model, c, d, x, y = _conv(seed=5, widths=(3, 5))
    ts = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    n_before = len(autotune.PROBES)
    lo, _ = evaluate_points(model, c, d, ts, x, y, path="probe")
    assert len(autotune.PROBES) == n_before + 1
    key = [k for k in autotune.PROBES if k[0][0] == ("", type(model).__qualname__)][-1]
    chosen, cost = autotune.PROBES[key]
    assert chosen in ("vmap", "loop", "loop_cl") and set(cost) == {"vmap", "loop", "loop_cl"}
    evaluate_points(model, c, d, ts, x, y, path="probe")
    assert len(autotune.PROBES) == n_before + 1  # measured once
    torch.testing.assert_close(lo, evaluate_points_loop(model, c, d, ts, x, y)[0], **TOL)


@pytest.mark.parametrize("args, rule", [((), "loop"),
                                        (("resnet20", (2, 4, 4), (3, 8, 8), 10, 6, 2), "loop_cl")])
def test_auto_on_cpu_is_a_fixed_rule_not_a_probe(args, rule):
    # "same seed, same numbers": a probe on a loaded CPU could flip the path (and the
    # rounding); auto on a CPU never probes, and equals the path its rule names, bit for bit
    model, c, d, x, y = _conv(*args)
    bufs = {k: v.double() if v.is_floating_point() else v
            for k, v in buffers_like(model, 1).items()} or None
    ts = torch.tensor([0.1, 0.2, 0.3][:len(next(iter(d.values())))], dtype=torch.float64)
    n_before = len(autotune.PROBES)
    lo, _ = evaluate_points(model, c, d, ts, x, y, bufs)
    assert len(autotune.PROBES) == n_before
    assert torch.equal(lo, evaluate_points(model, c, d, ts, x, y, bufs, path=rule)[0])


def test_pick_keeps_the_first_unless_clearly_faster():
    assert autotune.pick({"a": 1.0, "b": 0.95}) == "a"  # 5% faster is noise
    assert autotune.pick({"a": 1.0, "b": 0.5, "c": 0.48}) == "b"
    assert autotune.pick({"a": 1.0, "b": 0.5, "c": 0.1}) == "c"


def test_choose_path_runs_each_candidate_and_caches():
    calls = []

    def run(path):
        return lambda: calls.append(path)

    key = ("test-choose-path", object())
    chosen = autotune.choose_path(key, ["a", "b"], run, repeats=2)
    assert chosen in ("a", "b") and calls.count("a") == 3 and calls.count("b") == 3
    assert autotune.choose_path(key, ["a", "b"], run) == chosen and len(calls) == 6
    assert autotune.choose_path(("other",), ["b"], run) == "b" and len(calls) == 6


def test_combinations_on_the_loop_path():
    model, c, d, x, y = _conv(k=2)
    coeffs = torch.tensor([[0.1, 0.2], [-0.3, 0.0]], dtype=torch.float64)
    lo, _ = evaluate_combinations(model, c, d, coeffs, x, y, path="loop")
    ref, _ = evaluate_combinations(model, c, d, coeffs, x, y, path="vmap")
    torch.testing.assert_close(lo, ref, **TOL)


def test_bf16_evaluation_reports_its_error():
    model, c, d, x, y = _conv()
    c32 = {k: v.float() for k, v in c.items()}
    ts = torch.tensor([0.0, 0.2, 0.5])
    err = precision_error(model, c32, d, ts, x.float(), y, "bf16", path="loop")
    assert 0 < err < 0.05  # bf16 keeps 8 bits of mantissa: O(1e-2) relative at most
    assert precision_error(model, c32, d, ts, x.float(), y, "tf32", path="loop") == 0.0  # CPU


def test_unknown_precision_is_refused():
    model, c, d, x, y = _conv()
    with pytest.raises(ValueError, match="precision"):
        evaluate_points(model, c, d, torch.zeros(3), x, y, precision="fp8")


def test_single_forward_equals_vmap_with_batchnorm_updates():
    model, c, _, x, _ = _conv("resnet20", (2, 4, 4), (3, 8, 8), 10, n=6)
    b1 = {k: v.double() if v.is_floating_point() else v
          for k, v in buffers_like(model, 1).items()}
    b2 = {k: v.clone() for k, v in b1.items()}
    model.train()
    try:
        got = single_forward(model, c, x, b1)
        ref = stacked_forward(model, c, x, b2, path="vmap")
    finally:
        model.eval()
    torch.testing.assert_close(got, ref, **TOL)
    for k in b1:
        torch.testing.assert_close(b1[k], b2[k], **TOL)


def test_single_forward_takes_cpu_conv_images_channels_last():
    """The layout rule of :func:`channels_last_input`, and the gradient through the
    channels-last input equal to the vmap path's (NCHW) in float64."""
    cnn, c, _, x, _ = _conv()  # no BatchNorm
    resnet = _conv("resnet20", (2, 4, 4), (3, 8, 8), 10, n=6)[0]
    mlp = build_model(ModelConfig(widths=(4,)), (2,), 2)
    assert channels_last_input(cnn, x) and channels_last_input(resnet, x)
    with torch.no_grad():  # evaluation: only a net with BatchNorm (the engine's rule)
        assert channels_last_input(resnet, x) and not channels_last_input(cnn, x)
    assert not channels_last_input(mlp, torch.zeros(3, 2))
    assert not channels_last_input(cnn, x.flatten(1))
    leaves = [{k: v.clone().requires_grad_() for k, v in c.items()} for _ in range(2)]
    got = single_forward(cnn, leaves[0], x)
    ref = stacked_forward(cnn, leaves[1], x, path="vmap")
    torch.testing.assert_close(got, ref, **TOL)
    got.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    for k in c:
        torch.testing.assert_close(leaves[0][k].grad, leaves[1][k].grad, **TOL)


def _plain_training(model, theta, x, y, cfg, steps):
    """The idiomatic nn.Module + torch.optim loop, float64."""
    net = copy.deepcopy(model).double().train()
    net.load_state_dict({k: v.clone() for k, v in theta.items()}, strict=False)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in net.named_parameters()}, dict(net.named_buffers())


def test_one_member_fit_equals_plain_module_training_float64():
    model, c, _, x, y = _conv("resnet20", (2, 4, 4), (3, 8, 8), 10, n=8)
    data = Dataset("t", x, y, x[:2], y[:2], x[:0], y[:0], 10)
    cfg = TrainConfig(optimizer=Optimizer.SGD, lr=0.05, momentum=0.9, steps=5, log_every=5)
    bufs = {k: v.double() if v.is_floating_point() else v
            for k, v in buffers_like(model, 1).items()}
    res = fit(model, c, data, cfg, buffers=bufs)
    ref, ref_bufs = _plain_training(model, {k: v[0] for k, v in c.items()}, x, y, cfg, 5)
    for k in ref:
        torch.testing.assert_close(res.params[k][0], ref[k], rtol=1e-9, atol=1e-11)
    for k, v in ref_bufs.items():
        torch.testing.assert_close(res.buffers[k][0], v, rtol=1e-9, atol=1e-11)


def test_one_member_fit_equals_the_stacked_path_float64():
    model, c, _, x, y = _conv("resnet20", (2, 4, 4), (3, 8, 8), 10, n=8, seed=1)
    other = {k: v + 0.01 for k, v in c.items()}
    data = Dataset("t", x, y, x[:2], y[:2], x[:2], y[:2], 10)
    cfg = TrainConfig(optimizer=Optimizer.ADAM, lr=1e-3, steps=4, log_every=2, clip_norm=1.0)

    def bufs(m):
        return {k: v.double() if v.is_floating_point() else v
                for k, v in buffers_like(model, m).items()}

    one = fit(model, c, data, cfg, 0.3, buffers=bufs(1))
    two = fit(model, {k: torch.cat([c[k], other[k]]) for k in c}, data, cfg, 0.3,
              buffers=bufs(2))
    for k in c:
        torch.testing.assert_close(one.params[k][0], two.params[k][0], **TOL)
    for row1, row2 in zip(one.history, [r for r in two.history if r["member"] == 0]):
        assert row1["train_loss"] == pytest.approx(row2["train_loss"], rel=1e-10)


def test_digits_config_builds():  # the digits CNN the benchmarks time
    from minefield.data import load_dataset

    data = load_dataset(DataConfig("digits"))
    model = build_model(ModelConfig("cnn", widths=(16, 32)), data.input_shape, data.n_classes)
    assert stacked_forward(model, stack([init_params(model, "he_normal",
                                                     torch.Generator().manual_seed(0))]),
                           data.x_train[:4]).shape == (1, 4, 10)


def test_check_radii_accepts_true_radii_and_rejects_moved_ones():
    # L(t) = t^2 along every direction: the cutoff 0.25 is crossed at t = 0.5
    def loss(ts):
        return ts.double() ** 2

    r = torch.tensor([0.5, 0.5 * (1 + 5e-4), 0.52, 1.0, 0.0], dtype=torch.float64)
    ok = autotune_check(loss, r)
    assert ok.tolist() == [True, True, False, False, True]  # r_max: L(1) = 1 >= cutoff


def autotune_check(loss, r):
    from minefield.basin import check_radii

    return check_radii(loss, r, 0.25, 1e-3, 1.0)


def test_bf16_basin_radii_are_checked_in_float32():
    from minefield.basin import VolumeConfig, basin_radii

    model, c, _, x, y = _conv(classes=3, n=24)
    c32 = {k: v.float() for k, v in c.items()}
    cfg = VolumeConfig(n_directions=4, cutoff=2.0, rtol=1e-2, n_bootstrap=0)
    ref = basin_radii(model, c32, (x.float(), y), cfg)
    low = basin_radii(model, c32, (x.float(), y), cfg.replace(precision="bf16"))
    assert "precision_moved" in low.diagnostics
    assert "precision_moved" not in ref.diagnostics
    # whether or not bf16 moved a radius, every returned radius is valid in float32
    torch.testing.assert_close(low.radii, ref.radii, rtol=2.5e-2, atol=0)


def test_a_probe_is_not_reused_by_a_model_of_other_layers_with_the_same_shapes():
    # a tanh MLP's cached "mlp" path once served a Sigmoid MLP of the same shapes, whose
    # fast path does not exist: the Sigmoid was skipped
    from torch import nn
    a = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    b = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(0)
    c = {k: v.detach().unsqueeze(0).clone() for k, v in a.named_parameters()}
    d = {k: torch.randn(3, *v.shape[1:], generator=g, dtype=v.dtype) for k, v in c.items()}
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    ts = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    evaluate_points(a, c, d, ts, x, y, path="probe")
    lo, _ = evaluate_points(b, c, d, ts, x, y, path="probe")
    torch.testing.assert_close(lo, evaluate_points_loop(b, c, d, ts, x, y)[0], **TOL)
    assert autotune.choose_path(("k",), ["a", "b"], lambda p: lambda: None) in ("a", "b")
    autotune.PROBES[("k",)] = ("gone", {})  # a cached path the caller cannot use
    assert autotune.choose_path(("k",), ["a", "b"], lambda p: lambda: None) in ("a", "b")
