"""Pearlmutter's R-operator for stacked MLPs against the dense float64 autograd Hessian."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from minefield.config import ModelConfig
from minefield.hvp import CurvatureOperator, model_objective
from minefield.loss import nll
from minefield.models import build_model
from minefield.pearlmutter import MLPHessian, mlp_plan
from minefield.stacked import flatten, member, one, stack, unflatten
from minefield.train import init_stack


def _dense(model, p, x, y, i):
    """Member i's Hessian of the mean NLL by plain autograd, float64."""
    single = one(p, i)

    def f(flat):
        q = member(unflatten(flat[None], single), 0)
        return nll(functional_call(model, q, (x,)), y).mean()

    return torch.autograd.functional.hessian(f, flatten(single)[0])


@pytest.mark.parametrize("act,classes", [("relu", 2), ("tanh", 3), ("leaky_relu", 4),
                                         ("tanh", 2)])
def test_products_equal_the_dense_hessian(act, classes):
    model = build_model(ModelConfig(widths=(5, 4), activation=act), (3,), classes).double()
    p = {k: v.double() for k, v in init_stack(model, "glorot_uniform", [0, 1, 2]).items()}
    g = torch.Generator().manual_seed(7)
    x = torch.randn(25, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (25,), generator=g)
    v = torch.randn(3, flatten(p).shape[1], generator=g, dtype=torch.float64)
    chunks = [(x[:11], y[:11]), (x[11:], y[11:])]  # chunked data sums to the whole product
    op = MLPHessian(model, p, chunks, 1 / 25)
    assert op.flip == [False, True, False]  # the (4, 5) layer's weight product transposed
    hv = flatten(op.matvec(unflatten(v, p)))
    for i in range(3):
        torch.testing.assert_close(hv[i], _dense(model, p, x, y, i) @ v[i], rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("act,out,bias", [("tanh", 3, True), ("relu", 1, True),
                                          ("leaky_relu", 2, False), ("tanh", 1, False)])
def test_probes_as_a_batch_axis_equal_one_product_at_a_time(act, out, bias):
    """``matmat_flat`` (K probes in one pass) against K ``matvec_flat`` calls and the dense
    float64 Hessian, chunked data, one-logit (sigmoid) and softmax outputs, no biases."""
    acts = {"tanh": nn.Tanh(), "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.1)}
    torch.manual_seed(0)  # the layers' initial weights; the stack below is seeded
    model = nn.Sequential(nn.Linear(3, 5, bias=bias), acts[act], nn.Linear(5, 4, bias=bias),
                          acts[act], nn.Linear(4, out, bias=bias)).double()
    p = {k: v.double() for k, v in init_stack(model, "glorot_uniform", [0, 1]).items()}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(23, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, max(out, 2), (23,), generator=g)
    op = MLPHessian(model, p, [(x[:9], y[:9]), (x[9:], y[9:])], 1 / 23)
    v = torch.randn(2, op.n, 5, generator=g, dtype=torch.float64).transpose(1, 2)  # (M, K, n)
    hv = op.matmat_flat(v)
    loop = torch.stack([op.matvec_flat(v[:, j].contiguous()) for j in range(5)], 1)
    torch.testing.assert_close(hv, loop, rtol=1e-12, atol=1e-14)
    for i in range(2):
        torch.testing.assert_close(hv[i], v[i] @ _dense(model, p, x, y, i), rtol=1e-10,
                                   atol=1e-12)
    ops = [CurvatureOperator(model_objective(model, p, (x, y)), probe_chunk=c) for c in (2, 64)]
    assert all(isinstance(o._mlp, MLPHessian) for o in ops)
    torch.testing.assert_close(ops[0].matmat(v), ops[1].matmat(v), rtol=1e-12, atol=1e-14)
    assert ops[0].n_matvecs == 5 and ops[1]._mlp.probes_per_pass >= 8
    ops[1]._mlp.probes_per_pass = 1  # a wide working set: one product at a time
    torch.testing.assert_close(ops[1].matmat(v), hv, rtol=1e-10, atol=1e-12)


def test_operator_uses_it_and_agrees_with_forward_mode():
    model = build_model(ModelConfig(widths=(6, 5), activation="tanh"), (2,), 2).double()
    p = {k: v.double() for k, v in init_stack(model, "glorot_uniform", [3, 4]).items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (30,), generator=g)
    rev = CurvatureOperator(model_objective(model, p, (x, y), batch_size=7))
    fwd = CurvatureOperator(model_objective(model, p, (x, y)), mode="forward")
    assert rev._mlp is not None
    v = torch.randn(2, 4, rev.n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(rev.matmat(v), fwd.matmat(v), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rev._mlp.losses, fwd.objective.losses(), rtol=1e-12, atol=0)


def test_plan_accepts_plain_mlps_only():
    plan = mlp_plan(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    assert [(n, type(a).__name__ if a else None) for n, a in plan] == [("1", "Tanh"), ("3", None)]
    assert mlp_plan(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.ReLU(), nn.Linear(3, 2))) is None
    assert mlp_plan(nn.Sequential(nn.Linear(4, 3), nn.ReLU())) is None  # logits not linear
    assert mlp_plan(nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2))) is None
    assert mlp_plan(nn.Linear(4, 3)) is None


def test_a_model_outside_the_plan_raises():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1))
    p = stack([{k: v.detach() for k, v in model.named_parameters()}])
    with pytest.raises(ValueError, match="nn.Sequential of Linear layers"):
        MLPHessian(model, p, [(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))], 0.25)


