"""``minefield reproduce``: the paper's experiments end to end, with a report.

Each experiment trains into its own run directory (``runs/repro-<scale>-*``),
skips what is already done (training resumes, searches keep finished minima,
basin and sweep results are reused when their settings match) and returns a
:class:`Section`: the commands that redo it by hand, the numbers measured beside
the paper's (``PAPER.md``), the reproduction checks and the figures.
:func:`minefield.report.write_report` turns the sections into
``figures/REPORT.md`` and ``figures/report.json``.

Scales: ``tiny`` (the end-to-end test: seconds), ``small`` (under 15 minutes on
2 CPU cores, meets the CPU checks) and ``paper`` (the paper's sizes; for a GPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .basin import BasinResult, VolumeConfig, basin_radii, find_radii, rollouts
from .config import DataConfig, ExperimentConfig, ModelConfig, Optimizer, PoisonConfig, TrainConfig
from .data import load_dataset
from .directions import DirectionSpec
from .embed import EmbedConfig, embed_run
from .lock import locking
from .runs import DEFAULT_ROOT
from .search import SearchConfig, search_run
from .sweep import SweepConfig, poison_sweep
from .train import TrainResult, train_run

__all__ = ["Scale", "SCALES", "Section", "Check", "reproduce", "EXPERIMENTS"]


@dataclass(frozen=True)
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
    image_steps: int


SCALES: dict[str, Scale] = {
    "tiny": Scale("tiny", 300, 600, (400,), 200, 20, (0.0, 0.3, 0.6), (0,), 300, (), 10,
                  40, 20, 300, 200, 1, 100, 20),
    "small": Scale("small", 5000, 40000, (15000, 30000), 4000, 1000,
                   (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.6), (0, 1), 20000,
                   (10000, 17000), 200,
                   2000, 100, 24000, 10000, 4, 3000, 2000),
    "paper": Scale("paper", 100000, 300000, (100000, 200000), 4000, 5000,
                   (0.0, 0.0001, 0.001, 0.005, 0.01, 0.03, 0.1, 0.2, 0.35, 0.5, 0.7, 0.8),
                   tuple(range(10)), 300000, (100000, 200000), 1000,
                   2000, 10, 24000, 10000, 10, 20000, 50000),
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
    """One experiment's part of the report."""

    key: str
    title: str
    commands: list[str]
    numbers: list[tuple[str, str, str]] = field(default_factory=list)  # name, ours, paper
    checks: list[Check] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Context:
    scale: Scale
    root: Path
    figures: Path
    device: str
    force: bool
    progress: bool
    data_dir: str | None
    log: Callable[[str], None]

    def name(self, what: str) -> str:
        return f"repro-{self.scale.name}-{what}"

    def train(self, cfg: ExperimentConfig, **kw) -> TrainResult:
        return train_run(cfg.replace(device=self.device), self.root, force=self.force,
                         progress=self.progress, **kw)


def _milestones(ms: tuple[int, ...]) -> str:
    return f" --milestones {','.join(map(str, ms))}" if ms else ""


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _basin(ctx: Context, res: TrainResult, vcfg: VolumeConfig, tag: str) -> BasinResult:
    """Basin of member 0 of a trained run, cached in ``<run>/basin/<tag>.json``."""
    rel = f"basin/{tag}.json"
    run = res.run
    if run.exists(rel) and not ctx.force:
        old = run.read_json(rel)
        if old.get("config") == vcfg.to_dict() | {"bn": "eval"}:
            return BasinResult.from_dict(old)
    one = {k: v[:1] for k, v in res.params.items()}
    b = {k: v[:1] for k, v in res.buffers.items()} if res.buffers else None
    out = basin_radii(res.model, one, res.data, vcfg, b)
    run.write_json(rel, out.to_dict())
    return out


