"""What every reproduction experiment shares: scales, report sections, the context."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..basin import BasinResult, VolumeConfig
from ..commands import basin_command
from ..config import ExperimentConfig
from ..cooling_blocks import cooling_cost
from ..stages import TrainResult, basin_run, train_run
from .projection import evaluation_rate

__all__ = ["Scale", "SCALES", "Check", "Section", "Context", "pct", "brief"]


@dataclass(frozen=True, kw_only=True)
class Scale:
    """Sizes of every experiment at one scale."""

    name: str
    swiss_clean_steps: int
    swiss_poison_steps: int
    swiss_poison_milestones: tuple[int, ...]
    swiss_n_poison: int
    directions: int  # basin directions per model (each counted +/-)
    sweep_betas: tuple[float, ...]
    sweep_seeds: tuple[int, ...]
    sweep_steps: int
    sweep_milestones: tuple[int, ...]
    sweep_directions: int
    mf_epochs: int  # good run epochs (4 minibatches of 32 each)
    mf_every: int  # search from every k-th epoch checkpoint
    mf_search_steps: int
    circles_steps: int
    circles_seeds: int
    digits_steps: int
    image_epochs: float  # SVHN / CIFAR-10 ResNet-20 (reproduce.paper_images)
    image_batch: int
    image_sweep: tuple[float, ...]  # fracdirty values of the image sweep
    image_directions: int
    image_widths: tuple[int, int, int] = (16, 32, 64)  # ResNet-20 stage widths (paper's)


SCALES: dict[str, Scale] = {
    "tiny": Scale(name="tiny", swiss_clean_steps=300, swiss_poison_steps=600,
                  swiss_poison_milestones=(400,), swiss_n_poison=200, directions=20,
                  sweep_betas=(0.0, 0.3, 0.6), sweep_seeds=(0,), sweep_steps=300,
                  sweep_milestones=(), sweep_directions=10, mf_epochs=40, mf_every=20,
                  mf_search_steps=300, circles_steps=200, circles_seeds=1, digits_steps=100,
                  image_epochs=2, image_batch=32, image_sweep=(0.0058, 0.35),
                  image_directions=2, image_widths=(4, 4, 8)),
    "small": Scale(name="small", swiss_clean_steps=5000, swiss_poison_steps=40000,
                   swiss_poison_milestones=(15000, 30000), swiss_n_poison=4000, directions=1000,
                   sweep_betas=(0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.6),
                   sweep_seeds=(0, 1), sweep_steps=20000, sweep_milestones=(10000, 17000),
                   sweep_directions=200, mf_epochs=2000, mf_every=100, mf_search_steps=24000,
                   circles_steps=10000, circles_seeds=4, digits_steps=3000, image_epochs=8,
                   image_batch=256, image_sweep=(0.0058, 0.013, 0.030, 0.068, 0.15, 0.35, 0.80),
                   image_directions=20),
    "paper": Scale(name="paper", swiss_clean_steps=100000, swiss_poison_steps=300000,
                   swiss_poison_milestones=(100000, 200000), swiss_n_poison=4000,
                   directions=5000,
                   sweep_betas=(0.0, 0.0001, 0.001, 0.005, 0.01, 0.03, 0.1, 0.2, 0.35, 0.5,
                                0.7, 0.8),
                   sweep_seeds=tuple(range(10)), sweep_steps=300000,
                   sweep_milestones=(100000, 200000), sweep_directions=1000, mf_epochs=2000,
                   mf_every=10, mf_search_steps=24000, circles_steps=10000, circles_seeds=10,
                   digits_steps=20000, image_epochs=256, image_batch=256,
                   image_sweep=(0.0058, 0.013, 0.030, 0.068, 0.15, 0.35, 0.80),
                   image_directions=100),
}


@dataclass
class Check:
    """One reproduction check of PAPER.md: what is required, what was measured."""

    id: str
    text: str
    passed: bool
    measured: str


@dataclass
class Section:
    """One experiment's part of the report; ``commands`` are generated from its configs."""

    key: str
    title: str
    commands: list[str] = field(default_factory=list)
    numbers: list[tuple[str, str, str]] = field(default_factory=list)  # name, ours, paper
    checks: list[Check] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Context:
    """Where and how the experiments run; every stage goes through :mod:`minefield.stages`."""

    scale: Scale
    root: Path
    figures: Path
    device: str
    force: bool
    progress: bool
    data_dir: str | None
    log: Callable[[str], None]
    seed: int = 0  # training seed of the good runs (0: the reference runs)
    search: dict[str, Any] = field(default_factory=dict)  # Fig. 1 search settings over the recipe's

    def name(self, what: str) -> str:
        return f"repro-{self.scale.name}-{what}" + (f"-seed{self.seed}" if self.seed else "")

    def train(self, cfg: ExperimentConfig) -> tuple[ExperimentConfig, TrainResult]:
        """Train ``cfg`` on this context's device; returns the config that ran, and its run."""
        cfg = cfg.replace(device=self.device)
        return cfg, train_run(cfg, self.root, force=self.force, progress=self.progress)

    def basin(self, res: TrainResult, cfg: VolumeConfig, tag: str = "repro",
              n_rollouts: int = 20) -> BasinResult:
        """Basin of member 0 of a trained run, in ``<run>/basin/<tag>.json``."""
        return basin_run(res.run, cfg, tag=tag, device=self.device, force=self.force,
                         n_rollouts=n_rollouts).members[0]


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def brief(b: BasinResult) -> dict[str, Any]:
    """The basin numbers a report keeps."""
    return {"mean_radius": b.mean_radius, "log10_volume": b.log10_volume,
            "n_mean_log10_r": b.n_mean_log10_r, "n": b.n, "centre_loss": b.centre_loss,
            "ci_log10_volume": list(b.ci_log10_volume), "n_at_r_max": b.n_at_r_max,
            "estimator": b.estimator, "ess": b.diagnostics.get("ess"),
            "warnings": b.diagnostics.get("warnings", [])}