def test_curvature_callers_agree_with_one_product_at_a_time():
    """Hutch++ (a QR basis as probes), the Hutchinson diagonal and the dense matrix (expanded
    unit vectors, a last block of 2 probes) through the batched R-operator equal one product
    at a time, and repeat bit for bit."""
    from minefield.curvature import hutchinson_diagonal, hutchinson_trace
    from minefield.hvp import dense_matrix

    model = build_model(ModelConfig(widths=(4,), activation="tanh"), (2,), 3).double()
    p = {k: v.double() for k, v in init_stack(model, "glorot_uniform", [0, 1]).items()}
    g = torch.Generator().manual_seed(2)
    x = torch.randn(13, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (13,), generator=g)
    runs = []
    for per in (None, None, 1):
        op = CurvatureOperator(model_objective(model, p, (x, y), batch_size=5), probe_chunk=3)
        if per:
            op._mlp.probes_per_pass = per
        runs.append((hutchinson_trace(op, rtol=None, n_probes=8, batch=5, deflate=4).estimate,
                     hutchinson_diagonal(op, n_probes=6, batch=4)[0], dense_matrix(op)))
    assert op.n == 27 and CurvatureOperator(model_objective(model, p, (x, y), batch_size=5)
                                            )._mlp.probes_per_pass >= 8
    for a, b, c in zip(*runs):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("layers", [
    lambda: [nn.Linear(3, 4), nn.Linear(4, 3)],  # no activation at all
    lambda: [nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Identity(), nn.Linear(4, 1)],
])
def test_a_hidden_layer_without_activation_is_the_identity(layers):
    """``mlp_plan`` accepts a hidden ``Linear`` with no activation (or ``Identity``) after
    it; its products had raised IndexError (one phi' short) instead of ``H v``."""
    torch.manual_seed(0)
    model = nn.Sequential(*layers()).double()
    p = {k: v.double() for k, v in init_stack(model, "glorot_uniform", [0, 1]).items()}
    g = torch.Generator().manual_seed(5)
    x = torch.randn(17, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (17,), generator=g)
    op = CurvatureOperator(model_objective(model, p, (x, y)))
    assert isinstance(op._mlp, MLPHessian)
    v = torch.randn(2, 3, op.n, generator=g, dtype=torch.float64)
    hv = op.matmat(v)  # the probes as a batch axis
    for i in range(2):
        dense = _dense(model, p, x, y, i)
        torch.testing.assert_close(hv[i], v[i] @ dense, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op.matvec(v[:, 0])[i], dense @ v[i, 0], rtol=1e-10,
                                   atol=1e-12)
