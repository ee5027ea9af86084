"""The stacked MLP as one autograd node (minefield.mlpgrad) against autograd itself.

The oracle is the same training run with the node switched off (autograd through
``stacked_forward``): the node claims autograd's kernels and layouts, so the runs
must agree bit for bit (``torch.equal``), not just to a tolerance.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import minefield.step
from minefield import DataConfig, ModelConfig, TrainConfig, build_model, load_dataset
from minefield.functional import stacked_forward
from minefield.mlpgrad import mlp_logits
from minefield.step import Batch, Hyper, poisoned_objective
from minefield.train import fit, init_stack


def _autograd_only(model, params, x):
    return stacked_forward(model, params, x)


def _data(dtype):
    return load_dataset(DataConfig("blobs", n_train=40, n_test=20, n_poison=20)).to(
        "cpu", dtype)


CASES = {  # name: (activation, TrainConfig fields, fit keywords)
    "adam-relu-clip-l2": ("relu", dict(optimizer="adam", lr=0.01, clip_norm=0.5, l2=1e-3,
                                       batch_size=16), dict(flip=True)),
    "sgd-tanh": ("tanh", dict(optimizer="sgd", lr=0.05, momentum=0.9, milestones=(4,)), {}),
    "rmsprop-leaky-isolated": ("leaky_relu", dict(optimizer="rmsprop", lr=0.003),
                               dict(isolated=True)),
    "sam": ("relu", dict(optimizer="sgd", lr=0.05, sam="sam", rho=0.05), {}),
    "asam-per-member-lr": ("relu", dict(optimizer="adam", lr=0.01, sam="asam", rho=0.1),
                           dict(lrs=[0.01, 0.02, 0.005])),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_through_the_node_is_autograd_bit_for_bit(case, dtype, monkeypatch):
    act, fields, kw = CASES[case]
    data = _data(dtype)
    model = build_model(ModelConfig(widths=(8, 8), activation=act), data.input_shape,
                        data.n_classes).to(dtype)
    p = {k: v.to(dtype) for k, v in init_stack(model, "glorot_uniform", [0, 1, 2]).items()}
    cfg = TrainConfig(steps=8, log_every=4, **fields)
    betas = torch.tensor([0.0, 0.3, 0.5])
    node = fit(model, p, data, cfg, betas, **kw)
    monkeypatch.setattr(minefield.step, "mlp_logits", _autograd_only)
    ref = fit(model, p, data, cfg, betas, **kw)
    for k in p:
        assert torch.equal(node.params[k], ref.params[k]), k
    assert [r["train_loss"] for r in node.history] == [r["train_loss"] for r in ref.history]


def test_gradients_match_autograd_without_bias_and_with_flatten():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5, bias=False), nn.ReLU(),
                          nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).double()
    p = {k: v.detach().unsqueeze(0).repeat(2, *[1] * v.dim()).requires_grad_()
         for k, v in model.named_parameters()}
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    w = torch.randn(2, 7, 3, dtype=torch.float64)
    got = torch.autograd.grad((mlp_logits(model, p, x) * w).sum(), list(p.values()))
    want = torch.autograd.grad((stacked_forward(model, p, x) * w).sum(), list(p.values()))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_second_derivative_raises_instead_of_being_wrong():
    model = build_model(ModelConfig(widths=(4,), activation="tanh"), (2,), 2).double()
    p = {k: v.double().requires_grad_() for k, v in init_stack(model, "torch", [0]).items()}
    loss = mlp_logits(model, p, torch.randn(5, 2, dtype=torch.float64)).pow(2).sum()
    with pytest.raises(RuntimeError, match="has no second derivative"):
        torch.autograd.grad(loss, list(p.values()), create_graph=True)


def test_activations_in_a_row_train_through_the_node():
    # in place, tanh's result would be overwritten by the relu after it, whose backward
    # reads its own: only a Linear's fresh output is taken in place (out of place: relu,
    # leaky relu and tanh; the oracles: autograd through the same forward, and vmap)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(),
                          nn.Identity(), nn.LeakyReLU(0.1), nn.Tanh(), nn.Linear(4, 3)).double()
    p = {k: v.detach().unsqueeze(0).repeat(2, *[1] * v.dim()).requires_grad_()
         for k, v in model.named_parameters()}
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(2, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = mlp_logits(model, p, x)
    assert out.grad_fn.name() == "StackedMLPBackward"
    got = torch.autograd.grad((out * w).sum(), list(p.values()))
    want = torch.autograd.grad((stacked_forward(model, p, x) * w).sum(), list(p.values()))
    vmap = torch.autograd.grad((stacked_forward(model, p, x, path="vmap") * w).sum(),
                               list(p.values()))
    for a, b, c in zip(got, want, vmap):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_a_fit_with_activations_in_a_row_is_autograd_bit_for_bit(monkeypatch):
    data = _data(torch.float64)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.ReLU(), nn.Linear(8, 1)).double()
    p = {k: v.double() for k, v in init_stack(model, "torch", [0, 1]).items()}
    cfg = TrainConfig(steps=3, log_every=1)
    node = fit(model, p, data, cfg)
    monkeypatch.setattr(minefield.step, "mlp_logits", _autograd_only)
    ref = fit(model, p, data, cfg)
    for k in p:
        assert torch.equal(node.params[k], ref.params[k]), k


def test_a_leaky_relu_of_negative_slope_trains_as_the_vmap_path_does():
    # its result does not give back its input's sign: autograd's backward of it in place
    # raised; now it acts out of place and autograd's graph differentiates it
    model = nn.Sequential(nn.Linear(2, 6), nn.LeakyReLU(-0.5), nn.Linear(6, 3)).double()
    p = {k: v.double() for k, v in init_stack(model, "torch", [0, 1]).items()}
    x = torch.randn(7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    got = torch.autograd.grad(mlp_logits(model, leaves, x).square().sum(), list(leaves.values()))
    want = torch.autograd.grad(stacked_forward(model, leaves, x, path="vmap").square().sum(),
                               list(leaves.values()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    fit(model, p, _data(torch.float64), TrainConfig(steps=3, log_every=1))  # raised


def _objective_parts():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1)).double()
    g = torch.Generator().manual_seed(0)
    p = {k: torch.randn(2, *v.shape, dtype=torch.float64, generator=g)
         for k, v in model.named_parameters()}
    batch = Batch(torch.randn(6, 3, dtype=torch.float64, generator=g),
                  torch.randint(0, 2, (6,), generator=g))
    return model, p, batch, Hyper(beta=torch.tensor([0.0, 0.3], dtype=torch.float64))


def _autograd_gradient(model, p, batch, hyper, forward=contextlib.nullcontext):
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    with forward():
        loss = poisoned_objective(model, leaves, {}, batch, hyper).sum()  # through the node
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def test_torch_func_transforms_take_autograd_graph():
    # the node has no setup_context, vmap or jvp rule: under torch.func the objective
    # must still differentiate, to the node's own gradient (the oracle)
    model, p, batch, hyper = _objective_parts()
    want = _autograd_gradient(model, p, batch, hyper)

    def obj(pp):
        return poisoned_objective(model, pp, {}, batch, hyper).sum()

    got = torch.func.grad(obj)(p)
    for k in p:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
    tangent = {k: torch.ones_like(v) for k, v in p.items()}
    _, dir_deriv = torch.func.jvp(obj, (p,), (tangent,))
    torch.testing.assert_close(dir_deriv, sum(want[k].sum() for k in p), rtol=1e-12, atol=0)


def test_a_backward_under_autocast_takes_autograd_graph():
    # the usual pattern: forward under autocast, backward after it. The node's backward
    # would not cast (bmm of float32 and bfloat16); autograd's graph does, to bfloat16's
    # precision of the float32 gradient
    model, p, batch, hyper = _objective_parts()
    model = model.float()
    p = {k: v.float() for k, v in p.items()}
    batch = Batch(batch.x.float(), batch.y)
    want = _autograd_gradient(model, p, batch, hyper)
    got = _autograd_gradient(model, p, batch, hyper,
                             lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    for k in p:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], want[k], rtol=0.05, atol=0.05)


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_a_training_step_dispatches_fewer_operations(monkeypatch):
    # what a launch-bound GPU step pays for (issue 14's search step): the dispatched
    # aten operations of 10 steps of the search's optimizer on a 5-layer MLP
    data = _data(torch.float32)
    model = build_model(ModelConfig(widths=(25, 25, 25, 25)), data.input_shape,
                        data.n_classes)
    p = init_stack(model, "glorot_normal", [0, 1])
    cfg = TrainConfig(optimizer="adam", lr=0.004, steps=10, log_every=100,
                      checkpoint_every=100)

    def count():
        with _Count() as c:
            fit(model, p, data, cfg, torch.tensor([0.5, 0.5]), flip=True)
        return sum(c.ops.values())

    node = count()
    monkeypatch.setattr(minefield.step, "mlp_logits", _autograd_only)
    ref = count()
    layers = 5
    assert node <= ref - 10 * 2 * layers, (node, ref)  # at least 2 fewer per layer and step


def test_a_mutated_model_is_planned_again():
    # the plan is cached per model: swapping an activation keeps the parameter names
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    p = {k: v.detach().unsqueeze(0).requires_grad_() for k, v in model.named_parameters()}
    x = torch.randn(4, 2, dtype=torch.float64)
    mlp_logits(model, p, x)
    model[1] = nn.Tanh()
    assert torch.equal(mlp_logits(model, p, x), stacked_forward(model, p, x))
    model.append(nn.Tanh())
    assert torch.equal(mlp_logits(model, p, x), stacked_forward(model, p, x))


def test_inputs_that_require_a_gradient_get_it_from_autograd():
    # the node gives no gradient for x: an input gradient (saliency, adversarial
    # examples) must not come back silently empty
    model = build_model(ModelConfig(widths=(4,)), (2,), 2).double()
    p = {k: v.double() for k, v in init_stack(model, "torch", [0, 1]).items()}
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(mlp_logits(model, p, x).sum(), [x])
    x2 = x.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(stacked_forward(model, p, x2).sum(), [x2])
    assert torch.equal(gx, want) and bool(gx.abs().sum() > 0)


@pytest.mark.parametrize("where", ["layer", "layer-pre", "global"])
def test_a_backward_hook_is_run_as_the_module_runs_it(where):
    """The training objective's gradients after a backward hook is registered are the
    module's own (hunt 41: the MLP node skipped a hook zeroing the last layer's input
    gradient, and the first layer's weights got a gradient 0.068 off; the first call had
    cached the model as plain)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 2, dtype=torch.float64), torch.randint(0, 3, (20,))

    def grads():
        p = {k: v.detach().clone()[None].requires_grad_() for k, v in model.named_parameters()}
        loss = poisoned_objective(model, p, {}, Batch(x, y), Hyper(torch.zeros(1).double()))
        return [g[0] for g in torch.autograd.grad(loss.sum(), list(p.values()))]

    plain = grads()
    handle = {
        "layer": lambda: model[2].register_full_backward_hook(lambda m, gi, go: (gi[0] * 0,)),
        "layer-pre": lambda: model[2].register_full_backward_pre_hook(
            lambda m, go: (go[0] * 2,)),
        "global": lambda: nn.modules.module.register_module_full_backward_hook(
            lambda m, gi, go: (gi[0] * 0,) if m is model[2] else None),
    }[where]()
    try:
        want = torch.autograd.grad(nn.functional.cross_entropy(model(x), y),
                                   list(model.parameters()))
        got = grads()
        assert (want[0] - plain[0]).abs().max() > 0.01  # the hook changes the gradient
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    finally:
        handle.remove()
