"""Shared fixtures: tiny problems built from one factory, everything under tmp_path."""

from __future__ import annotations

import pytest
import torch

from minefield.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig


def tiny_config(name: str = "tiny", **train) -> ExperimentConfig:
    """A run that trains in about a second: blobs, a 2-layer MLP, full batch."""
    t = dict(steps=60, lr=0.05, log_every=20, checkpoint_every=20, seed=0) | train
    return ExperimentConfig(
        name=name,
        data=DataConfig("blobs", n_train=40, n_test=40, n_poison=40),
        model=ModelConfig(widths=(8, 8)),
        train=TrainConfig(**t),
        device="cpu",
    )


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


def interrupt_training(monkeypatch, step: int, state_only: bool = False):
    """Make ``train_run`` raise KeyboardInterrupt right after it saved step ``step`` (its
    state file only, with ``state_only``), as a kill would; returns the undo."""
    import minefield.stages.train as tr

    real = tr.save_tensors

    def killed(path, tensors, meta):
        real(path, tensors, meta)
        if meta.get("step") == step and (not state_only or "state" in str(path)):
            raise KeyboardInterrupt

    monkeypatch.setattr(tr, "save_tensors", killed)
    return lambda: monkeypatch.setattr(tr, "save_tensors", real)


def frozen_bias_problem(conv: bool, n: int):
    """``(model, x, y)`` in float64: a Tanh MLP or conv net whose first bias is frozen at
    2.0 (``requires_grad=False``), for a stack that leaves it out (hunt 36)."""
    torch.manual_seed(0)
    nn = torch.nn
    model = (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                           nn.Linear(48, 3)) if conv else
             nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))).double()
    with torch.no_grad():
        model[0].bias.fill_(2.0)
    model[0].bias.requires_grad_(False)
    x = torch.randn(n, *((2, 4, 4) if conv else (4,)), dtype=torch.float64)
    return model, x, torch.randint(0, 3, (n,))


def batch_stats_problem(width: int, act, n: int):
    """``(model, x, y)`` in float64, eval mode: 3 inputs -> Linear -> BatchNorm1d without
    running statistics (batch statistics even in eval; a batch of one refused) -> ``act``
    -> 3 logits (hunt 36)."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width, track_running_stats=False),
                          act, nn.Linear(width, 3)).double().eval()
    return model, torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 3, (n,))
