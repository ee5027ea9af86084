"""Fig. 8, check 10: concentric circles, whose ideal solution is sharp."""

from __future__ import annotations

import torch

from ..commands import train_command
from ..config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from ..functional import stacked_forward
from ..loss import predict
from .common import Check, Context, Section, pct

__all__ = ["exp_circles"]


def exp_circles(ctx: Context) -> Section:
    from ..plotting.boundary import boundary_row

    s = ctx.scale
    cfg = ExperimentConfig(
        name=ctx.name("circles"), data=DataConfig("circles"),
        model=ModelConfig(widths=(100,) * 9, init="torch"),
        train=TrainConfig(lr=1e-3, steps=s.circles_steps, members=s.circles_seeds,
                          log_every=max(1, s.circles_steps // 10),
                          checkpoint_every=s.circles_steps))
    sec = Section("circles", "Figure 8: concentric circles, whose ideal solution is sharp",
                  runs=[cfg.name])
    cfg, res = ctx.train(cfg)
    sec.commands = [train_command(cfg)]
    with torch.no_grad():
        pred = predict(stacked_forward(res.model, res.params, res.data.x_train))
    wrong = pred != res.data.y_train  # (M, 130)
    gap_wrong = wrong[:, 120:].sum(1).tolist()
    other_wrong = wrong[:, :120].sum(1).tolist()
    accs = res.metrics["train_acc"]
    sec.numbers += [(f"seed {i}: train acc / missed gap points / other errors",
                     f"{pct(accs[i])} / {gap_wrong[i]} of 10 / {other_wrong[i]}",
                     "100% / 0 / 0 (seed 0) [R]") for i in range(len(accs))]
    sec.checks.append(Check("10", ">= 99% train accuracy for seed 0; errors (any seed) only "
                            "on the 10 gap points", accs[0] >= 0.99 and sum(other_wrong) == 0,
                            f"seed 0: {pct(accs[0])}; non-gap errors over all seeds: "
                            f"{sum(other_wrong)}"))
    titles = [f"seed {i}: train {pct(accs[i])}, gap missed {gap_wrong[i]}"
              for i in range(len(accs))]
    sec.figures += boundary_row(res.model, res.params, res.data, titles,
                                ctx.figures / "fig8_circles")
    sec.data = {"train_acc": accs, "gap_wrong": gap_wrong, "other_wrong": other_wrong}
    return sec
