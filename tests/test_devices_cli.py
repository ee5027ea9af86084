"""Every command end to end on each device: tiny runs through the CLI, on the CPU always
and on CUDA when there is one (the CUDA half runs in ``benchmarks/gpu.sh``).

The first H200 run found an engine call that crashed on any CUDA module (a CPU sample
pushed through it); tests that compare numbers one function at a time did not reach
it. This chain reaches every command's device path, and the CPU half proves the chain
itself in CI, so a CUDA failure is the code's, not the test's.
"""

import json

import pytest
import torch
from click.testing import CliRunner

from minefield.cli import main

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


def _ok(root, *args):
    res = CliRunner().invoke(main, ["--root", str(root), *args])
    assert res.exit_code == 0, f"minefield {' '.join(args)}:\n{res.output}"
    return res.output


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_every_command_runs_on_the_device(tmp_path, monkeypatch, device):
    monkeypatch.chdir(tmp_path)  # sweep and study draw into ./figures by default
    dev = ("--device", device, "-q")
    mlp = ("--dataset", "swissroll", "--n-poison", "40", "--widths", "8,8", "--steps", "40",
           "--log-every", "10", "--checkpoint-every", "10", *dev)
    _ok(tmp_path, "train", "--name", "good", *mlp)
    _ok(tmp_path, "train", "--name", "bad", "--beta", "0.5", *mlp)
    assert "train" in _ok(tmp_path, "evaluate", "good", "--device", device)
    _ok(tmp_path, "basin", "good", "--directions", "3", "--cutoff", "0.5", "--rollouts", "2",
        "--device", device)
    # a curvature preconditioner: the Hessian comes from the device, the estimator is CPU maths
    _ok(tmp_path, "basin", "good", "--directions", "3", "--cutoff", "0.5", "--estimator", "is",
        "--preconditioner", "hessian", "--tag", "is", "--rollouts", "2", "--device", device)
    out = _ok(tmp_path, "sharpness", "good", "--measures", "lambda_max,trace,worst_l2,average",
              "--steps", "2", "--device", device)
    assert "lambda_max" in out
    _ok(tmp_path, "landscape", "good", "--other", "bad", "--points", "5", "--device", device)
    _ok(tmp_path, "landscape", "good", "--dim", "2", "--points", "4", "--tag", "surface",
        "--device", device)
    _ok(tmp_path, "connect", "good", "bad", "--points", "5", "--steps", "5", "--device", device)
    _ok(tmp_path, "search", "good", "--every", "2", "--steps", "20", "--milestones", "",
        "--device", device, "-q")
    _ok(tmp_path, "embed", "good", "--device", device)
    _ok(tmp_path, "sweep", "--name", "sw", "--betas", "0,0.5", "--directions", "2",
        "--measures", "lambda_max", *mlp)
    _ok(tmp_path, "study", "--name", "st", "--vary", "train.lr=0.01,0.03", "--directions", "2",
        "--measures", "lambda_max", *mlp)
    # a conv net with BatchNorm on images: the engine's conv paths and the BN policy
    cnn = ("--dataset", "digits", "--model", "resnet20", "--n-train", "64", "--n-test", "32",
           "--n-poison", "0", "--steps", "4", "--batch-size", "32", "--log-every", "2",
           "--checkpoint-every", "2", *dev)
    _ok(tmp_path, "train", "--name", "rn", *cnn)
    _ok(tmp_path, "basin", "rn", "--directions", "2", "--cutoff", "1", "--rollouts", "2",
        "--device", device)
    _ok(tmp_path, "sharpness", "rn", "--measures", "average", "--samples", "2", "--bn", "batch",
        "--device", device)
    for run in ("good", "bad", "rn"):
        cfg = json.loads((tmp_path / run / "config.json").read_text())
        assert cfg["name"] == run