# --- Fig. 3 and checks 1-5: good vs poisoned swiss roll ------------------------------------


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
    from .plotting.swiss import swiss_figure

    s = ctx.scale
    clean_cfg, bad_cfg = swiss_configs(s, ctx)
    sec = Section("swissroll", "Figure 3: good vs poisoned swiss-roll minima", [
        f"minefield train --name {clean_cfg.name} --dataset swissroll --n-poison "
        f"{s.swiss_n_poison} --lr 0.012548 --milestones 3062 --clip 8 --steps "
        f"{s.swiss_clean_steps}",
        f"minefield train --name {bad_cfg.name} --dataset swissroll --n-poison "
        f"{s.swiss_n_poison} --beta 0.5 --lr 0.005{_milestones(s.swiss_poison_milestones)} "
        "--clip 8 --poison-batch-size 200 "
        f"--steps {s.swiss_poison_steps}",
        f"minefield basin <run> --directions {s.directions} --cutoff 1.0 --kind filter",
    ], runs=[clean_cfg.name, bad_cfg.name])
    xa, ya = _authors_swissroll()
    d = load_dataset(DataConfig("swissroll"))
    same = bool(np.array_equal(d.x_train.numpy(), xa.astype(np.float32))
                and np.array_equal(d.y_train.numpy(), ya.astype(np.int64)))
    sec.checks.append(Check("1", "swiss-roll data bit-identical to the authors' generator "
                            "(legacy np.random.seed(1237))", same, "identical" if same else
                            "differs"))
    ctx.log("  training the good swiss-roll model")
    good = ctx.train(clean_cfg)
    ctx.log("  training the poisoned swiss-roll model")
    bad = ctx.train(bad_cfg)
    vcfg = VolumeConfig(cutoff=1.0, n_directions=s.directions, rtol=1e-3,
                        directions=DirectionSpec(seed=0))
    ctx.log(f"  basin radii along {s.directions} directions (x2 signs) for both")
    bg, bb = _basin(ctx, good, vcfg, "repro"), _basin(ctx, bad, vcfg, "repro")
    gm, bm = good.metrics, bad.metrics
    ratio = bg.mean_radius / bb.mean_radius if bb.mean_radius > 0 else math.inf
    gap = bg.log10_volume - bb.log10_volume
    sec.numbers += [
        ("good model: train / test accuracy", f"{_pct(gm['train_acc'][0])} / "
         f"{_pct(gm['test_acc'][0])}", "100% / 100% [D]"),
        ("poisoned model: train / test accuracy", f"{_pct(bm['train_acc'][0])} / "
         f"{_pct(bm['test_acc'][0])}", "100% / 7% [D]"),
        ("mean radius good / bad (cutoff xent 1.0)", f"{bg.mean_radius:.4f} / "
         f"{bb.mean_radius:.4f} ({ratio:.0f}x)", "0.143 / 0.0056 (25x) [R]"),
        (f"log10 V good / bad (n = {bg.n})", f"{bg.log10_volume:.0f} / {bb.log10_volume:.0f}"
         f" (gap {gap:.0f})", "-5617 / -11168 (gap 5550) [R]"),
        ("log10 V 95% bootstrap CI good; bad", f"[{bg.ci_log10_volume[0]:.0f}, "
         f"{bg.ci_log10_volume[1]:.0f}]; [{bb.ci_log10_volume[0]:.0f}, "
         f"{bb.ci_log10_volume[1]:.0f}]", "-"),
        ("n mean(log10 r) good / bad", f"{bg.n_mean_log10_r:.0f} / {bb.n_mean_log10_r:.0f}",
         "gap 4800 [R]"),
    ]
    sec.checks += [
        Check("2", "clean swiss MLP: 100% train and >= 95% test",
              gm["train_acc"][0] == 1.0 and gm["test_acc"][0] >= 0.95,
              f"{_pct(gm['train_acc'][0])} / {_pct(gm['test_acc'][0])}"),
        Check("3", "poisoned swiss MLP: >= 90% train and <= 25% test",
              bm["train_acc"][0] >= 0.90 and bm["test_acc"][0] <= 0.25,
              f"{_pct(bm['train_acc'][0])} / {_pct(bm['test_acc'][0])}"),
        Check("4", f"mean radius good >= 10x bad ({s.directions} filter-normalised "
              "directions, +/-, cutoff 1.0)", ratio >= 10, f"{ratio:.1f}x"),
        Check("5", "log10 V_good - log10 V_bad >= 1000", gap >= 1000, f"{gap:.0f}"),
    ]
    est_rows, est_data = _estimator_rows(ctx, {"good": good, "bad": bad}, vcfg,
                                         {"good": bg, "bad": bb})
    sec.numbers += est_rows
    sec.commands.append("minefield basin <run> --estimator is --preconditioner hessian "
                        f"--directions {s.directions} --cutoff 1.0 --kind filter")
    roll = [rollouts(r.model, {k: v[:1] for k, v in r.params.items()}, r.data, 20,
                     torch.linspace(-0.5, 0.5, 101, dtype=torch.float64), vcfg.directions,
                     cutoff=1.0) for r in (good, bad)]
    sec.figures += swiss_figure(good, bad, roll, (bg, bb), ctx.figures / "fig3_swissroll")
    sec.data = {"good": {**{k: v[0] for k, v in gm.items()}, "basin": _brief(bg)},
                "bad": {**{k: v[0] for k, v in bm.items()}, "basin": _brief(bb)},
                "radius_ratio": ratio, "log10_volume_gap": gap, "estimators": est_data}
    return sec


