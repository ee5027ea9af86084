"""Figs 4, 5, 7 and check 11: SVHN (or CIFAR-10) ResNet-20, natural vs poisoned, the
poison sweep, with the paper's recipe (PAPER.md, "SVHN").

Recipe [C:svhn]: SGD with momentum 0.9, lr 0.1 x0.1 at 40%, 60% and 80% of training
(epochs 102.4, 153.6, 204.8 of 256), batch 256, no weight decay, no augmentation.
A poisoned batch holds ``int(256 f)`` poison images (``fracdirty`` f = .35: 89)
beside ``256 - int(256 f)`` clean ones; the authors average over the concatenated
batch, which is the poisoned loss with ``beta = n_p / 256`` (PAPER.md section 0). The
natural run is ``beta = 0`` with 256 clean images (the authors' ``-nodirty`` run adds
2 ``extra`` images with ordinary labels; left out here). An epoch is one pass over
the clean training set. Basin radii use the full training set with BatchNorm in eval
mode (``bn="eval"``, the running statistics), as ``svhn/surface.py`` does.

The sweep (``fracdirty`` in {.0058, .013, .030, .068, .15, .35, .80}) trains all
models as one stack, so they share the batch composition of the poisoned run (167
clean + 89 poison images) and differ by ``beta = f`` only: the same weight of the
poison term as the authors' batches, drawn from a fixed-size poison batch.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..basin import VolumeConfig
from ..commands import basin_command, sweep_command, train_command
from ..config import DataConfig, ExperimentConfig, ModelConfig, Optimizer, PoisonConfig, TrainConfig
from ..data import load_dataset
from ..directions import DirectionSpec
from ..stages import sweep_run
from ..sweep import SweepConfig
from .common import SCALES, Check, Context, Section, brief, pct
from .projection import image_projection

__all__ = ["exp_images", "paper_recipe", "PAPER_BATCH", "PAPER_FRACDIRTY", "SWEEP_FRACDIRTY"]

PAPER_BATCH = 256
PAPER_FRACDIRTY = 0.35
SWEEP_FRACDIRTY = (0.0058, 0.013, 0.030, 0.068, 0.15, 0.35, 0.80)
ROLLOUTS = 20  # directions whose loss curve (101 points) is stored per model


def paper_recipe(n_train: int, epochs: float, fracdirty: float = 0.0,
                 batch: int = PAPER_BATCH) -> tuple[TrainConfig, float]:
    """The SVHN training config for ``n_train`` clean images and its ``beta``.

    ``fracdirty = 0``: natural training. Example::

        >>> cfg, beta = paper_recipe(73257, 256, 0.35)
        >>> cfg.batch_size, cfg.poison_batch_size, round(beta, 3), cfg.steps
        (167, 89, 0.348, 112299)
    """
    n_p = int(batch * fracdirty)
    n_t = batch - n_p
    steps = max(1, math.ceil(epochs * n_train / n_t))
    cfg = TrainConfig(optimizer=Optimizer.SGD, lr=0.1, momentum=0.9,
                      milestones=tuple(sorted({max(1, round(steps * q)) for q in (0.4, 0.6, 0.8)})),
                      batch_size=n_t, poison_batch_size=n_p or None, steps=steps,
                      log_every=max(1, steps // 8), checkpoint_every=max(1, steps // 4))
    return cfg, n_p / batch


def image_dataset(root: Path) -> str:
    """``svhn`` or ``cifar10``: which of the two the folder holds in its standard format."""
    if (root / "train_32x32.mat").exists():
        return "svhn"
    if (root / "cifar-10-batches-py").exists() or (root / "data_batch_1").exists():
        return "cifar10"
    raise FileNotFoundError(f"--data-dir {root} holds neither SVHN (train_32x32.mat) nor "
                            "CIFAR-10 (cifar-10-batches-py)")


def exp_images(ctx: Context) -> Section | None:
    if not ctx.data_dir:
        return None
    root = Path(ctx.data_dir)
    name, s = image_dataset(root), ctx.scale
    data_cfg = DataConfig(name, data_dir=str(root))
    n_train = len(load_dataset(data_cfg).y_train)
    model = ModelConfig("resnet20", widths=s.image_widths, init="he_normal")
    good_train, _ = paper_recipe(n_train, s.image_epochs, 0.0, s.image_batch)
    bad_train, beta = paper_recipe(n_train, s.image_epochs, PAPER_FRACDIRTY, s.image_batch)
    good_cfg = ExperimentConfig(name=ctx.name(f"{name}-natural"), data=data_cfg, model=model,
                                train=good_train)
    bad_cfg = good_cfg.replace(name=ctx.name(f"{name}-poisoned"), train=bad_train,
                               poison=PoisonConfig(beta=beta))
    sec = Section("images", f"{name} ResNet-20, natural vs poisoned (fracdirty "
                  f"{PAPER_FRACDIRTY}), {s.image_epochs:g} epochs, batch {s.image_batch}",
                  runs=[good_cfg.name, bad_cfg.name])
    (good_cfg, good), (bad_cfg, bad) = ctx.train(good_cfg), ctx.train(bad_cfg)
    vcfg = VolumeConfig(cutoff=1.0, n_directions=s.image_directions,
                        directions=DirectionSpec(seed=0))
    n_ro = min(ROLLOUTS, s.image_directions)  # loss curves kept for ``plot basin``
    bg, bb = ctx.basin(good, vcfg, n_rollouts=n_ro), ctx.basin(bad, vcfg, n_rollouts=n_ro)
    sec.commands = [train_command(good_cfg), train_command(bad_cfg),
                    basin_command(good_cfg.name, vcfg, "repro", n_ro),
                    basin_command(bad_cfg.name, vcfg, "repro", n_ro)]
    for label, r, b in (("natural", good, bg), ("poisoned", bad, bb)):
        m = r.metrics
        sec.numbers.append((f"{label}: train / test acc, mean radius, log10 V (n = {b.n}), "
                            "BN eval, full train set",
                            f"{pct(m['train_acc'][0])} / {pct(m['test_acc'][0])}, "
                            f"{b.mean_radius:.4f}, {b.log10_volume:.0f}",
                            "natural ~97% test; poisoned 100% / 29% [C]"))
    gap = bg.log10_volume - bb.log10_volume
    sec.checks.append(Check("11", "SVHN: the poisoned model generalises worse and its basin "
                            "is smaller (log10 V gap > 0; the paper expects >> 1e4)",
                            bad.metrics["test_acc"][0] < good.metrics["test_acc"][0] and gap > 0,
                            f"test {pct(good.metrics['test_acc'][0])} vs "
                            f"{pct(bad.metrics['test_acc'][0])}, log10 V gap {gap:.0f}"))
    base = good_cfg.replace(name=ctx.name(f"{name}-sweep"), train=bad_train)
    sc = SweepConfig(betas=s.image_sweep, seeds=(0,), volume=vcfg)
    ctx.log(f"  {name} sweep: {len(s.image_sweep)} models as one stack, then their basins")
    sw = sweep_run(base.replace(device=ctx.device), sc, ctx.root, force=ctx.force,
                   progress=ctx.progress)
    sec.commands.append(sweep_command(base, sc))
    sec.runs.append(base.name)
    for row in sw.rows:
        sec.numbers.append((f"sweep beta {row['beta']:g}: train / test / mean radius / log10 V",
                            f"{pct(row['train_acc'])} / {pct(row['test_acc'])} / "
                            f"{row['mean_radius']:.4f} / {row['log10_volume']:.0f}",
                            "fracdirty .8: ~40% test [SC]"))
    # the paper scale's work, whatever scale ran: 256 epochs, batch 256, the full sweep
    p_good, _ = paper_recipe(n_train, 256, 0.0)
    p_bad, _ = paper_recipe(n_train, 256, PAPER_FRACDIRTY)
    proj = image_projection(ctx.device, n_train, p_good.steps, p_bad.steps,
                            len(SWEEP_FRACDIRTY), SCALES["paper"].image_directions)
    sec.numbers += [(f"paper scale: {k}", v, "projection") for k, v in proj.items()]
    sec.data = {"natural": {**{k: v[0] for k, v in good.metrics.items()}, "basin": brief(bg)},
                "poisoned": {**{k: v[0] for k, v in bad.metrics.items()}, "basin": brief(bb)},
                "sweep": sw.rows, "spearman": sw.spearman, "projection": proj}
    return sec
