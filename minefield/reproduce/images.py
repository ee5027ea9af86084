"""Real images: digits with a small CNN, good vs poisoned (SVHN / CIFAR-10: paper_images)."""

from __future__ import annotations

from ..basin import VolumeConfig
from ..commands import basin_command, train_command
from ..config import DataConfig, ExperimentConfig, ModelConfig, Optimizer, PoisonConfig, TrainConfig
from ..directions import DirectionSpec
from ..stacked import member
from .common import Context, Section, brief, estimator_rows, pct

__all__ = ["exp_digits"]

_WIDTHS = {"cnn": (16, 32)}  # the model's own default widths


def _image_pair(ctx: Context, dataset: str, model: str, steps: int, beta: float,
                data_dir: str | None) -> Section:
    data = DataConfig(dataset, data_dir=data_dir)
    common = dict(optimizer=Optimizer.ADAM, lr=1e-3, batch_size=128, steps=steps,
                  log_every=max(1, steps // 10), checkpoint_every=max(1, steps // 2))
    good_cfg = ExperimentConfig(name=ctx.name(f"{dataset}-good"), data=data,
                                model=ModelConfig(model, widths=_WIDTHS[model]),
                                train=TrainConfig(**common))
    bad_cfg = good_cfg.replace(name=ctx.name(f"{dataset}-bad"), poison=PoisonConfig(beta=beta))
    sec = Section(dataset, f"Real images: {dataset} with {model}, good vs poisoned",
                  runs=[good_cfg.name, bad_cfg.name])
    (good_cfg, good), (bad_cfg, bad) = ctx.train(good_cfg), ctx.train(bad_cfg)
    vcfg = VolumeConfig(cutoff=1.0, n_directions=max(10, ctx.scale.directions // 10),
                        directions=DirectionSpec(seed=0))
    bg, bb = ctx.basin(good, vcfg), ctx.basin(bad, vcfg)
    sec.commands = [train_command(good_cfg), train_command(bad_cfg),
                    basin_command(good_cfg.name, vcfg, "repro"),
                    basin_command(bad_cfg.name, vcfg, "repro")]
    for label, r, b in (("good", good, bg), ("poisoned", bad, bb)):
        m = r.metrics
        sec.numbers.append((f"{label}: train / test acc, mean radius, log10 V (n = {b.n})",
                            f"{pct(m['train_acc'][0])} / {pct(m['test_acc'][0])}, "
                            f"{b.mean_radius:.4f}, {b.log10_volume:.0f}",
                            "SVHN: ~97% test good, 100% / 29% poisoned [C]"))
    est_rows, est_data, est_commands = estimator_rows(ctx, {"good": good, "poisoned": bad}, vcfg,
                                                  {"good": bg, "poisoned": bb})
    sec.numbers += est_rows
    sec.commands += est_commands
    sec.data = {"good": {**member(good.metrics, 0), "basin": brief(bg)},
                "bad": {**member(bad.metrics, 0), "basin": brief(bb)},
                "estimators": est_data}
    return sec


def exp_digits(ctx: Context) -> Section:
    return _image_pair(ctx, "digits", "cnn", ctx.scale.digits_steps, 0.5, None)