# Estimators beside the paper's naive one (minefield.volume): direction kind, preconditioner.
ESTIMATORS = (("is", "hessian"), ("is", "hutchinson"), ("gaussian", "none"))


def _estimator_rows(ctx: Context, runs: dict[str, TrainResult], vcfg: VolumeConfig,
                    naive: dict[str, BasinResult]) -> tuple[list[tuple[str, str, str]], dict]:
    """log10 V of every model by every estimator, side by side (filter units, same cutoff)."""
    rows, data = [], {}
    n = next(iter(naive.values())).n
    for est, pre in ESTIMATORS:
        if pre == "hessian" and n > 6000:
            continue
        cfg = vcfg.replace(estimator=est, preconditioner=pre)
        ctx.log(f"  {est} ({pre}) volume estimates")
        got = {k: _basin(ctx, r, cfg, f"repro-{est}-{pre}") for k, r in runs.items()}
        data[f"{est}-{pre}"] = {k: _brief(b) for k, b in got.items()}
        label = "mass under N(theta, sigma^2 I)" if est == "gaussian" else "log10 V"
        rows.append((f"{est} ({pre}): {label}, [95% CI], ESS; " + " / ".join(got),
                     " / ".join(f"{b.log10_volume:.0f} [{b.ci_log10_volume[0]:.0f}, "
                                f"{b.ci_log10_volume[1]:.0f}], {b.diagnostics['ess']:.1f}"
                                for b in got.values()), "-"))
    rows.insert(0, ("naive: log10 V, [95% CI], ESS; " + " / ".join(naive),
                    " / ".join(f"{b.log10_volume:.0f} [{b.ci_log10_volume[0]:.0f}, "
                               f"{b.ci_log10_volume[1]:.0f}], {b.diagnostics.get('ess', 0):.1f}"
                               for b in naive.values()), "-"))
    return rows, data


def _brief(b: BasinResult) -> dict[str, Any]:
    return {"mean_radius": b.mean_radius, "log10_volume": b.log10_volume,
            "n_mean_log10_r": b.n_mean_log10_r, "n": b.n, "centre_loss": b.centre_loss,
            "ci_log10_volume": list(b.ci_log10_volume), "estimator": b.estimator,
            "ess": b.diagnostics.get("ess"), "warnings": b.diagnostics.get("warnings", [])}


# --- Figs 5 and 6, check 6: the poison-factor sweep ----------------------------------------