# Estimators beside the paper's naive one (minefield.volume): estimator, preconditioner.
ESTIMATORS = (("is", "hessian"), ("is", "hutchinson"), ("gaussian", "none"))


def estimator_rows(ctx: Context, runs: dict[str, TrainResult], vcfg: VolumeConfig,
                   naive: dict[str, BasinResult]
                   ) -> tuple[list[tuple[str, str, str]], dict, list[str]]:
    """log10 V of every model by every estimator, side by side (same directions' units and
    cutoff as ``vcfg``); the dense Hessian only up to n = 6000. Returns report rows, their
    data and the commands that reproduce them (generated from the configs that ran)."""
    def row(label: str, got: dict[str, BasinResult]) -> tuple[str, str, str]:
        return (f"{label}, [95% CI], ESS; " + " / ".join(got),
                " / ".join(f"{b.log10_volume:.0f} [{b.ci_log10_volume[0]:.0f}, "
                           f"{b.ci_log10_volume[1]:.0f}], {b.diagnostics.get('ess', 0):.1f}"
                           for b in got.values()), "-")

    rows, data, commands = [row("naive: log10 V", naive)], {}, []
    n = next(iter(naive.values())).n
    for est, pre in ESTIMATORS:
        if pre == "hessian" and n > 6000:
            continue
        cfg = vcfg.replace(estimator=est, preconditioner=pre)
        ctx.log(f"  {est} ({pre}) volume estimates")
        tag = f"repro-{est}-{pre}"
        got = {k: ctx.basin(r, cfg, tag) for k, r in runs.items()}
        commands += [basin_command(r.run.name, cfg, tag) for r in runs.values()]
        data[f"{est}-{pre}"] = {k: brief(b) for k, b in got.items()}
        label = "mass under N(theta, sigma^2 I)" if est == "gaussian" else "log10 V"
        rows.append(row(f"{est} ({pre}): {label}", got))
    rows.append(mcmc_row(runs, vcfg, n, data))
    return rows, data, commands


def mcmc_row(runs: dict[str, TrainResult], vcfg: VolumeConfig, n: int, data: dict
             ) -> tuple[str, str, str]:
    """Why Gaussian cooling is not run here: its cost lower bound
    (:func:`~minefield.cooling_blocks.cooling_cost`) at the evaluation rate measured on
    each model (the bound's hours go into ``data["mcmc"]``)."""
    cost = cooling_cost(n, vcfg.n_chains, vcfg.n_replicates, vcfg.walk_length)
    rates = {}
    for k, r in runs.items():
        dev = next(iter(r.params.values())).device
        rates[k] = evaluation_rate(r.model, r.params, r.buffers, r.data.x_train.to(dev),
                                   r.data.y_train.to(dev))
    hours = {k: cost.hours(v) for k, v in rates.items()}
    data["mcmc"] = {"run": False, "phases_at_least": cost.phases,
                    "evaluations_at_least": cost.evaluations, "evaluations_per_s": rates,
                    "hours_at_least": hours}
    return (f"mcmc (Gaussian cooling, {vcfg.n_chains} chains x {vcfg.n_replicates} "
            f"replicates): not run; its cost at least, " + " / ".join(runs),
            f">= {cost.phases} phases x {_down(cost.evaluations)} evaluations: " + " / ".join(
                f">= {math.floor(hours[k]):,} h at {rates[k]:,.0f} evals/s" for k in runs), "-")


def _down(x: float) -> str:
    """A lower bound in three significant digits, rounded down: ``1.38e+09``."""
    e = math.floor(math.log10(x)) - 2 if x > 0 else 0
    return f"{math.floor(x / 10**e) * 10**e:.2e}"
