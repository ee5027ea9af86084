"""Figs 5 and 6, check 6: the poison-factor sweep on the swiss roll."""

from __future__ import annotations

import numpy as np

from ..basin import VolumeConfig
from ..commands import sweep_command
from ..config import DataConfig, ExperimentConfig, TrainConfig
from ..directions import DirectionSpec
from ..stages import load_run_model, sweep_run
from ..sweep import SweepConfig
from .common import Check, Context, Section, pct

__all__ = ["exp_sweep"]


def exp_sweep(ctx: Context) -> Section:
    from ..plotting.sweep import sweep_figures

    s = ctx.scale
    base = ExperimentConfig(
        name=ctx.name("sweep"), data=DataConfig("swissroll", n_poison=s.swiss_n_poison),
        train=TrainConfig(lr=0.005, milestones=s.sweep_milestones, clip_norm=8.0,
                          poison_batch_size=200, steps=s.sweep_steps,
                          log_every=max(1, s.sweep_steps // 10),
                          checkpoint_every=max(1, s.sweep_steps // 4)), device=ctx.device)
    sc = SweepConfig(betas=s.sweep_betas, seeds=s.sweep_seeds,
                     volume=VolumeConfig(cutoff=1.0, n_directions=s.sweep_directions,
                                         directions=DirectionSpec(seed=0)))
    sec = Section("sweep", "Figures 5 and 6: poison factor vs accuracy, radius and volume",
                  [sweep_command(base, sc)], runs=[base.name])
    ctx.log(f"  training {len(s.sweep_betas) * len(s.sweep_seeds)} models as one stack, "
            "then their basins")
    res = sweep_run(base, sc, ctx.root, force=ctx.force, progress=ctx.progress)
    rho_t, rho_r = res.spearman["test_acc"], res.spearman["mean_radius"]
    for b in s.sweep_betas:
        rows = [r for r in res.rows if r["beta"] == b]
        sec.numbers.append((f"beta {b:g}: train / test / mean radius / log10 V",
                            f"{pct(np.mean([r['train_acc'] for r in rows]))} / "
                            f"{pct(np.mean([r['test_acc'] for r in rows]))} / "
                            f"{np.mean([r['mean_radius'] for r in rows]):.4f} / "
                            f"{np.mean([r['log10_volume'] for r in rows]):.0f}", "-"))
    # PAPER.md's levels {0, .008, .08, .8} are the authors' distrfrac: with 200 fresh
    # points appended per epoch (share doubled twice by the schedule) they are poison
    # factors of about 0, .005-.03, .07-.24 and .44-.5, which this grid spans
    levels = ", ".join(f"{b:g}" for b in s.sweep_betas)
    sec.checks.append(Check("6", f"test accuracy and mean radius both fall as poisoning rises "
                            f"(Spearman rho <= -0.7 each) over poison factors {levels} x "
                            f"{len(s.sweep_seeds)} seed(s), spanning PAPER.md's distrfrac "
                            ".008 / .08 / .8 (factors ~.005-.03 / .07-.24 / .44-.5)",
                            rho_t <= -0.7 and rho_r <= -0.7,
                            f"rho(test acc) {rho_t:.2f}, rho(mean radius) {rho_r:.2f}"))
    model, params, buffers, data, _ = load_run_model(res.run)
    sec.figures += sweep_figures(res, model, params, data, buffers, ctx.figures / res.run.name)
    sec.data = {"rows": res.rows, "spearman": res.spearman}
    return sec
