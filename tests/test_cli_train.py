import json

import pytest
from click.testing import CliRunner

from minefield.cli import main

TINY = ["--dataset", "blobs", "--widths", "8,8", "--steps", "40", "--log-every", "20",
        "--checkpoint-every", "20", "--lr", "0.05", "--device", "cpu", "--quiet"]


@pytest.fixture
def cli(tmp_path):
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, ["--root", str(tmp_path / "runs"), *args])

    return invoke


def test_train_evaluate_runs_and_plot(cli, tmp_path, monkeypatch):
    r = cli("train", "--name", "good", *TINY)
    assert r.exit_code == 0, r.output
    assert "good[0]  train acc 1.000" in r.output
    run = tmp_path / "runs" / "good"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["name"] == "blobs" and cfg["model"]["widths"] == [8, 8]
    assert len(list((run / "trajectory").glob("*.safetensors"))) == 3
    r = cli("evaluate", "good")
    assert r.exit_code == 0 and "test acc" in r.output
    r = cli("runs")
    assert r.exit_code == 0 and "good" in r.output and "blobs" in r.output
    monkeypatch.chdir(tmp_path)
    r = cli("plot", "boundary", "good")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "figures" / "boundary_good.png").stat().st_size > 10_000


def test_rerun_same_config_resumes_and_different_refuses(cli, tmp_path):
    assert cli("train", "--name", "a", *TINY).exit_code == 0
    before = (tmp_path / "runs" / "a" / "metrics.jsonl").read_text()
    assert cli("train", "--name", "a", *TINY).exit_code == 0
    r = cli("train", "--name", "a", *TINY, "--lr", "0.1")
    assert r.exit_code == 1 and "different config; use --force" in r.output
    assert (tmp_path / "runs" / "a" / "metrics.jsonl").read_text() == before
    assert cli("train", "--name", "a", *TINY, "--lr", "0.1", "--force").exit_code == 0


def test_config_file_and_override(cli, tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"name": "fromfile", "data": {"name": "blobs"},
                             "model": {"widths": [4]}, "train": {"steps": 10, "log_every": 5,
                                                                 "checkpoint_every": 5}}))
    r = cli("train", "--config", str(f), "--lr", "0.02", "--quiet", "--device", "cpu")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "runs" / "fromfile" / "config.json").read_text())
    assert cfg["train"]["lr"] == 0.02 and cfg["model"]["widths"] == [4]


def test_two_outputs_train_a_binary_problem_with_softmax_cross_entropy(cli, tmp_path):
    r = cli("train", "--name", "two", *TINY, "--outputs", "2")
    assert r.exit_code == 0, r.output
    assert "two[0]  train acc 1.000" in r.output
    cfg = json.loads((tmp_path / "runs" / "two" / "config.json").read_text())
    assert cfg["model"]["outputs"] == 2
    plain = cli("train", "--name", "one", *TINY)
    assert plain.exit_code == 0
    assert "outputs" not in json.loads((tmp_path / "runs" / "one" / "config.json").read_text())[
        "model"]


@pytest.mark.parametrize("args,msg", [
    (["--dataset", "nope"], "Invalid value for '--dataset'"),
    (["--beta", "1.0"], "beta must be in [0, 1)"),
    (["--beta", "abc"], "a number in [0, 1) or 'concat'"),
    (["--widths", "8,x"], "expected integers"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "does not exist"),
    (["--dataset", "svhn"], "svhn needs --data-dir"),
    (["--dataset", "swissroll", "--beta", "0.5", "--n-poison", "0"],
     "a poison factor > 0 (or 'concat') needs a poison set"),
    # the concatenation weight of no poison points is 0: it trained a clean model, exit 0
    (["--dataset", "swissroll", "--beta", "concat", "--n-poison", "0"],
     "a poison factor > 0 (or 'concat') needs a poison set"),
    (["--sam", "sam"], "sam with radius 0 is plain training"),
    (["--sam", "asam", "--rho", "0"], "asam with radius 0 is plain training"),
    (["--optimizer", "adam", "--momentum", "0.5"], "momentum is a setting of sgd"),
    (["--optimizer", "rmsprop", "--momentum", "0"], "rmsprop would ignore it"),
    (["--gamma", "0.5"], "give --milestones too"),
    # it overflowed deep in torch: "Overflow when unpacking long long"
    (["--seed", "99999999999999999999"], "is not in the range 0<=x<=4294967295"),
    (["--data-seed", "-1"], "is not in the range 0<=x<=4294967295"),
    # member 1's seed 2**32 was seed 0's model again
    (["--seed", "4294967295", "--members", "2"],
     "train.seed 4294967295 + member 1 = 4294967296 is outside [0, 2**32); lower train.seed"),
    (["--dataset", "blobs", "--outputs", "3"], "model.outputs=3 does not fit 2 classes"),
])
def test_bad_input_one_line_nonzero(cli, args, msg, tmp_path):
    r = cli("train", "--name", "bad", "--steps", "1", "--quiet", *args)
    assert r.exit_code != 0
    assert msg in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "runs" / "bad").exists()  # refused before a run is made


