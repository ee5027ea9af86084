import json

import pytest
import torch
from click.testing import CliRunner

from minefield.cli import main
from minefield.runs import load_tensors
from minefield.stages import train_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.conftest import tiny_config

    root = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(2)
    train_run(tiny_config("a"), root, progress=False)
    train_run(tiny_config("b", seed=1, lr=0.1), root, progress=False)
    return root


def _invoke(root, *args):
    return CliRunner().invoke(main, ["--root", str(root), *args])


def test_basin_writes_json_reuses_and_refuses_other_settings(runs):
    res = _invoke(runs, "basin", "a", "--directions", "3", "--cutoff", "2", "--relative",
                  "--rollouts", "2", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "log10 V" in res.output and "n*mean(log10 r)" in res.output
    assert "radii at r_max: a lower bound; raise --r-max" in res.output  # 2 of 6 here
    saved = json.loads((runs / "a" / "basin" / "default.json").read_text())
    m = saved["members"][0]
    assert len(m["radii"]) == 6 and m["config"]["cutoff_kind"] == "relative"
    assert len(saved["rollouts"][0]["loss"]) == 2
    again = _invoke(runs, "basin", "a", "--directions", "3", "--cutoff", "2", "--relative",
                    "--rollouts", "2", "--device", "cpu")
    assert again.exit_code == 0 and "reusing" in again.output
    other = _invoke(runs, "basin", "a", "--directions", "4", "--cutoff", "2", "--relative")
    assert other.exit_code == 1 and "other settings" in other.output
    forced = _invoke(runs, "basin", "a", "--directions", "4", "--cutoff", "2", "--relative",
                     "--rollouts", "2", "--force", "--method", "grid", "--grid-points", "20")
    assert forced.exit_code == 0, forced.output
    assert _invoke(runs, "basin", "b", "--directions", "3", "--cutoff", "2", "--relative",
                   "--rollouts", "2").exit_code == 0
    out = runs / "fig" / "basin"
    plotted = _invoke(runs, "plot", "basin", "a", "b", "--out", str(out))
    assert plotted.exit_code == 0, plotted.output
    assert (runs / "fig" / "basin.png").stat().st_size > 0


@pytest.mark.parametrize("args,msg", [
    (["basin", "nope"], "no such run"),
    (["basin", "a", "--cutoff", "-1"], "cutoff must be a positive number"),
    (["basin", "a", "--cutoff", "0.5", "--relative"], "> 1 if relative"),
    (["basin", "a", "--rtol", "2"], "rtol must be in"),
    (["basin", "a", "--tag", "../x"], "tag"),
    (["basin", "a", "--checkpoint", "missing.safetensors", "--tag", "t2"], "missing checkpoint"),
    (["plot", "basin", "a", "--tag", "never"], "no basin result"),
    (["landscape", "a", "--span", "1"], "--span needs 2 numbers"),
    (["landscape", "a", "--other", "b", "--dim", "2"], "use it with --dim 1"),
    (["landscape", "a", "--splits", "val", "--tag", "bad"], "unknown split 'val'"),
    (["plot", "landscape", "a", "--tag", "never"], "no landscape"),
    (["plot", "boundary", "a", "b", "--checkpoint", "trajectory/step_00000020.safetensors"],
     "give one run with it"),
])
def test_errors_are_one_line(runs, args, msg):
    res = _invoke(runs, *args)
    assert res.exit_code != 0
    assert msg in res.output
    assert "Traceback" not in res.output


def test_landscape_line_surface_resume_and_plots(runs):
    res = _invoke(runs, "landscape", "a", "--other", "b", "--points", "5", "--tag", "line")
    assert res.exit_code == 0, res.output
    tensors, meta = load_tensors(runs / "a" / "landscape" / "line.safetensors")
    assert tensors["ts"].tolist() == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert meta["key"]["other"] == "b"
    surf = ["landscape", "a", "--dim", "2", "--points", "4", "--tag", "plane",
            "--block-rows", "2", "--splits", "train"]
    assert _invoke(runs, *surf).exit_code == 0
    path = runs / "a" / "landscape" / "plane.safetensors"
    tensors, meta = load_tensors(path)
    assert tensors["done"].all() and torch.isfinite(tensors["values.train_loss"]).all()
    # simulate an interruption after the first block: rows 2, 3 not done
    from minefield.runs import save_tensors

    tensors["done"][2:] = 0
    full = tensors["values.train_loss"].clone()
    tensors["values.train_loss"][2:] = float("nan")
    save_tensors(path, tensors, meta)
    res = _invoke(runs, *surf)
    # 4 rows, plus t = 0
    assert res.exit_code == 0 and "resuming" in res.output and "2/5 rows done" in res.output
    torch.testing.assert_close(load_tensors(path)[0]["values.train_loss"], full)
    assert "reusing" in _invoke(runs, *surf).output
    clash = _invoke(runs, "landscape", "a", "--dim", "2", "--points", "5", "--tag", "plane")
    assert clash.exit_code == 1 and "other settings" in clash.output
    for tag, kind in (("line", "contour"), ("plane", "contourf"), ("plane", "surface3d")):
        out = runs / "fig" / f"{tag}_{kind}"
        res = _invoke(runs, "plot", "landscape", "a", "--tag", tag, "--kind", kind,
                      "--out", str(out))
        assert res.exit_code == 0, res.output
        assert out.with_suffix(".png").exists()


def test_basin_estimators_from_the_cli(runs):
    res = _invoke(runs, "basin", "a", "--estimator", "is", "--kind", "gaussian", "--directions",
                  "4", "--cutoff", "2", "--relative", "--rollouts", "0", "--tag", "is")
    assert res.exit_code == 0, res.output
    assert "is: ESS" in res.output
    m = json.loads((runs / "a" / "basin" / "is.json").read_text())["members"][0]
    assert m["estimator"] == "is" and m["config"]["preconditioner"] == "hessian"
    assert m["diagnostics"]["n_samples"] == 8 and m["diagnostics"]["preconditioner"] == "dense"
    res = _invoke(runs, "basin", "a", "--estimator", "gaussian", "--kind", "gaussian",
                  "--sigma", "0.1", "--directions", "3", "--rollouts", "0", "--tag", "gm")
    assert res.exit_code == 0, res.output
    m = json.loads((runs / "a" / "basin" / "gm.json").read_text())["members"][0]
    assert m["estimator"] == "gaussian" and m["log10_volume"] <= 0  # a probability
    res = _invoke(runs, "basin", "a", "--estimator", "is", "--preconditioner", "adam", "--kind",
                  "gaussian", "--directions", "3", "--rollouts", "0", "--tag", "adam")
    assert res.exit_code == 0, res.output  # the tiny runs train with Adam
    saved = json.loads((runs / "a" / "basin" / "adam.json").read_text())
    assert saved["key"]["curvature"] == "adam"
    d = saved["members"][0]["diagnostics"]
    assert d["preconditioner"] == "diagonal"
    # full-batch Adam at a near-zero loss: its moments are far under the floor, and the
    # proposal is isotropic; said, not hidden
    assert d["isotropic"] and "the preconditioner is isotropic" in res.output
    assert json.loads((runs / "a" / "basin" / "is.json").read_text())["members"][0][
        "diagnostics"]["isotropic"] is False


@pytest.mark.parametrize("args,message,code", [
    (["--estimator", "exact"], "Invalid value for '--estimator'", 2),
    (["--estimator", "is", "--preconditioner", "none"], "needs a preconditioner", 1),
    (["--estimator", "mcmc", "--replicates", "1"], "Invalid value for '--replicates'", 2),
    (["--estimator", "is", "--preconditioner", "axes", "--power", "round"],
     "volume.power must be a number >= 1", 1),
    # naive ignored hessian, and with adam ran the Adam-shaped estimator labelled naive
    (["--preconditioner", "adam"], "--preconditioner adam shapes the is, gaussian and mcmc", 1),
    (["--preconditioner", "hessian"], "naive (the default) draws uniform directions", 1),
    (["--estimator", "is", "--bias", "zero"], "bias 'zero' counts coordinates that no", 1),
])
def test_basin_estimator_errors_are_one_line_and_write_nothing(runs, args, message, code):
    res = _invoke(runs, "basin", "a", *args, "--kind", "gaussian", "--tag", "bad")
    assert res.exit_code == code and message in res.output
    assert "Traceback" not in res.output
    assert not (runs / "a" / "basin" / "bad.json").exists()


def test_adam_preconditioner_needs_the_given_kind(runs):
    from minefield.basin import VolumeConfig
    from minefield.config import ConfigError
    from minefield.stages import basin_run

    with pytest.raises(ConfigError, match="adam=True is a 'given' preconditioner: .* 'none'"):
        basin_run("a", VolumeConfig(), tag="adam-naive", root=runs, adam=True)
    assert not (runs / "a" / "basin" / "adam-naive.json").exists()


def test_a_line_to_a_retrained_run_is_not_reused(tmp_path):
    from tests.conftest import tiny_config

    train_run(tiny_config("a"), tmp_path, progress=False)
    train_run(tiny_config("b", seed=1), tmp_path, progress=False)
    line = ["landscape", "a", "--other", "b", "--points", "3"]
    assert _invoke(tmp_path, *line).exit_code == 0
    assert "reusing" in _invoke(tmp_path, *line).output
    train_run(tiny_config("b", seed=2), tmp_path, progress=False, force=True)  # same file name
    res = _invoke(tmp_path, *line)
    assert res.exit_code != 0 and "holds results for other settings" in res.output
    assert _invoke(tmp_path, *line, "--force").exit_code == 0


def test_a_refused_force_redo_keeps_the_old_result(tmp_path):
    """--force deleted the stored result first: a redo refused afterwards (or killed)
    left the run with no result at all."""
    from tests.conftest import tiny_config

    train_run(tiny_config("f"), tmp_path, progress=False)
    assert _invoke(tmp_path, "basin", "f", "--directions", "3", "--tag", "x").exit_code == 0
    assert _invoke(tmp_path, "landscape", "f", "--points", "3", "--tag", "t").exit_code == 0
    files = [tmp_path / "f" / "basin" / "x.json", tmp_path / "f" / "landscape" / "t.safetensors"]
    before = [p.read_bytes() for p in files]
    bad = _invoke(tmp_path, "basin", "f", "--tag", "x", "--force", "--estimator", "is",
                  "--directions-per-task", "2", "--directions", "3")
    assert bad.exit_code == 1 and "naive estimator only" in bad.output
    bad = _invoke(tmp_path, "landscape", "f", "--points", "3", "--tag", "t", "--force",
                  "--splits", "nope")
    assert bad.exit_code != 0
    assert [p.read_bytes() for p in files] == before


def test_plot_basin_names_a_file_whose_rollouts_are_ragged(runs):
    """Regression: rollouts of mismatched lengths gave matplotlib's one line without the
    file's name; now the file is named and left as it was."""
    assert _invoke(runs, "basin", "a", "--directions", "3", "--cutoff", "2", "--relative",
                   "--rollouts", "2", "--device", "cpu", "--tag", "ragged").exit_code == 0
    path = runs / "a" / "basin" / "ragged.json"
    saved = json.loads(path.read_text())
    saved["rollouts"][0]["ts"] = saved["rollouts"][0]["ts"][:-1]
    path.write_text(json.dumps(saved))
    before = path.read_bytes()
    r = _invoke(runs, "plot", "basin", "a", "--tag", "ragged", "--out",
                str(runs / "fig" / "ragged"))
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "ragged.json is corrupt" in r.output and "expected (T,), (K, T)" in r.output
    assert path.read_bytes() == before and not (runs / "fig" / "ragged.png").exists()


def test_plot_basin_gives_a_run_one_colour_in_both_panels(runs, monkeypatch):
    """Regression: with the first run saved without rollouts, the second run's curves
    took the first colour (red) while its histogram beside them was blue."""
    import minefield.plotting.style as style

    for name, n in (("a", "0"), ("b", "2")):
        assert _invoke(runs, "basin", name, "--directions", "3", "--cutoff", "2", "--relative",
                       "--rollouts", n, "--device", "cpu", "--tag", "colours").exit_code == 0
    seen = {}
    real = style.save_figure

    def keep(fig, path, *a, **k):
        curves, hist = fig.axes[:2]
        seen["curves"] = {ln.get_label(): ln.get_color() for ln in curves.get_lines()
                          if not ln.get_label().startswith("_")}
        handles, labels = hist.get_legend_handles_labels()
        seen["hist"] = {lab.split(":")[0]: h.get_facecolor()[:3]
                        for h, lab in zip(handles, labels)}
        return real(fig, path, *a, **k)

    monkeypatch.setattr(style, "save_figure", keep)
    r = _invoke(runs, "plot", "basin", "a", "b", "--tag", "colours", "--out",
                str(runs / "fig" / "colours"))
    assert r.exit_code == 0, r.output
    from matplotlib.colors import to_rgb

    assert list(seen["curves"]) == ["b"]
    assert to_rgb(seen["curves"]["b"]) == pytest.approx(seen["hist"]["b"])
    assert to_rgb(seen["curves"]["b"]) != pytest.approx(seen["hist"]["a"])


def test_cli_seed_is_the_api_config_the_docs_name(runs):
    """``minefield basin --seed 3`` seeds the directions too; ``VolumeConfig(seed=3)``
    seeds only the bootstrap (other radii, log10 V 80.82 for 80.34 on a blobs MLP).
    The docs name the API config with the CLI's numbers, and it has them."""
    from minefield.basin import VolumeConfig
    from minefield.directions import DirectionSpec
    from minefield.stages import basin_run

    res = _invoke(runs, "basin", "a", "--directions", "3", "--seed", "3", "--tag", "seed3",
                  "--rollouts", "0", "--device", "cpu")
    assert res.exit_code == 0, res.output
    cli = json.loads((runs / "a" / "basin" / "seed3.json").read_text())["members"][0]
    cfg = VolumeConfig(n_directions=3, seed=3, directions=DirectionSpec(seed=3))
    api = basin_run("a", cfg, tag="seed3api", root=runs, n_rollouts=0, device="cpu")
    assert api.members[0].radii.tolist() == cli["radii"]
    assert api.members[0].log10_volume == cli["log10_volume"]
    doc = "VolumeConfig(seed=S, directions=DirectionSpec(seed=S))"
    assert doc in " ".join(VolumeConfig.__doc__.split())