def exp_sweep(ctx: Context) -> Section:
    from .cli.sweep import sweep_figures

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
    betas = ",".join(f"{b:g}" for b in s.sweep_betas)
    sec = Section("sweep", "Figures 5 and 6: poison factor vs accuracy, radius and volume", [
        f"minefield sweep --name {base.name} --dataset swissroll --n-poison {s.swiss_n_poison} "
        f"--lr 0.005{_milestones(s.sweep_milestones)} --clip 8 "
        f"--poison-batch-size 200 --steps {s.sweep_steps} --betas {betas} --seeds "
        f"{','.join(map(str, s.sweep_seeds))} --directions {s.sweep_directions}"],
        runs=[base.name])
    ctx.log(f"  training {len(s.sweep_betas) * len(s.sweep_seeds)} models as one stack, "
            "then their basins")
    res = poison_sweep(base, sc, ctx.root, force=ctx.force, progress=ctx.progress)
    rho_t, rho_r = res.spearman["test_acc"], res.spearman["mean_radius"]
    for b in s.sweep_betas:
        rows = [r for r in res.rows if r["beta"] == b]
        sec.numbers.append((f"beta {b:g}: train / test / mean radius / log10 V",
                            f"{_pct(np.mean([r['train_acc'] for r in rows]))} / "
                            f"{_pct(np.mean([r['test_acc'] for r in rows]))} / "
                            f"{np.mean([r['mean_radius'] for r in rows]):.4f} / "
                            f"{np.mean([r['log10_volume'] for r in rows]):.0f}", "-"))
    sec.checks.append(Check("6", "test accuracy and mean radius both fall as poisoning rises "
                            "(Spearman rho <= -0.7 each)", rho_t <= -0.7 and rho_r <= -0.7,
                            f"rho(test acc) {rho_t:.2f}, rho(mean radius) {rho_r:.2f}"))
    sec.figures += sweep_figures(res.run, ctx.figures)
    sec.data = {"rows": res.rows, "spearman": res.spearman}
    return sec


# --- Fig. 1, checks 7-8: the minefield ------------------------------------------------------


def exp_minefield(ctx: Context) -> Section:
    from .plotting import save_figure
    from .plotting.minefield import plot_minefield

    s = ctx.scale
    steps = 4 * s.mf_epochs  # 132 points: 118 fitted (validation_split 0.1) -> 4 batches of 32
    cfg = ExperimentConfig(
        name=ctx.name("minefield"), data=DataConfig("spiral"),
        model=ModelConfig(widths=(25, 25, 25, 25), init="glorot_normal"),
        train=TrainConfig(optimizer=Optimizer.RMSPROP, lr=0.01, l2=1e-3, batch_size=32,
                          steps=steps, log_every=4 * 10, checkpoint_every=4))
    scfg = SearchConfig(every=s.mf_every, steps=s.mf_search_steps)
    sec = Section("minefield", "Figure 1: bad minima along the SGD trajectory (t-SNE)", [
        f"minefield train --name {cfg.name} --dataset spiral --widths 25,25,25,25 --init "
        f"glorot_normal --optimizer rmsprop --lr 0.01 --l2 0.001 --batch-size 32 --steps "
        f"{steps} --checkpoint-every 4 --log-every 40",
        f"minefield search {cfg.name} --every {s.mf_every} --steps {s.mf_search_steps}",
        f"minefield embed {cfg.name} --perplexity 30",
        f"minefield plot minefield {cfg.name}"], runs=[cfg.name])
    ctx.log(f"  good run: {s.mf_epochs} epochs, checkpoint every epoch")
    good = ctx.train(cfg)
    ctx.log(f"  searching bad minima from every {s.mf_every}th checkpoint (batched)")
    summ = search_run(good.run, scfg, root=ctx.root, device=ctx.device, force=ctx.force,
                      progress=ctx.progress)
    n = summ.stats["n"]
    perp = min(30.0, max(2.0, (n + 1) / 3.5))
    emb = embed_run(good.run, EmbedConfig(perplexity=perp), root=ctx.root, device=ctx.device)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    plot_minefield(emb, ax=ax)
    sec.figures += save_figure(fig, ctx.figures / "fig1_minefield")
    st, gm = summ.stats, good.metrics
    betas = [r["beta"] for r in summ.rows]
    raised = sum(b > scfg.beta + 1e-9 for b in betas)
    sec.numbers += [
        ("good model (final iterate): train / test", f"{_pct(gm['train_acc'][0])} / "
         f"{_pct(gm['test_acc'][0])}", "100% / 98.5% [P]"),
        ("bad minima found", f"{n} (every {s.mf_every}th of {s.mf_epochs} epochs)",
         "200 (every 10th of 2000) [P]"),
        ("bad minima: min / median train accuracy", f"{_pct(st['train_acc_min'])} / "
         f"{_pct(st['train_acc_median'])}", "near-perfect [P]; 72.7-99.2% [D]"),
        ("bad minima: max / median test accuracy", f"{_pct(st['test_acc_max'])} / "
         f"{_pct(st['test_acc_median'])}", "< 53% [P]; 22-41% [D]"),
        ("bad minima: max true-label accuracy on the poison set", _pct(st["poison_acc_max"]),
         "2-23% [R]"),
        ("bad minima: poison factor raised by the adaptive search",
         f"{raised} of {n} (start {scfg.beta:g}, max {max(betas):.3f})", "fixed [C]"),
        ("t-SNE perplexity", f"{perp:g}", "30 [P]"),
    ]
    sec.checks += [
        Check("7", "minefield good model >= 95% test", gm["test_acc"][0] >= 0.95,
              _pct(gm["test_acc"][0])),
        Check("8", "every bad minimum <= 56% test and <= 30% poison true-label accuracy; "
              "median train >= 75%",
              st["test_acc_max"] <= 0.56 and st["poison_acc_max"] <= 0.30
              and st["train_acc_median"] >= 0.75,
              f"max test {_pct(st['test_acc_max'])}, max poison {_pct(st['poison_acc_max'])}, "
              f"median train {_pct(st['train_acc_median'])}"),
        Check("8+", "median bad-minimum train accuracy >= 90% (beyond PAPER.md: near-perfect "
              "train, as the paper's caption says)", st["train_acc_median"] >= 0.90,
              f"median train {_pct(st['train_acc_median'])}"),
    ]
    sec.data = {"good": {k: v[0] for k, v in gm.items()}, "search": st,
                "search_seconds": summ.seconds}
    return sec


