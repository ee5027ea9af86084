"""A ``Sequential`` that reuses one module object (``act = nn.Tanh()`` at two places) is
the network its module call computes, on every fast path: the R-operator Hessian
(:mod:`minefield.pearlmutter`, :mod:`minefield.graph_hvp`), the engine's losses
(:func:`minefield.functional._mlp_forward`, :mod:`minefield.seqconv`) and training
(:mod:`minefield.mlpgrad`). ``named_children()`` yields a repeated module once, so a walk
over it dropped every later use. Oracles: float64 autograd Hessians of
``functional_call``, and plain module calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import minefield.step
from minefield import DataConfig, TrainConfig, load_dataset
from minefield.engine import evaluate_points
from minefield.functional import mlp_fast_path, stacked_forward
from minefield.hvp import CurvatureOperator, dense_matrix, model_objective
from minefield.loss import nll
from minefield.pearlmutter import mlp_plan
from minefield.seqconv import seq_conv_path
from minefield.train import fit


def _mlp_tail_act(n_in: int = 3, c: int = 3) -> nn.Sequential:
    t = nn.Tanh()
    return nn.Sequential(nn.Linear(n_in, 5), t, nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, c), t)


def _mlp_twice(n_in: int = 3, c: int = 3) -> nn.Sequential:
    t = nn.Tanh()
    return nn.Sequential(nn.Linear(n_in, 5), t, nn.Linear(5, 4), t, nn.Linear(4, c))


def _conv() -> nn.Sequential:
    r = nn.ReLU()
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), r, nn.Conv2d(3, 3, 3, padding=1), r,
                         nn.Flatten(), nn.Linear(48, 3))


MODELS = {"mlp-tail-act": _mlp_tail_act, "mlp-act-twice": _mlp_twice, "conv": _conv}


def _problem(name: str, members: int = 2):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    shape = (1, 4, 4) if name == "conv" else (3,)
    x = torch.randn(13, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (13,))
    p = {k: v.detach()[None] + 0.3 * torch.randn(members, *v.shape, dtype=torch.float64)
         for k, v in model.named_parameters()}
    return model, p, x, y


def _loss(model, params, x, y):  # the module itself on one member's weights
    return nll(functional_call(model, params, (x,)), y).mean()


def test_the_fast_paths_see_every_place_of_a_reused_module():
    tail, twice = _mlp_tail_act(), _mlp_twice()
    assert mlp_fast_path(tail) and mlp_fast_path(twice) and seq_conv_path(_conv())
    assert mlp_plan(tail) is None  # the logits are a tanh's output: not an R-operator MLP
    assert [n for n, _ in mlp_plan(twice)] == ["0", "2", "4"]
    shared = nn.Linear(3, 3)  # a reused layer has no parameters of its own name to stack
    assert not mlp_fast_path(nn.Sequential(shared, nn.Tanh(), shared))
    conv = nn.Conv2d(1, 1, 3, padding=1)
    assert not seq_conv_path(nn.Sequential(conv, nn.ReLU(), conv))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hessian_of_a_reused_module_matches_autograd(name):
    model, p, x, y = _problem(name)
    got = dense_matrix(CurvatureOperator(model_objective(model, p, (x, y))))
    names = list(p)
    shapes = [p[k].shape[1:] for k in names]
    for i in range(2):
        def loss(flat):
            parts = flat.split([s.numel() for s in shapes])
            return _loss(model, {k: v.view(s) for k, v, s in zip(names, parts, shapes)}, x, y)

        want = torch.autograd.functional.hessian(loss, torch.cat([p[k][i].flatten()
                                                                  for k in names]))
        torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_engine_losses_of_a_reused_module_match_the_module(name):
    model, p, x, y = _problem(name, members=1)
    d = {k: torch.randn(3, *v.shape[1:], dtype=torch.float64) for k, v in p.items()}
    ts = torch.tensor([0.0, 0.1, -0.2], dtype=torch.float64)
    loss, _ = evaluate_points(model, p, d, ts, x, y)
    want = [_loss(model, {k: p[k][0] + t * d[k][j] for k in p}, x, y)
            for j, t in enumerate(ts)]
    torch.testing.assert_close(loss, torch.stack(want), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp-tail-act", "mlp-act-twice"])
def test_a_training_step_of_a_reused_module_matches_the_module(name, monkeypatch):
    data = load_dataset(DataConfig("blobs", n_train=40, n_test=20, n_poison=20)).to(
        "cpu", torch.float64)
    model = MODELS[name](data.input_shape[0], data.n_classes).double()
    p = {k: v.detach()[None].repeat(2, *[1] * v.dim()) for k, v in model.named_parameters()}
    cfg = TrainConfig(steps=1, log_every=1, optimizer="sgd", lr=0.5)
    got = fit(model, p, data, cfg)
    monkeypatch.setattr(minefield.step, "mlp_logits",  # the module call under vmap
                        lambda m, q, xx: stacked_forward(m, q, xx, path="vmap"))
    want = fit(model, p, data, cfg)
    assert got.history[0]["train_loss"] == pytest.approx(want.history[0]["train_loss"],
                                                         rel=1e-12)
    for k in p:
        torch.testing.assert_close(got.params[k], want.params[k], rtol=1e-12, atol=1e-14)
