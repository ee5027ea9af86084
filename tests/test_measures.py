"""The measure table, the ``minefield sharpness`` command and the sweep columns."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from minefield.cli import main
from minefield.config import ConfigError
from minefield.curvature import dense_hessian
from minefield.hvp import NonFiniteLoss
from minefield.measures import MEASURES, SharpnessConfig, measure_members
from minefield.stages import load_run_model, load_sweep, sweep_run, train_run
from minefield.sweep import SweepConfig
from tests.conftest import tiny_config

FAST = dict(steps=2, restarts=1, n_samples=4, m=20, trace_rtol=0.5, max_probes=8,
            trace_rank=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(2)
    train_run(tiny_config("a", members=2), root, progress=False)
    return root


def _invoke(root, *args):
    return CliRunner().invoke(main, ["--root", str(root), *args])


def test_every_measure_gives_one_value_per_member(runs):
    from minefield.runs import Run

    model, p, buffers, data, _ = load_run_model(Run.open("a", runs))
    cols = measure_members(model, p, data, SharpnessConfig(**FAST), buffers or None)
    for name in MEASURES:
        assert cols[name].shape == (2,) and torch.isfinite(cols[name]).all(), name
    h = dense_hessian(model, {k: v.double() for k, v in p.items()}, data)
    top = torch.linalg.eigvalsh(h)[:, -1]
    torch.testing.assert_close(cols["lambda_max"], top, rtol=1e-4, atol=1e-8)
    tr = h.diagonal(dim1=1, dim2=2).sum(1)
    assert ((cols["trace_ci_low"] <= tr) & (tr <= cols["trace_ci_high"])).all()
    # columns given as done are reused, not recomputed
    again = measure_members(model, p, data, SharpnessConfig(measures=("worst_l2",), **FAST),
                            done={"worst_l2": [1.0, 2.0]})
    assert again["worst_l2"].tolist() == [1.0, 2.0]


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown measure\\(s\\) flatness"):
        SharpnessConfig(measures=("flatness",))
    with pytest.raises(ConfigError, match="rho must be a finite number > 0, got -0.5"):
        SharpnessConfig(rho=-0.5)
    for k in ("rho", "rho_linf", "rho_adaptive", "sigma", "bound", "trace_rtol", "eig_tol"):
        for bad in (math.inf, math.nan, 0.0):
            with pytest.raises(ConfigError, match=f"^{k} must be a finite number > 0"):
                SharpnessConfig(**{k: bad})
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ConfigError, match="eta must be a finite number >= 0"):
            SharpnessConfig(eta=bad)
    # one name, or names in one string, are measures, not letters
    assert SharpnessConfig(measures="lambda_max").measures == ("lambda_max",)
    assert SharpnessConfig(measures="lambda_max, trace").measures == ("lambda_max", "trace")
    assert SharpnessConfig(measures=["asam"]).measures == ("asam",)
    with pytest.raises(ConfigError, match="measures must be a list of measure names, got 5"):
        SharpnessConfig(measures=5)
    with pytest.raises(ConfigError, match="unknown measure\\(s\\) 5"):
        SharpnessConfig(measures=(5,))
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        SharpnessConfig(steps=0)
    with pytest.raises(ConfigError, match="no measures"):
        SharpnessConfig(measures=())
    with pytest.raises(ConfigError, match="n_samples and max_probes"):
        SharpnessConfig(n_samples=1)
    with pytest.raises(ConfigError, match="eta must be a finite number >= 0"):
        SharpnessConfig(eta=-1.0)
    with pytest.raises(ConfigError, match="bn must be"):
        SharpnessConfig(bn="frozen")
    with pytest.raises(ConfigError, match="dtype must be"):
        SharpnessConfig(dtype="float16")


def test_cli_writes_resumes_adds_and_refuses(runs):
    args = ["sharpness", "a", "--steps", "2", "--restarts", "1", "--samples", "4",
            "--trace-rtol", "0.5"]
    res = _invoke(runs, *args, "--measures", "lambda_max,worst_l2")
    assert res.exit_code == 0, res.output
    path = runs / "a" / "sharpness" / "default.json"
    saved = json.loads(path.read_text())
    assert set(saved["columns"]) >= {"lambda_max", "worst_l2", "lambda_max_residual"}
    assert len(saved["columns"]["lambda_max"]) == 2
    again = _invoke(runs, *args, "--measures", "lambda_max,worst_l2")
    assert again.exit_code == 0 and "reusing" in again.output
    assert "worst_l2_spread" in saved["columns"] and "spread over restarts" in again.output
    more = _invoke(runs, *args, "--measures", "lambda_max,average")
    assert more.exit_code == 0 and "measuring average on a" in more.output
    assert set(json.loads(path.read_text())["columns"]) >= {"lambda_max", "worst_l2", "average"}
    before = path.read_text()
    other = _invoke(runs, *args, "--measures", "lambda_max", "--rho", "0.1")
    assert other.exit_code == 1 and "other settings" in other.output
    assert path.read_text() == before
    forced = _invoke(runs, *args, "--measures", "lambda_max", "--rho", "0.1", "--force")
    assert forced.exit_code == 0, forced.output
    assert set(json.loads(path.read_text())["columns"]) == {"lambda_max", "lambda_max_residual"}


@pytest.mark.parametrize("args,msg", [
    (["--measures", "flatness"], "unknown measure(s) flatness"),
    (["--rho", "-1"], "rho must be a finite number > 0, got -1.0"),
    (["--rho-linf", "inf"], "rho_linf must be a finite number > 0, got inf"),
    (["--sigma", "inf"], "sigma must be a finite number > 0, got inf"),
    (["--bound", "inf"], "bound must be a finite number > 0, got inf"),
    (["--measures", "m_sharpness", "--m", "0"], "m must be >= 1"),
    (["--measures", "m_sharpness", "--m", "100000"], "got 100000"),  # not clamped silently
    # checked before the first measure is computed and saved
    (["--measures", "lambda_max,m_sharpness", "--m", "41"],
     "m_sharpness: m must be in [1, 40] (the number of training points), got 41"),
    (["--tag", "../x"], "tag"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(runs, args, msg):
    res = _invoke(runs, "sharpness", "a", "--tag", "bad", *args)
    assert res.exit_code != 0 and msg in res.output, res.output
    assert "Traceback" not in res.output
    assert not (runs / "a" / "sharpness" / "bad.json").exists()


def test_cli_nan_model_is_one_line(runs, tmp_path):
    from minefield.runs import Run

    r = Run.open("a", runs)
    ck = r.load_checkpoint(r.trajectory()[-1])
    params = {k: v.clone() for k, v in ck.params.items()}
    params["0.bias"][1, 0] = math.nan
    path = tmp_path / "nan.safetensors"
    r.save_checkpoint(str(path), params, ck.buffers, ck.meta)
    res = _invoke(runs, "sharpness", "a", "--checkpoint", str(path), "--tag", "nan",
                  "--measures", "lambda_max")
    assert res.exit_code == 1 and "NaN or infinite weights at member(s) [1]" in res.output
    assert not (runs / "a" / "sharpness" / "nan.json").exists()
    from minefield.runs import RunError

    with pytest.raises(RunError, match="holds NaN or infinite weights at member"):
        load_run_model(r, path)
    model, p, b, data, _ = load_run_model(r)  # in Python: the measures refuse them too
    p = {k: v.clone() for k, v in p.items()}
    p["0.bias"][1, 0] = math.nan
    with pytest.raises(NonFiniteLoss):
        measure_members(model, p, data, SharpnessConfig(measures=("trace",)))


def test_sweep_adds_measure_columns_and_gap_correlations(tmp_path):
    cfg = tiny_config("sw").replace(data=tiny_config().data.replace(n_poison=40))
    sc = SweepConfig(betas=(0.0, 0.3, 0.6), seeds=(0,),
                     volume=SweepConfig().volume.replace(n_directions=3, n_bootstrap=10),
                     sharpness=SharpnessConfig(measures=("lambda_max", "worst_l2"), **FAST))
    res = sweep_run(cfg, sc, tmp_path, progress=False)
    assert all("lambda_max" in r and "worst_l2_stderr" in r for r in res.rows)
    assert set(res.spearman_gap) == {"mean_radius", "log10_volume", "lambda_max", "worst_l2"}
    assert "lambda_max" in res.spearman
    loaded = load_sweep(res.run)
    assert loaded.spearman_gap == res.spearman_gap
    assert "lambda_max" in (tmp_path / "sw" / "sweep.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("change", [
    {"data": {"n_train": 50}}, {"model": {"widths": (12, 12)}}, {"train": {"momentum": 0.5}}])
def test_a_sweep_with_other_models_refuses_rather_than_returning_the_old_one(tmp_path, change):
    """Same betas, seeds, steps and measures, other data / architecture / optimiser: the
    old table is not theirs (models.json's key is only how models are measured)."""
    from minefield.runs import RunError

    cfg = tiny_config("sw").replace(data=tiny_config().data.replace(n_poison=40))
    sc = SweepConfig(betas=(0.0, 0.3), seeds=(0,),
                     volume=SweepConfig().volume.replace(n_directions=2, n_bootstrap=10),
                     sharpness=SharpnessConfig(measures=("worst_l2",), **FAST))
    sweep_run(cfg, sc, tmp_path, progress=False)
    files = {p: p.read_bytes() for p in (tmp_path / "sw").rglob("*") if p.is_file()}
    other = cfg.replace(**{s: getattr(cfg, s).replace(**v) for s, v in change.items()})
    with pytest.raises(RunError, match="exists with a different config; use --force"):
        sweep_run(other, sc, tmp_path, progress=False)
    assert {p: p.read_bytes() for p in (tmp_path / "sw").rglob("*") if p.is_file()} == files
    forced = sweep_run(other, sc, tmp_path, progress=False, force=True)
    assert json.loads((tmp_path / "sw" / "config.json").read_text())["data"]["n_train"] == (
        other.data.n_train)
    assert len(forced.rows) == 2


def test_cli_values_of_a_moved_last_checkpoint_are_stale_not_reused(tmp_path):
    """"The last checkpoint" moves when a run trains further: values of the old one are
    refused (one file never holds two checkpoints' columns), --force measures the new."""
    from minefield.runs import Run

    train_run(tiny_config("a"), tmp_path, progress=False)
    r = Run.open("a", tmp_path)
    last = r.trajectory()[-1]
    hidden = tmp_path / "last.safetensors"
    last.rename(hidden)  # the run as it was before its last checkpoint was written
    args = ["sharpness", "a", "--steps", "2", "--restarts", "1"]
    assert _invoke(tmp_path, *args, "--measures", "worst_l2").exit_code == 0
    path = tmp_path / "a" / "sharpness" / "default.json"
    before = path.read_text()
    hidden.rename(last)  # trained further
    for measures in ("worst_l2", "worst_l2,asam"):
        res = _invoke(tmp_path, *args, "--measures", measures)
        assert res.exit_code == 1 and "holds values of trajectory/step_00000040" in res.output
        assert "step_00000060" in res.output and "--force" in res.output
        assert path.read_text() == before
    res = _invoke(tmp_path, *args, "--measures", "worst_l2", "--force")
    assert res.exit_code == 0, res.output
    model, p, _, data, _ = load_run_model(r, last)
    direct = measure_members(model, p, data, SharpnessConfig(measures=("worst_l2",), steps=2,
                                                             restarts=1))
    assert json.loads(path.read_text())["columns"]["worst_l2"] == direct["worst_l2"].tolist()


def test_data_that_do_not_fit_the_model_is_one_config_error():
    from minefield import ModelConfig, build_model
    from minefield.train import init_stack

    model = build_model(ModelConfig(widths=(4,)), (2,), 3)
    p = {k: v.double() for k, v in init_stack(model, "glorot_uniform", [0]).items()}
    cfg = SharpnessConfig(measures=("lambda_max",))
    x, y = torch.randn(10, 2), torch.randint(0, 3, (10,))
    assert measure_members(model, p, (x, y), cfg)["lambda_max"].shape == (1,)
    with pytest.raises(ConfigError, match=r"the data do not fit the model: inputs of shape \(5,\)"):
        measure_members(model, p, (torch.randn(10, 5), y), cfg)
    with pytest.raises(ConfigError, match=r"labels must be in \[0, 3\) for the model's 3 output"):
        measure_members(model, p, (x, y + 1), cfg)
    with pytest.raises(ConfigError, match=r"labels must be in \[0, 3\)"):
        measure_members(model, p, (x, y - 1), cfg)


def test_a_sweep_refuses_m_larger_than_the_training_set_before_training(tmp_path):
    cfg = tiny_config("sm").replace(data=tiny_config().data.replace(n_train=10, n_poison=40))
    sc = SweepConfig(betas=(0.0,), seeds=(0,), sharpness=SharpnessConfig(
        measures=("m_sharpness",), **FAST))
    for kw in ({}, {"models_per_task": 1}):
        with pytest.raises(ConfigError, match=r"m must be in \[1, 10\].*got 20"):
            sweep_run(cfg, sc, tmp_path, progress=False, **kw)
        assert not (tmp_path / "sm").exists()


def test_a_forced_sweep_keeps_its_table_until_the_new_one_replaces_it(tmp_path, monkeypatch):
    """--force of other measurements had cleared the whole run (sweep.json, models.json,
    the trained weights) before retraining: a killed redo left no table at all. With the
    same models it measures them again and replaces the files only when written."""
    import minefield.stages.study as st

    cfg = tiny_config("sw").replace(data=tiny_config().data.replace(n_poison=40))
    vol = SweepConfig().volume.replace(n_directions=2, n_bootstrap=10)
    sweep_run(cfg, SweepConfig(betas=(0.0, 0.3), seeds=(0,), volume=vol), tmp_path,
              progress=False)
    files = {p: p.read_bytes() for p in (tmp_path / "sw").rglob("*") if p.is_file()}
    other = SweepConfig(betas=(0.0, 0.3), seeds=(0,), volume=vol.replace(n_directions=3))

    def killed(*a, **k):
        raise KeyboardInterrupt

    real = st.measure_stack
    monkeypatch.setattr(st, "measure_stack", killed)
    with pytest.raises(KeyboardInterrupt):
        sweep_run(cfg, other, tmp_path, progress=False, force=True)
    assert {p: p.read_bytes() for p in (tmp_path / "sw").rglob("*") if p.is_file()} == files
    monkeypatch.setattr(st, "measure_stack", real)
    forced = sweep_run(cfg, other, tmp_path, progress=False, force=True)
    fresh = sweep_run(cfg.replace(name="fresh"), other, tmp_path, progress=False)
    assert forced.rows == fresh.rows
    traj = sorted((tmp_path / "sw" / "trajectory").iterdir())
    assert traj and all(files[p] == p.read_bytes() for p in traj)  # not retrained


def test_a_measure_named_twice_is_refused():
    """``--measures lambda_max,lambda_max`` scored lambda_max twice in a study (two rows of
    scores.csv, its figure written twice); every list of values refuses a repeat."""
    with pytest.raises(ConfigError, match="lambda_max is given twice"):
        SharpnessConfig(measures=("lambda_max", "trace", "lambda_max"))


def test_a_forced_sweep_over_other_betas_retrains(tmp_path):
    """Other betas (or seeds) of the same count keep config.json as it is: --force had
    taken them for the same models, kept the trained run and refused to resume it
    ('trained with other per-member betas or seeds ... or use --force')."""
    cfg = tiny_config("sw", steps=10).replace(data=tiny_config().data.replace(n_poison=40))
    vol = SweepConfig().volume.replace(n_directions=2, n_bootstrap=10)
    sweep_run(cfg, SweepConfig(betas=(0.0, 0.3), seeds=(0,), volume=vol), tmp_path,
              progress=False)
    other = SweepConfig(betas=(0.0, 0.2), seeds=(0,), volume=vol)
    forced = sweep_run(cfg, other, tmp_path, progress=False, force=True)
    fresh = sweep_run(cfg.replace(name="fresh"), other, tmp_path, progress=False)
    assert [r["beta"] for r in forced.rows] == [0.0, 0.2] and forced.rows == fresh.rows
