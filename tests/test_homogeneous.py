"""The homogeneous-coordinate MLP forward against the module run one point at a time."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from minefield import homogeneous
from minefield.engine import evaluate_points, evaluate_points_loop
from minefield.functional import mlp_fast_path, stack

TOL = 1e-12  # float64: the bias joins the dot product as its last term (order only)


def _models():
    g = torch.Generator().manual_seed(0)

    def build(*layers):
        m = nn.Sequential(*layers).double()
        for p in m.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64)
        return m

    return {
        "relu": (build(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)), (3,)),
        "tanh, leaky, no bias, final act": (build(
            nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.LeakyReLU(-0.3),
            nn.Linear(4, 4), nn.Identity(), nn.Linear(4, 3), nn.Tanh()), (3,)),
        "consecutive linears": (build(nn.Linear(3, 4), nn.Linear(4, 6), nn.ReLU(),
                                      nn.Linear(6, 2)), (3,)),
        "single linear": (build(nn.Linear(3, 2)), (3,)),
        "flatten, act on x": (build(nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4, 3),
                                    nn.Tanh(), nn.Linear(3, 2)), (2, 2)),
    }


def _members(model, m, seed):
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(p.shape, generator=g, dtype=torch.float64)
             for n, p in model.named_parameters()} for _ in range(m)]


@pytest.mark.parametrize("name", list(_models()))
def test_forward_equals_the_module_point_by_point(name):
    model, shape = _models()[name]
    assert mlp_fast_path(model)
    x = torch.randn(7, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x0 = x.clone()
    work = homogeneous.Workspace(model, 5, 7, x)
    for seed, m in ((2, 5), (3, 3)):  # a full chunk, then a smaller one in the same buffers
        members = _members(model, m, seed)
        ref = torch.stack([functional_call(model, p, (x.clone(),)) for p in members])
        copied = work.pack(stack(members))  # fresh tensors: copied in
        assert torch.allclose(homogeneous.forward(model, copied, x, work), ref, rtol=0,
                              atol=TOL)
        views = work.views(m)  # written in place, as the engine's maker does
        for n, v in stack(members).items():
            views[n].copy_(v)
        got = homogeneous.forward(model, work.pack(views), x, work)
        assert torch.allclose(got, ref, rtol=0, atol=TOL)
    assert torch.equal(x, x0)  # an activation before the first Linear leaves x alone


@pytest.mark.parametrize("name", ["relu", "tanh, leaky, no bias, final act"])
def test_engine_mlp_path_equals_the_one_point_loop(name):
    model, shape = _models()[name]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, model[-1 if name == "relu" else -2].out_features, (50,), generator=g)
    centre = stack([_members(model, 1, 5)[0]])
    dirs = {n: torch.randn(9, *v.shape[1:], generator=g, dtype=torch.float64)
            for n, v in centre.items()}
    ts = torch.rand(9, 3, generator=g, dtype=torch.float64)
    ref = evaluate_points_loop(model, centre, dirs, ts, x, y)
    for mb in (None, 0.01):  # one chunk; many chunks of points and of inputs
        got = evaluate_points(model, centre, dirs, ts, x, y, path="mlp", memory_mb=mb)
        assert torch.allclose(got[0], ref[0], rtol=0, atol=1e-12)
        assert torch.equal(got[1], ref[1])


def test_an_overflowed_unit_that_a_relu_zeroes_gives_the_loops_finite_loss():
    # far out along the first weight h1 = t x overflows float32; the next layer's
    # -inf is zeroed by its ReLU, so the logits are the last bias. The homogeneous
    # constant column (0 * inf + 1 = NaN) made every later unit, and the loss, NaN.
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model[0].weight.fill_(1.0)
        model[2].weight.fill_(-1.0)
        model[4].bias.copy_(torch.tensor([1.0, 0.0]))
    centre = stack([{n: p.detach().clone() for n, p in model.named_parameters()}])
    dirs = {n: torch.zeros(1, *v.shape[1:]) for n, v in centre.items()}
    dirs["0.weight"].fill_(1.0)
    x, y, ts = torch.tensor([[10.0]]), torch.tensor([0]), torch.tensor([[1.0, 1e38]])
    ref = evaluate_points_loop(model, centre, dirs, ts, x, y)
    got = evaluate_points(model, centre, dirs, ts, x, y, path="mlp")
    assert torch.isfinite(ref[0]).all()
    assert torch.allclose(got[0], ref[0], rtol=1e-6, atol=0) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("case", ["wider", "narrower", "bias of a bias-less Linear"])
def test_a_centre_off_the_models_shapes_is_not_run_in_the_workspace(case):
    # functional_call (vmap) runs the centre's tensors whatever the module's widths; the
    # workspace, sized by in/out_features, scrambled them (out= resized its views) or
    # dropped a bias the module lacks
    g = torch.Generator().manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4, bias=case != "bias of a bias-less Linear"),
                          nn.ReLU(), nn.Linear(4, 2))
    hid = {"wider": 6, "narrower": 2}.get(case, 4)
    shapes = {"0.weight": (hid, 3), "0.bias": (hid,), "2.weight": (2, hid), "2.bias": (2,)}
    centre = {n: torch.randn(1, *s, generator=g) for n, s in shapes.items()}
    dirs = {n: torch.randn(5, *s, generator=g) for n, s in shapes.items()}
    x, y, ts = torch.randn(20, 3, generator=g), torch.randint(0, 2, (20,), generator=g), \
        torch.rand(5, generator=g)
    ref = evaluate_points(model, centre, dirs, ts, x, y, path="vmap")
    got = evaluate_points(model, centre, dirs, ts, x, y)  # auto: the MLP path when it fits
    assert torch.allclose(got[0], ref[0], rtol=1e-6, atol=0)
    assert not homogeneous.fits(model, centre)
    assert homogeneous.fits(model, stack([dict(model.named_parameters())]))


def test_an_in_place_activation_on_the_input_leaves_the_callers_x_alone():
    # the engine's size probe ran the module on a view of x: ReLU(inplace=True) zeroed the
    # negatives of the caller's x[:2] (hunt 46)
    model, _ = _models()["flatten, act on x"]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=g)
    x0 = x.clone()
    centre = stack([_members(model, 1, 8)[0]])
    dirs = {n: torch.randn(3, *v.shape[1:], generator=g, dtype=torch.float64)
            for n, v in centre.items()}
    ts = torch.rand(3, generator=g, dtype=torch.float64)
    got = evaluate_points(model, centre, dirs, ts, x, y, path="mlp")
    assert torch.equal(x, x0)
    ref = evaluate_points_loop(model, centre, dirs, ts, x.clone(), y)  # ReLU: idempotent
    assert torch.allclose(got[0], ref[0], rtol=0, atol=1e-12)
