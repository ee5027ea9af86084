"""Fig. 8 (check 10): PAPER.md's 2->100x9->2 net, and every seed held to the check."""

import dataclasses
from pathlib import Path

import torch

from minefield.functional import stacked_forward
from minefield.reproduce.circles import circles_check, exp_circles
from minefield.reproduce.common import SCALES, Context
from minefield.runs import Run
from minefield.stages import load_run_model


def test_check_10_holds_every_seed_to_99_percent():
    # regression: only seed 0 was held to >= 99%, so a seed missing all 10 gap points
    # (92.3%) passed as long as it made no other error
    assert circles_check([1.0, 1.0, 1.0, 1.0], [0, 0, 0, 0]).passed
    assert circles_check([1.0, 0.9923], [0, 0]).passed  # one gap point missed: 129/130
    assert not circles_check([1.0, 0.923], [0, 0]).passed
    assert not circles_check([0.923, 1.0], [0, 0]).passed
    assert not circles_check([1.0, 1.0], [0, 1]).passed  # a circle point wrong
    assert "every seed" in circles_check([1.0], [0]).text


def test_circles_experiment_trains_papers_two_logit_net(tmp_path):
    scale = dataclasses.replace(SCALES["tiny"], circles_steps=20, circles_seeds=2)
    ctx = Context(scale=scale, root=tmp_path / "runs", figures=tmp_path / "fig",
                  device="cpu", force=False, progress=False, data_dir=None, log=lambda s: None)
    ctx.figures.mkdir()
    sec = exp_circles(ctx)
    assert "--outputs 2" in sec.commands[0] and "--widths " + ",".join(["100"] * 9) in \
        sec.commands[0]
    (check,) = sec.checks
    accs = sec.data["train_acc"]
    assert len(accs) == 2
    assert check.passed == (min(accs) >= 0.99 and sum(sec.data["other_wrong"]) == 0)
    model, params, _, data, _ = load_run_model(Run.open("repro-tiny-circles", tmp_path / "runs"))
    with torch.no_grad():
        assert stacked_forward(model, params, data.x_train).shape == (2, 130, 2)  # 2 logits
    assert all(Path(f).exists() for f in sec.figures)