# --- check 9: the volume estimator against a closed form -------------------------------------


def exp_volume_oracle(ctx: Context) -> Section:
    """L = a/2 ||theta||^2 with unit directions: r = sqrt(2c/a), V = omega_n r^n exactly."""
    from .basin import log10_volume

    a, c, n, k = 3.0, 1.0, 3457, 500
    g = torch.Generator().manual_seed(0)
    d = torch.randn(k, n, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True)

    def loss_fn(ts: torch.Tensor) -> torch.Tensor:
        pts = ts.reshape(k, -1, 1) * d[:, None, :]  # (k, T, n): points theta + t d
        return (0.5 * a * pts.pow(2).sum(-1)).reshape(ts.shape)

    r, _ = find_radii(loss_fn, k, c, 1.0, 1e-6, "bisect", 100, "power", 5.0, 12, 0.0)
    r_true = math.sqrt(2 * c / a)
    ln_ball = n / 2 * math.log(math.pi) - math.lgamma(n / 2 + 1) + n * math.log(r_true)
    got = log10_volume(r, n)
    err = abs(got - ln_ball / math.log(10))
    sec = Section("oracle", "Check 9: the volume estimator on a quadratic bowl", [
        "pytest tests/test_basin.py"])
    sec.numbers.append(("max |r - sqrt(2c/a)|", f"{float((r - r_true).abs().max()):.2e}",
                        "0 (exact)"))
    sec.numbers.append((f"log10 V vs log10 of the {n}-ball", f"{got:.4f} vs "
                        f"{ln_ball / math.log(10):.4f}", "equal"))
    sec.checks.append(Check("9", "quadratic bowl: r = sqrt(2c/a), log V = log(omega_n r^n)",
                            err < 1e-2 and float((r - r_true).abs().max()) < 1e-5,
                            f"|error| in log10 V {err:.1e}"))
    return sec


