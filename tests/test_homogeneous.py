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
