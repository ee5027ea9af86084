"""Fig. 3 and checks 1-5: a good and a poisoned swiss-roll minimum and their basins."""

from __future__ import annotations

import math

import numpy as np

from ..basin import VolumeConfig
from ..commands import basin_command, train_command
from ..config import DataConfig, ExperimentConfig, PoisonConfig, TrainConfig
from ..data import load_dataset
from ..directions import DirectionSpec
from ..stacked import member
from ..stages import load_basin
from .common import Check, Context, Scale, Section, brief, estimator_rows, pct

__all__ = ["swiss_configs", "exp_swissroll", "radius_ratio"]


def radius_ratio(good: float, bad: float) -> float:
    """Mean radius good / bad: inf when only the bad basin is empty, NaN when both are (a
    ratio of two empty basins is no evidence that the good one is wider: check 4 fails).

    >>> radius_ratio(0.2, 0.01), radius_ratio(0.2, 0.0)
    (20.0, inf)
    >>> import math; math.isnan(radius_ratio(0.0, 0.0))
    True
    """
    if bad > 0:
        return good / bad
    return math.inf if good > 0 else math.nan


def _authors_swissroll() -> tuple[np.ndarray, np.ndarray]:
    # gen-viz/swissroll/main.py, call for call, with np.random.seed(1237).
    r = np.random.RandomState(1237)
    n = np.sqrt(r.rand(200, 1)) * 600 * (2 * np.pi) / 360
    d1x = -1.5 * np.cos(n) * n + r.randn(200, 1) * 0.5
    d1y = 1.5 * np.sin(n) * n + r.randn(200, 1) * 0.5
    x = np.vstack((np.hstack((d1x, d1y)), np.hstack((-d1x, -d1y))))
    y = np.hstack((np.zeros(200), np.ones(200)))
    order = r.permutation(400)
    return x[order][:200], y[order][:200]


