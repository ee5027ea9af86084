"""Stacked optimizers: torch.optim op for op at equal learning rates, M runs at different ones."""

import copy

import pytest
import torch

from minefield.config import DataConfig, ModelConfig, TrainConfig
from minefield.data import load_dataset
from minefield.models import build_model
from minefield.optim import StackedOptimizer
from minefield.train import fit, init_stack

_TORCH = {
    ("sgd", 0.9): lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, foreach=True),
    ("sgd", 0.0): lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.0, foreach=True),
    ("adam", None): lambda p, lr: torch.optim.Adam(p, lr=lr, foreach=True),
    ("rmsprop", None): lambda p, lr: torch.optim.RMSprop(p, lr=lr, alpha=0.9, eps=1e-7,
                                                         foreach=True),
}


def _ours(kind, mu, p, lr):
    return StackedOptimizer(p, kind, lr, **({} if mu is None else {"momentum": mu}))


def _grads(dtype, n_steps, m=3):
    g = torch.Generator().manual_seed(0)
    shapes = [(m, 5, 4), (m, 5)]
    w0 = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    return w0, [[torch.randn(s, generator=g, dtype=dtype) for s in shapes]
                for _ in range(n_steps)]


def _drive(opt, leaves, grads, lr=None, schedule=lambda t: 1.0, base=0.01):
    for t, gs in enumerate(grads):
        for v, g in zip(leaves, gs):  # a gradient that depends on the iterate
            v.grad = g * (1 + v.detach() ** 2)
        for group in opt.param_groups:
            group["lr"] = base * schedule(t)
        if isinstance(opt, StackedOptimizer):
            opt.step(lr=None if lr is None else lr * schedule(t))
        else:
            opt.step()


@pytest.mark.parametrize("kind,mu", list(_TORCH))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_learning_rates_are_torch_optim_bit_for_bit(kind, mu, dtype):
    w0, grads = _grads(dtype, 25)
    a = [w.clone().requires_grad_() for w in w0]
    b = [w.clone().requires_grad_() for w in w0]
    ours, ref = _ours(kind, mu, a, 0.01), _TORCH[kind, mu](b, 0.01)
    schedule = lambda t: 0.1 ** (t >= 12)  # noqa: E731
    _drive(ours, a, grads, torch.full((3,), 0.01, dtype=torch.float64), schedule)
    _drive(ref, b, grads, schedule=schedule)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # the state dicts are interchangeable: torch's loads into ours and steps on identically
    c = [w.detach().clone().requires_grad_() for w in b]
    ours2 = _ours(kind, mu, c, 0.01)
    ours2.load_state_dict(copy.deepcopy(ref.state_dict()))
    _drive(ours2, c, grads[:3])
    _drive(ref, b, grads[:3])
    for x, y in zip(c, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kind,mu", list(_TORCH))
def test_per_member_learning_rates_equal_separate_runs(kind, mu):
    lrs = torch.tensor([0.01, 0.03, 0.002], dtype=torch.float64)
    w0, grads = _grads(torch.float64, 20)
    stacked = [w.clone().requires_grad_() for w in w0]
    _drive(_ours(kind, mu, stacked, 0.01), stacked, grads, lrs)
    for i in range(3):
        one = [w[i:i + 1].clone().requires_grad_() for w in w0]
        _drive(_TORCH[kind, mu](one, float(lrs[i])), one,
               [[g[i:i + 1] for g in gs] for gs in grads], base=float(lrs[i]))
        for x, y in zip(stacked, one):
            torch.testing.assert_close(x[i:i + 1], y, rtol=1e-9, atol=1e-12)


def _problem(m=3):
    data = load_dataset(DataConfig("blobs", n_train=40, n_test=40, n_poison=40)).to(
        "cpu", torch.float64)
    model = build_model(ModelConfig(widths=(6,)), (2,), 2).to(torch.float64)
    params = {k: v.double() for k, v in init_stack(model, "glorot_uniform", range(m)).items()}
    return model, params, data


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop"])
def test_fit_with_per_member_lr_and_l2_equals_single_model_runs(optimizer):
    model, params, data = _problem()
    cfg = TrainConfig(optimizer=optimizer, lr=0.05, steps=30, log_every=10, batch_size=16,
                      milestones=(20,), gamma=0.5)
    lrs, l2s, betas = [0.05, 0.02, 0.1], [0.0, 1e-3, 1e-2], torch.tensor([0.0, 0.3, 0.5])
    both = fit(model, params, data, cfg, betas, lrs=lrs, l2s=l2s)
    for i in range(3):
        one = fit(model, {k: v[i:i + 1] for k, v in params.items()}, data,
                  cfg.replace(lr=lrs[i], l2=l2s[i]), betas[i:i + 1])
        for k in params:
            torch.testing.assert_close(both.params[k][i:i + 1], one.params[k], rtol=1e-9,
                                       atol=1e-12)
    assert [r["lr"] for r in both.history if r["step"] == 30] == [x * 0.5 for x in lrs]


class _TorchSGD(torch.optim.SGD):
    def step(self, closure=None, lr=None):  # the driver sets param_groups' lr each step
        return super().step()


def test_fit_trains_bit_for_bit_as_with_torch_optim(monkeypatch):
    import minefield.train as train

    model, params, data = _problem(2)
    data = data.to("cpu", torch.float32)
    model = model.float()
    params = {k: v.float() for k, v in params.items()}
    cfg = TrainConfig(optimizer="sgd", lr=0.05, steps=40, log_every=40, batch_size=16,
                      milestones=(25,), clip_norm=1.0)
    ours = fit(model, params, data, cfg, torch.tensor([0.0, 0.4]))
    monkeypatch.setattr(train, "make_optimizer", lambda c, leaves: _TorchSGD(
        leaves, lr=c.lr, momentum=c.momentum, foreach=True))
    ref = fit(model, params, data, cfg, torch.tensor([0.0, 0.4]))
    for k in params:
        assert torch.equal(ours.params[k], ref.params[k])


def test_bad_input_raises():
    w = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="adam takes no momentum"):
        StackedOptimizer([w], "adam", 0.1, momentum=0.5)
    with pytest.raises(ValueError, match="not one of"):
        StackedOptimizer([w], "lbfgs", 0.1)
    opt = StackedOptimizer([w], "sgd", 0.1)
    w.grad = torch.ones(2, 3)
    with pytest.raises(ValueError, match="3 learning rates for a stack of 2"):
        opt.step(lr=torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="takes no closure"):
        opt.step(lambda: 0.0)
    model, params, data = _problem(2)
    cfg = TrainConfig(steps=1)
    with pytest.raises(ValueError, match="3 lrs for 2 members"):
        fit(model, params, data, cfg, lrs=[0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="lrs must be finite"):
        fit(model, params, data, cfg, lrs=[0.1, float("nan")])
    with pytest.raises(ValueError, match="must be > 0"):
        fit(model, params, data, cfg, lrs=[0.1, 0.0])
    with pytest.raises(ValueError, match="need train.sam"):
        fit(model, params, data, cfg, rhos=[0.1, 0.0])
