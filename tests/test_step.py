"""The training step and its plug-in points: objectives and update rules."""

import torch

from minefield.config import DataConfig, ModelConfig, TrainConfig
from minefield.data import load_dataset
from minefield.models import build_model
from minefield.stacked import one
from minefield.step import Batch, Hyper, poisoned_objective, sam_update, train_step
from minefield.train import fit, init_stack, make_optimizer


def _problem(m=2):
    data = load_dataset(DataConfig("blobs", n_train=40, n_test=40, n_poison=40)).to(
        "cpu", torch.float64)
    model = build_model(ModelConfig(widths=(6,)), (2,), 2).to(torch.float64)
    params = {k: v.double() for k, v in init_stack(model, "glorot_uniform", range(m)).items()}
    return model, params, data


def test_sam_step_equals_the_two_gradient_formula():
    model, params, data = _problem()
    lr, rho = 0.1, 0.05
    batch = Batch(data.x_train, data.y_train)
    hyper = Hyper(beta=torch.zeros(2, dtype=torch.float64))
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = make_optimizer(TrainConfig(optimizer="sgd", lr=lr, momentum=0.0), list(leaves.values()))
    train_step(model, leaves, {}, opt, batch, hyper, update=sam_update(rho))
    for i in range(2):  # the oracle, one member at a time with plain autograd
        theta = {k: v.clone().requires_grad_() for k, v in one(params, i).items()}
        g = torch.autograd.grad(poisoned_objective(model, theta, {}, batch, hyper).sum(),
                                list(theta.values()))
        norm = torch.sqrt(sum(x.pow(2).sum() for x in g))
        shifted = {k: (v + rho * gk / norm).detach().requires_grad_()
                   for (k, v), gk in zip(theta.items(), g)}
        g2 = torch.autograd.grad(poisoned_objective(model, shifted, {}, batch, hyper).sum(),
                                 list(shifted.values()))
        for (k, v), gk in zip(theta.items(), g2):
            torch.testing.assert_close(leaves[k][i:i + 1].detach(), v.detach() - lr * gk,
                                       rtol=1e-12, atol=1e-14)


def test_an_objective_plugs_into_the_driver():
    # SGD without momentum on 2 L equals SGD on L with twice the learning rate
    model, params, data = _problem()

    def doubled(*args):
        return 2 * poisoned_objective(*args)

    cfg = TrainConfig(optimizer="sgd", momentum=0.0, lr=0.05, steps=15, log_every=15,
                      batch_size=16, l2=1e-3)
    a = fit(model, params, data, cfg, torch.tensor([0.0, 0.4]), objective=doubled)
    b = fit(model, params, data, cfg.replace(lr=0.1), torch.tensor([0.0, 0.4]))
    for k in params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=1e-10, atol=1e-12)
    sam = fit(model, params, data, cfg, torch.tensor([0.0, 0.4]), update=sam_update(0.05))
    assert not torch.equal(sam.params["0.weight"], b.params["0.weight"])