def swiss_configs(s: Scale, ctx: Context) -> tuple[ExperimentConfig, ExperimentConfig]:
    """The good and the poisoned (beta 0.5) swiss-roll runs at scale ``s``."""
    data = DataConfig("swissroll", n_poison=s.swiss_n_poison)
    clean = ExperimentConfig(
        name=ctx.name("swiss-good"), data=data,
        train=TrainConfig(lr=0.012548, milestones=(3062,), clip_norm=8.0,
                          steps=s.swiss_clean_steps, log_every=max(1, s.swiss_clean_steps // 20),
                          checkpoint_every=max(1, s.swiss_clean_steps // 5)))
    bad = ExperimentConfig(
        name=ctx.name("swiss-bad"), data=data, poison=PoisonConfig(beta=0.5),
        train=TrainConfig(lr=0.005, milestones=s.swiss_poison_milestones, clip_norm=8.0,
                          poison_batch_size=200, steps=s.swiss_poison_steps,
                          log_every=max(1, s.swiss_poison_steps // 40),
                          checkpoint_every=max(1, s.swiss_poison_steps // 8)))
    return clean, bad


def exp_swissroll(ctx: Context) -> Section:
    from ..plotting.swiss import swiss_figure

    s = ctx.scale
    clean_cfg, bad_cfg = swiss_configs(s, ctx)
    sec = Section("swissroll", "Figure 3: good vs poisoned swiss-roll minima",
                  runs=[clean_cfg.name, bad_cfg.name])
    xa, ya = _authors_swissroll()
    d = load_dataset(DataConfig("swissroll"))
    same = bool(np.array_equal(d.x_train.numpy(), xa.astype(np.float32))
                and np.array_equal(d.y_train.numpy(), ya.astype(np.int64)))
    sec.checks.append(Check("1", "swiss-roll data bit-identical to the authors' generator "
                            "(legacy np.random.seed(1237))", same, "identical" if same else
                            "differs"))
    ctx.log("  training the good swiss-roll model")
    clean_cfg, good = ctx.train(clean_cfg)
    ctx.log("  training the poisoned swiss-roll model")
    bad_cfg, bad = ctx.train(bad_cfg)
    vcfg = VolumeConfig(cutoff=1.0, n_directions=s.directions, rtol=1e-3,
                        directions=DirectionSpec(seed=0))
    ctx.log(f"  basin radii along {s.directions} directions (x2 signs) for both")
    bg, bb = ctx.basin(good, vcfg), ctx.basin(bad, vcfg)
    sec.commands = [train_command(clean_cfg), train_command(bad_cfg),
                    basin_command(clean_cfg.name, vcfg, "repro"),
                    basin_command(bad_cfg.name, vcfg, "repro")]
    gm, bm = good.metrics, bad.metrics
    ratio = radius_ratio(bg.mean_radius, bb.mean_radius)
    gap = bg.log10_volume - bb.log10_volume
    sec.numbers += [
        ("good model: train / test accuracy", f"{pct(gm['train_acc'][0])} / "
         f"{pct(gm['test_acc'][0])}", "100% / 100% [D]"),
        ("poisoned model: train / test accuracy", f"{pct(bm['train_acc'][0])} / "
         f"{pct(bm['test_acc'][0])}", "100% / 7% [D]"),
        ("mean radius good / bad (cutoff xent 1.0)", f"{bg.mean_radius:.4f} / "
         f"{bb.mean_radius:.4f} ({ratio:.1f}x)", "0.143 / 0.0056 (25x) [R]"),
        (f"log10 V good / bad (n = {bg.n})", f"{bg.log10_volume:.0f} / {bb.log10_volume:.0f}"
         f" (gap {gap:.0f})", "-5617 / -11168 (gap 5550) [R]"),
        ("log10 V 95% interval good; bad (its kind: normal, or the heavy-tail bound)",
         f"[{bg.ci_log10_volume[0]:.0f}, {bg.ci_log10_volume[1]:.0f}] "
         f"({bg.diagnostics.get('interval', '?')}); [{bb.ci_log10_volume[0]:.0f}, "
         f"{bb.ci_log10_volume[1]:.0f}] ({bb.diagnostics.get('interval', '?')})", "-"),
        ("n mean(log10 r) good / bad", f"{bg.n_mean_log10_r:.0f} / {bb.n_mean_log10_r:.0f}",
         "gap 4800 [R]"),
        ("radii that reached r_max good / bad", f"{bg.n_at_r_max} / {bb.n_at_r_max}", "-"),
    ]
    sec.checks += [
        Check("2", "clean swiss MLP: 100% train and >= 95% test",
              gm["train_acc"][0] == 1.0 and gm["test_acc"][0] >= 0.95,
              f"{pct(gm['train_acc'][0])} / {pct(gm['test_acc'][0])}"),
        Check("3", "poisoned swiss MLP: >= 90% train and <= 25% test",
              bm["train_acc"][0] >= 0.90 and bm["test_acc"][0] <= 0.25,
              f"{pct(bm['train_acc'][0])} / {pct(bm['test_acc'][0])}"),
        Check("4", f"mean radius good >= 10x bad ({s.directions} filter-normalised "
              "directions, +/-, cutoff 1.0)", ratio >= 10, f"{ratio:.1f}x"),
        Check("5", "log10 V_good - log10 V_bad >= 1000", gap >= 1000, f"{gap:.0f}"),
    ]
    est_rows, est_data, est_commands = estimator_rows(ctx, {"good": good, "bad": bad}, vcfg,
                                                  {"good": bg, "bad": bb})
    sec.numbers += est_rows
    sec.commands += est_commands
    roll = [load_basin(r.run, "repro").rollouts[0] for r in (good, bad)]
    sec.figures += swiss_figure(good, bad, roll, (bg, bb), ctx.figures / "fig3_swissroll")
    sec.data = {"good": {**member(gm, 0), "basin": brief(bg)},
                "bad": {**member(bm, 0), "basin": brief(bb)},
                "radius_ratio": ratio, "log10_volume_gap": gap, "estimators": est_data}
    return sec
