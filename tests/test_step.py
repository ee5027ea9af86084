"""The training step and its plug-in points: objectives and update rules."""

import torch

from minefield.config import DataConfig, ModelConfig, TrainConfig
from minefield.data import load_dataset
from minefield.models import build_model
from minefield.sam import sam_update
from minefield.train import fit, init_stack


def _problem(m=2):
    data = load_dataset(DataConfig("blobs", n_train=40, n_test=40, n_poison=40)).to(
        "cpu", torch.float64)
    model = build_model(ModelConfig(widths=(6,)), (2,), 2).to(torch.float64)
    params = {k: v.double() for k, v in init_stack(model, "glorot_uniform", range(m)).items()}
    return model, params, data


def test_an_objective_plugs_into_the_driver():
    # SGD without momentum on 2 L equals SGD on L with twice the learning rate
    model, params, data = _problem()

    def doubled(*args):
        return 2 * poisoned_objective(*args)

    from minefield.step import poisoned_objective

    cfg = TrainConfig(optimizer="sgd", momentum=0.0, lr=0.05, steps=15, log_every=15,
                      batch_size=16, l2=1e-3)
    a = fit(model, params, data, cfg, torch.tensor([0.0, 0.4]), objective=doubled)
    b = fit(model, params, data, cfg.replace(lr=0.1), torch.tensor([0.0, 0.4]))
    for k in params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=1e-10, atol=1e-12)
    sam = fit(model, params, data, cfg, torch.tensor([0.0, 0.4]), update=sam_update("sam"),
              rhos=[0.05, 0.05])
    assert not torch.equal(sam.params["0.weight"], b.params["0.weight"])
