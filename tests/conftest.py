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