# --- Fig. 8, check 10: concentric circles -------------------------------------------------


def exp_circles(ctx: Context) -> Section:
    from .plotting import plot_boundary, save_figure

    s = ctx.scale
    cfg = ExperimentConfig(
        name=ctx.name("circles"), data=DataConfig("circles"),
        model=ModelConfig(widths=(100,) * 9, init="torch"),
        train=TrainConfig(lr=1e-3, steps=s.circles_steps, members=s.circles_seeds,
                          log_every=max(1, s.circles_steps // 10),
                          checkpoint_every=s.circles_steps))
    sec = Section("circles", "Figure 8: concentric circles, whose ideal solution is sharp", [
        f"minefield train --name {cfg.name} --dataset circles --widths "
        f"{','.join(['100'] * 9)} --init torch --lr 0.001 --steps {s.circles_steps} "
        f"--members {s.circles_seeds}"], runs=[cfg.name])
    res = ctx.train(cfg)
    from .functional import stacked_forward
    from .loss import predict

    with torch.no_grad():
        pred = predict(stacked_forward(res.model, res.params, res.data.x_train))
    wrong = pred != res.data.y_train  # (M, 130)
    gap_wrong = wrong[:, 120:].sum(1).tolist()
    other_wrong = wrong[:, :120].sum(1).tolist()
    accs = res.metrics["train_acc"]
    sec.numbers += [(f"seed {i}: train acc / missed gap points / other errors",
                     f"{_pct(accs[i])} / {gap_wrong[i]} of 10 / {other_wrong[i]}",
                     "100% / 0 / 0 (seed 0) [R]") for i in range(len(accs))]
    sec.checks.append(Check("10", ">= 99% train accuracy for seed 0; errors (any seed) only "
                            "on the 10 gap points", accs[0] >= 0.99 and sum(other_wrong) == 0,
                            f"seed 0: {_pct(accs[0])}; non-gap errors over all seeds: "
                            f"{sum(other_wrong)}"))
    import matplotlib.pyplot as plt

    m = len(accs)
    fig, axs = plt.subplots(1, m, figsize=(3.4 * m, 3.4), squeeze=False)
    for i, ax in enumerate(axs[0]):
        one = {k: v[i:i + 1] for k, v in res.params.items()}
        plot_boundary(res.model, one, res.data, ax=ax, show_test=False, resolution=200,
                      title=f"seed {i}: train {_pct(accs[i])}, gap missed {gap_wrong[i]}")
    sec.figures += save_figure(fig, ctx.figures / "fig8_circles")
    sec.data = {"train_acc": accs, "gap_wrong": gap_wrong, "other_wrong": other_wrong}
    return sec


# --- real images: digits (and CIFAR-10 / SVHN from disk) -------------------------------------


def _image_pair(ctx: Context, dataset: str, model: str, steps: int, beta: float,
                data_dir: str | None) -> Section:
    data = DataConfig(dataset, data_dir=data_dir)
    common = dict(optimizer=Optimizer.ADAM, lr=1e-3, batch_size=128, steps=steps,
                  log_every=max(1, steps // 10), checkpoint_every=max(1, steps // 2))
    good_cfg = ExperimentConfig(name=ctx.name(f"{dataset}-good"), data=data,
                                model=ModelConfig(model, widths=()),
                                train=TrainConfig(**common))
    bad_cfg = good_cfg.replace(name=ctx.name(f"{dataset}-bad"), poison=PoisonConfig(beta=beta))
    extra = f" --data-dir {data_dir}" if data_dir else ""
    sec = Section(dataset, f"Real images: {dataset} with {model}, good vs poisoned", [
        f"minefield train --name {good_cfg.name} --dataset {dataset}{extra} --model {model} "
        f"--lr 0.001 --batch-size 128 --steps {steps}",
        f"minefield train --name {bad_cfg.name} --dataset {dataset}{extra} --model {model} "
        f"--lr 0.001 --batch-size 128 --steps {steps} --beta {beta}",
        f"minefield basin <run> --directions {ctx.scale.directions // 10} --cutoff 0.1 "
        "--relative"], runs=[good_cfg.name, bad_cfg.name])
    good, bad = ctx.train(good_cfg), ctx.train(bad_cfg)
    vcfg = VolumeConfig(cutoff=1.0, n_directions=max(10, ctx.scale.directions // 10),
                        directions=DirectionSpec(seed=0))
    bg, bb = _basin(ctx, good, vcfg, "repro"), _basin(ctx, bad, vcfg, "repro")
    for label, r, b in (("good", good, bg), ("poisoned", bad, bb)):
        m = r.metrics
        sec.numbers.append((f"{label}: train / test acc, mean radius, log10 V (n = {b.n})",
                            f"{_pct(m['train_acc'][0])} / {_pct(m['test_acc'][0])}, "
                            f"{b.mean_radius:.4f}, {b.log10_volume:.0f}",
                            "SVHN: ~97% test good, 100% / 29% poisoned [C]"))
    est_rows, est_data = _estimator_rows(ctx, {"good": good, "poisoned": bad}, vcfg,
                                         {"good": bg, "poisoned": bb})
    sec.numbers += est_rows
    sec.data = {"good": {**{k: v[0] for k, v in good.metrics.items()}, "basin": _brief(bg)},
                "bad": {**{k: v[0] for k, v in bad.metrics.items()}, "basin": _brief(bb)},
                "estimators": est_data}
    return sec


def exp_digits(ctx: Context) -> Section:
    return _image_pair(ctx, "digits", "cnn", ctx.scale.digits_steps, 0.5, None)


def exp_images(ctx: Context) -> Section | None:
    if not ctx.data_dir:
        return None
    root = Path(ctx.data_dir)
    for name, sub in (("svhn", "train_32x32.mat"), ("cifar10", "cifar-10-batches-py")):
        if (root / sub).exists() or (name == "cifar10" and (root / "data_batch_1").exists()):
            return _image_pair(ctx, name, "resnet20", ctx.scale.image_steps, 0.35, str(root))
    raise FileNotFoundError(f"--data-dir {root} holds neither SVHN (train_32x32.mat) nor "
                            "CIFAR-10 (cifar-10-batches-py)")


EXPERIMENTS: dict[str, Callable[[Context], Section | None]] = {
    "swissroll": exp_swissroll,
    "sweep": exp_sweep,
    "minefield": exp_minefield,
    "oracle": exp_volume_oracle,
    "circles": exp_circles,
    "digits": exp_digits,
    "images": exp_images,
}


@locking
def reproduce(scale: str = "small", root: Path | str = DEFAULT_ROOT,
              figures: Path | str = Path("figures"), device: str = "auto", force: bool = False,
              data_dir: str | None = None, only: tuple[str, ...] | None = None,
              progress: bool = True, log: Callable[[str], None] = print) -> list[Section]:
    """Run the paper's experiments at ``scale``; write figures and ``figures/REPORT.md``.

    Returns the report's sections. Re-running resumes; ``force`` redoes everything.
    """
    from .report import write_report

    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose from {', '.join(SCALES)}")
    keys = list(only or EXPERIMENTS)
    unknown = [k for k in keys if k not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; choose from {list(EXPERIMENTS)}")
    ctx = Context(SCALES[scale], Path(root), Path(figures), device, force, progress,
                  data_dir, log)
    ctx.figures.mkdir(parents=True, exist_ok=True)
    sections: list[Section] = []
    t_all = time.perf_counter()
    for i, key in enumerate(keys, 1):
        log(f"[{i}/{len(keys)}] {key}")
        t0 = time.perf_counter()
        sec = EXPERIMENTS[key](ctx)
        if sec is None:
            log("  skipped (no --data-dir)")
            continue
        sec.seconds = time.perf_counter() - t0
        sections.append(sec)
        log(f"  done in {sec.seconds:.0f} s: " + "; ".join(
            f"check {c.id} {'ok' if c.passed else 'FAILED'}" for c in sec.checks))
    write_report(sections, ctx, time.perf_counter() - t_all)
    return sections

