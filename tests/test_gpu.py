"""CUDA paths agree with the CPU (skipped without a GPU)."""

import pytest
import torch

from minefield.config import DataConfig, ModelConfig, TrainConfig
from minefield.data import load_dataset
from minefield.directions import random_directions
from minefield.engine import evaluate_points
from minefield.models import build_model
from minefield.stacked import member, one
from minefield.train import fit, init_stack

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _setup():
    data = load_dataset(DataConfig("swissroll", n_poison=200))
    model = build_model(ModelConfig(), (2,), 2)
    return data, model, init_stack(model, "glorot_uniform", [0, 1])


def test_engine_on_cuda_matches_cpu():
    data, model, params = _setup()
    first = one(params, 0)
    d = random_directions(member(first, 0), 64, generator=torch.Generator().manual_seed(0))
    ts = torch.linspace(0, 0.3, 64)
    cpu = evaluate_points(model, first, d, ts, data.x_train, data.y_train)[0]
    mv = {k: v.cuda() for k, v in first.items()}
    dv = {k: v.cuda() for k, v in d.items()}
    gpu = evaluate_points(model, mv, dv, ts.cuda(), data.x_train.cuda(), data.y_train.cuda())[0]
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


def test_stacked_training_on_cuda_matches_cpu():
    data, model, params = _setup()
    cfg = TrainConfig(steps=50, log_every=50, lr=0.01)
    cpu = fit(model, params, data, cfg, torch.tensor([0.0, 0.5]))
    gpu = fit(model, {k: v.cuda() for k, v in params.items()}, data.to("cuda"), cfg,
              torch.tensor([0.0, 0.5]))
    for k in params:
        torch.testing.assert_close(gpu.params[k].cpu(), cpu.params[k], rtol=1e-3, atol=1e-4)


def test_curvature_and_sharpness_on_cuda_match_cpu():
    from minefield.measures import SharpnessConfig, measure_members

    data, model, params = _setup()
    cfg = SharpnessConfig(measures=("lambda_max", "trace", "worst_l2", "average",
                                    "pac_bayes_sigma"), steps=3, n_samples=8)
    cpu = measure_members(model, params, data, cfg)
    gpu = measure_members(model, {k: v.cuda() for k, v in params.items()}, data.to("cuda"), cfg)
    for k in ("lambda_max", "worst_l2", "average", "pac_bayes_sigma"):
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-6, atol=1e-9)