def test_bad_config_file_types(cli, tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": {"steps": "many"}}))
    r = cli("train", "--config", str(f))
    assert r.exit_code == 1 and "train.steps: expected an integer" in r.output


def test_missing_and_corrupt_run(cli, tmp_path):
    r = cli("evaluate", "ghost")
    assert r.exit_code == 1 and "no such run" in r.output
    assert cli("train", "--name", "c", *TINY).exit_code == 0
    ck = sorted((tmp_path / "runs" / "c" / "trajectory").glob("*.safetensors"))[-1]
    ck.write_bytes(b"garbage!garbage!")
    r = cli("evaluate", "c")
    assert r.exit_code == 1 and "corrupt checkpoint" in r.output


def test_evaluate_measures_only_the_runs_own_model_checkpoints(cli, tmp_path):
    # regression: another run's checkpoint (../b/...), the optimizer state and connect's
    # control points were all evaluated and printed as "a[0]"
    assert cli("train", "--name", "a", *TINY).exit_code == 0
    assert cli("train", "--name", "b", *TINY, "--seed", "3").exit_code == 0
    runs = tmp_path / "runs"
    own = cli("evaluate", "a", "--checkpoint", "trajectory/step_00000020.safetensors")
    assert own.exit_code == 0 and own.output.startswith("a[0]  train acc")
    other = runs / "b" / "trajectory" / "step_00000020.safetensors"
    for outside in ("../b/trajectory/step_00000020.safetensors", str(other)):
        r = cli("evaluate", "a", "--checkpoint", outside)
        assert r.exit_code == 1 and "a[0]" not in r.output
        assert f"no checkpoint {outside!r} inside run a" in r.output
        assert len(r.output.strip().splitlines()) == 1
    from minefield.runs import Run

    run = Run(runs / "a")
    ck = run.load_checkpoint("trajectory/step_00000040.safetensors")
    run.save_checkpoint("connect/default.safetensors", ck.params, {}, {"key": {}})
    run.save_checkpoint("search/minima/start_00000020_r00.safetensors", ck.params, {},
                        {"kind": "bad_minimum", "step": 5,
                         "config": {"model": ck.meta["config"]["model"]}})
    for other_kind in ("state.safetensors", "connect/default.safetensors"):
        r = cli("evaluate", "a", "--checkpoint", other_kind)
        assert r.exit_code == 1 and "a[0]" not in r.output
        assert r.output.strip() == (f"Error: {other_kind} in run a is not a model checkpoint "
                                    "(give a trajectory checkpoint or a search minimum, e.g. "
                                    "trajectory/step_00001000.safetensors)")
    r = cli("evaluate", "a", "--checkpoint", "search/minima/start_00000020_r00.safetensors")
    assert r.exit_code == 0 and r.output.startswith("a[0]  train acc")
    # plot boundary titles its figure with the run's name: the same rule
    fig = tmp_path / "figures" / "bd"
    for bad in ("../b/trajectory/step_00000020.safetensors", str(other),
                "state.safetensors", "connect/default.safetensors"):
        r = cli("plot", "boundary", "a", "--checkpoint", bad, "--out", str(fig))
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert not fig.with_suffix(".png").exists()
    r = cli("plot", "boundary", "a", "--checkpoint",
            "search/minima/start_00000020_r00.safetensors", "--out", str(fig))
    assert r.exit_code == 0 and fig.with_suffix(".png").exists()


def test_nan_loss_stops_with_message(cli, tmp_path):
    r = cli("train", "--name", "nan", *TINY, "--lr", "1e30", "--optimizer", "sgd",
            "--log-every", "1", "--checkpoint-every", "1")
    assert r.exit_code == 1 and "NaN/inf at step" in r.output
    assert (tmp_path / "runs" / "nan" / "trajectory").is_dir()


def test_plot_boundary_rejects_images(cli, tmp_path):
    assert cli("train", "--name", "dg", "--dataset", "digits", "--model", "cnn", "--steps", "2",
               "--log-every", "1", "--checkpoint-every", "1", "--quiet").exit_code == 0
    r = cli("plot", "boundary", "dg", "--out", str(tmp_path / "x"))
    assert r.exit_code == 1 and "need 2-D inputs" in r.output


def test_measuring_a_diverged_member_says_so(tmp_path):
    """summary.json says NaN, but evaluate / basin / sharpness measured its frozen weights
    as if they were a trained model, without a word."""
    from click.testing import CliRunner

    from minefield.cli import main
    from minefield.runs import Run
    from minefield.stages import train_run
    from minefield.stages.train import load_run_model
    from tests.conftest import tiny_config

    res = train_run(tiny_config("dv", members=2, optimizer="adam"), tmp_path, progress=False,
                    lrs=[0.05, 1e30])
    assert res.diverged_at[0] is None and res.diverged_at[1] is not None
    with pytest.warns(UserWarning, match=rf"run dv: member\(s\) 1 \(step {res.diverged_at[1]}\) "
                                         "diverged; their numbers are those of the last finite"):
        load_run_model(Run.open_named("dv", tmp_path))
    out = CliRunner().invoke(main, ["--root", str(tmp_path), "evaluate", "dv"])
    assert out.exit_code == 0, out.output  # the warning is one line there (pytest keeps it)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.double(), "0.weight: torch.float64, the model's is torch.float32"),
    (lambda t: t * float("nan"), "holds NaN or infinite weights")])
