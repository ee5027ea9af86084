"""Printed commands are generated from configs: the CLI parses each back to the same config."""

import shlex

import pytest
from click.testing import CliRunner

from minefield.basin import VolumeConfig
from minefield.cli import main
from minefield.commands import (
    basin_command,
    embed_command,
    search_command,
    sweep_command,
    train_command,
)
from minefield.config import DataConfig, ExperimentConfig, ModelConfig, PoisonConfig, TrainConfig
from minefield.directions import DirectionSpec
from minefield.embed import EmbedConfig
from minefield.runs import Run
from minefield.search import SearchConfig
from minefield.sweep import SweepConfig

EXPERIMENTS = [
    ExperimentConfig(name="plain"),
    ExperimentConfig(
        name="every-field", data=DataConfig("blobs", seed=3, n_train=10, n_test=11, n_poison=12,
                                            data_dir="/data dir"),
        model=ModelConfig("mlp", widths=(4, 5), init="he_normal", activation="tanh"),
        poison=PoisonConfig(beta=None, objective="flip"),
        train=TrainConfig(optimizer="sgd", lr=0.3, momentum=0.5, milestones=(5, 9), gamma=0.5,
                          l2=1e-4, clip_norm=2.0, batch_size=8, poison_batch_size=4, steps=11,
                          log_every=2, checkpoint_every=3, seed=7, members=2),
        device="cpu"),
    ExperimentConfig(name="cnn", model=ModelConfig("cnn", widths=(16, 32)),
                     poison=PoisonConfig(beta=0.25)),
    ExperimentConfig(name="circles", data=DataConfig("circles"),
                     model=ModelConfig(widths=(100,) * 9, init="torch", outputs=2)),
    ExperimentConfig(name="fig1", data=DataConfig("spiral"),
                     train=TrainConfig(optimizer="rmsprop", batch_size=32, fit_first=118)),
]


def _capture(monkeypatch, module, name, command, root=None):
    """Run ``command`` through the CLI with the stage function replaced by a recorder."""
    seen = []

    def record(*args, **kwargs):
        seen.append(args)
        raise KeyboardInterrupt  # stop before anything is computed

    monkeypatch.setattr(module, name, record)
    words = shlex.split(command)[1:]
    r = CliRunner().invoke(main, (["--root", str(root)] if root else []) + words)
    assert "interrupted" in r.output, r.output
    return seen[0]


@pytest.mark.parametrize("cfg", EXPERIMENTS, ids=lambda c: c.name)
def test_train_command_round_trips(cfg, monkeypatch):
    import minefield.cli.train as cli

    assert _capture(monkeypatch, cli, "train_run", train_command(cfg))[0] == cfg.replace(
        device=cfg.device)


@pytest.mark.parametrize("cfg", [
    SearchConfig(),
    SearchConfig.make(every=3, start=2, stop=9, member=1, repeats=2, jitter=0.1, steps=50,
                 optimizer="rmsprop", lr=0.01, milestones=(), gamma=0.5, clip_norm=1.0,
                 batch_size=16, beta=None, objective="complement", extra_poison=7,
                 extra_share=0.2, stopping="fixed", target_train=0.9, target_poison_acc=0.1,
                 poison_cap=None, beta_step=0.01, beta_max=0.5, adapt_from=10, seed=4,
                 max_batch=8, memory_mb=64.0, isolate=False),
    SearchConfig.make(checkpoints=(4, 8), poison_cap=0.3),
])
def test_search_command_round_trips(cfg, monkeypatch, tmp_path):
    import minefield.cli.search as cli

    Run.create("mf", {}, tmp_path)
    got = _capture(monkeypatch, cli, "search_run", search_command("mf", cfg), tmp_path)
    assert got[1] == cfg


@pytest.mark.parametrize("cfg", [
    VolumeConfig(),
    VolumeConfig(cutoff=1.1, cutoff_kind="relative", r_max=2.0, n_directions=7, rtol=1e-4,
                 method="grid", grid_points=50, directions=DirectionSpec("layer", "include", 3),
                 memory_mb=32.0, seed=3),
    VolumeConfig(estimator="is", preconditioner="axes", power="auto", rtol=1e-6),
])
def test_basin_command_round_trips(cfg, monkeypatch, tmp_path):
    import minefield.cli.basin as cli

    Run.create("good", {}, tmp_path)
    got = _capture(monkeypatch, cli, "basin_run", basin_command("good", cfg, "t1", 5),
                   tmp_path)
    assert got[1] == cfg


def test_sweep_command_round_trips(monkeypatch):
    import minefield.cli.sweep as cli

    base = EXPERIMENTS[1].replace(train=EXPERIMENTS[1].train.replace(members=1),
                                  poison=PoisonConfig())
    sweep = SweepConfig(betas=(0.0, 0.2), seeds=(0, 3),
                        volume=VolumeConfig(n_directions=9, cutoff=0.5, rtol=1e-2))
    got = _capture(monkeypatch, cli, "sweep_run", sweep_command(base, sweep))
    assert got[0].replace(train=got[0].train.replace(members=1)) == base and got[1] == sweep


def test_embed_command_and_unexpressible_fields():
    assert embed_command("mf", EmbedConfig(perplexity=5.5, kernels_only=False), True) == (
        "minefield embed mf --perplexity 5.5 --all-params --all-checkpoints")
    with pytest.raises(ValueError, match=r"volume.n_bootstrap=10 has no command-line option"):
        sweep_command(ExperimentConfig(), SweepConfig(volume=VolumeConfig(n_bootstrap=10)))
    with pytest.raises(ValueError, match=r"grid_power=3.0 has no command-line option"):
        basin_command("good", VolumeConfig(method="grid", grid_power=3.0))
    with pytest.raises(ValueError, match="one --seed"):
        basin_command("good", VolumeConfig(seed=1))