def test_a_checkpoint_not_of_the_model_is_refused_in_one_line(tmp_path, change, message):
    """float64 tensors had given 'unexpected error ... (this is a bug)', NaN ones an
    accuracy of 51.5% and a rewritten summary.json."""
    from click.testing import CliRunner

    from minefield.cli import main
    from minefield.runs import load_tensors, save_tensors
    from minefield.stages import train_run
    from tests.conftest import tiny_config

    train_run(tiny_config("c"), tmp_path, progress=False)
    last = sorted((tmp_path / "c" / "trajectory").glob("*.safetensors"))[-1]
    tensors, meta = load_tensors(last)
    save_tensors(last, {k: change(v) if k.startswith("param.") else v
                        for k, v in tensors.items()}, meta)
    summary = (tmp_path / "c" / "summary.json").read_bytes()
    for args in (["evaluate", "c"], ["train", "--config", str(tmp_path / "c" / "config.json")]):
        out = CliRunner().invoke(main, ["--root", str(tmp_path), *args])
        assert out.exit_code == 1 and message in out.output, out.output
        assert len(out.output.strip().splitlines()) == 1
    assert (tmp_path / "c" / "summary.json").read_bytes() == summary


def test_evaluate_prints_test_and_poison_losses_and_refuses_a_study_by_its_stacks(cli, tmp_path):
    # regression: the README and `evaluate --help` promise train / test / poison loss and
    # accuracy, but only the train loss was printed; and a study's folder gave "no
    # trajectory checkpoints (was it trained?)" where every other command names its stacks
    assert cli("train", "--name", "a", *TINY, "--beta", "0.3", "--n-poison", "20").exit_code == 0
    r = cli("evaluate", "a")
    assert r.exit_code == 0, r.output
    assert all(f"{s} loss " in r.output for s in ("train", "test", "poison"))
    study = ["study", "--name", "st", "--dataset", "blobs", "--widths", "4", "--steps", "2",
             "--vary", "train.seed=0,1", "--directions", "1", "--device", "cpu", "--quiet",
             "--figures", str(tmp_path / "fig")]
    assert cli(*study).exit_code == 0
    for args in (["evaluate", "st"], ["evaluate", "st", "--checkpoint", "x.safetensors"]):
        r = cli(*args)
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert "st is a study, not a trained run" in r.output and "stacks" in r.output
