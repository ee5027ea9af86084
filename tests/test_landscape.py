import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from minefield.cli import main
from minefield.config import DataConfig, ModelConfig
from minefield.data import load_dataset
from minefield.directions import DirectionSpec
from minefield.engine import evaluate_points_loop
from minefield.evaluate import evaluate_members
from minefield.landscape import (
    LandscapeConfig,
    axis,
    line_direction,
    plane_directions,
    slice_1d,
    surface,
)
from minefield.models import build_model, init_params
from minefield.runs import Run, load_tensors, save_tensors
from minefield.stacked import flatten, member, one, stack
from minefield.stages import landscape_run, load_run_model, train_run
from tests.conftest import tiny_config


def _setup():
    data = load_dataset(DataConfig("blobs", n_train=20, n_test=20, n_poison=0)).to("cpu",
                                                                                  torch.float64)
    model = build_model(ModelConfig(widths=(5,), init="torch"), data.input_shape, 2)
    ps = [stack([{k: v.double() for k, v in
                  init_params(model, "torch", torch.Generator().manual_seed(s)).items()}])
          for s in (0, 1)]
    return model, ps[0], ps[1], data


def test_line_between_two_models_hits_both_ends():
    model, a, b, data = _setup()
    d = line_direction(a, b)
    s = slice_1d(model, a, d, torch.tensor([0.0, 0.5, 1.0]), data)
    ref_b = evaluate_points_loop(model, b, d, torch.zeros(1), *data.split("test"))[0]
    ref_a = evaluate_points_loop(model, a, d, torch.zeros(1), *data.split("train"))[0]
    torch.testing.assert_close(s.values["test_loss"][2], ref_b[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.values["train_loss"][0], ref_a[0], rtol=1e-10, atol=1e-12)
    assert set(s.values) == {"train_loss", "train_acc", "test_loss", "test_acc"}


def test_axes_hold_the_models_they_are_drawn_around():
    # regression: 51 points over [-0.5, 1.5] missed t = 0 and t = 1 (the two models)
    t = axis(-0.5, 1.5, 51, anchors=(0.0, 1.0))
    assert (t == 0).sum() == 1 and (t == 1).sum() == 1 and t[0] == -0.5 and t[-1] == 1.5
    assert bool((t.diff() > 0).all()) and len(t) == 53
    assert torch.equal(axis(-1, 1, 5), torch.linspace(-1, 1, 5, dtype=torch.float64))
    assert torch.equal(axis(0.5, 2, 4, (0.0, 1.0)), torch.tensor([0.5, 1.0, 1.5, 2.0],
                                                                dtype=torch.float64))
    with pytest.raises(ValueError, match="an axis needs lo < hi and points >= 2"):
        axis(1, 1, 5)


def test_cli_line_reads_each_model_at_its_end(tmp_path):
    for name, seed in (("good", 0), ("bad", 1)):
        train_run(tiny_config(name, seed=seed), tmp_path, progress=False)
    r = CliRunner().invoke(main, ["--root", str(tmp_path), "landscape", "good", "--other",
                                  "bad", "--dim", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    tensors, _ = load_tensors(tmp_path / "good" / "landscape" / "default.safetensors")
    ts = tensors["ts"]
    for name, t in (("good", 0.0), ("bad", 1.0)):
        model, p, _, data, _ = load_run_model(Run.open(name, tmp_path))
        direct = evaluate_points_loop(model, p, one(p, 0),
                                      torch.zeros(1), *data.split("train"))[0]
        got = tensors["values.train_loss"][ts == t]
        torch.testing.assert_close(got, direct.to(got.dtype), rtol=1e-5, atol=1e-6)


def test_the_readme_landscape_lines_run_top_to_bottom(tmp_path):
    # regression: the README's '--dim 2' and '--other bad --dim 1' lines both wrote tag
    # 'default', so the second stopped with "holds results for other settings" (exit 1)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [shlex.split(ln, comments=True)[1:] for ln in readme.splitlines()
             if ln.startswith(("minefield landscape good", "minefield plot landscape good"))]
    assert len(lines) >= 3 and any("--other" in a for a in lines)
    for name, seed in (("good", 0), ("bad", 1)):
        train_run(tiny_config(name, seed=seed), tmp_path, progress=False)
    for args in lines:
        if args[0] == "plot":
            args = args + ["--out", str(tmp_path / "fig" / "_".join(args[2:]))]
        r = CliRunner().invoke(main, ["--root", str(tmp_path), *args])
        assert r.exit_code == 0, (args, r.output)


def test_surface_matches_loop_and_resumes_after_interruption():
    model, c, _, data = _setup()
    dirs = plane_directions(member(c, 0), DirectionSpec(seed=4))
    f = flatten(dirs)
    assert abs(float(f[0] @ f[1])) < 1e-10 * float(f[0].norm() * f[1].norm())
    xs = torch.linspace(-1, 1, 5, dtype=torch.float64)
    ys = torch.linspace(-0.5, 0.5, 3, dtype=torch.float64)
    full = surface(model, c, dirs, xs, ys, data, ("train", "test"), block_rows=2)
    assert full.complete and full.values["train_loss"].shape == (5, 3)
    # oracle: the point (xs[3], ys[0]) through the reference loop along x d1 + y d2
    d = {k: (xs[3] * v[0] + ys[0] * v[1])[None] for k, v in dirs.items()}
    ref = evaluate_points_loop(model, c, d, torch.ones(1), *data.split("train"))[0]
    torch.testing.assert_close(full.values["train_loss"][3, 0], ref[0], rtol=1e-10, atol=1e-12)

    saved = []

    class Stop(Exception):
        pass

    def on_block(s):
        saved.append(s)
        raise Stop

    with pytest.raises(Stop):
        surface(model, c, dirs, xs, ys, data, ("train", "test"), on_block=on_block, block_rows=2)
    part = saved[-1]
    assert part.done.tolist() == [True, True, False, False, False]
    assert torch.isnan(part.values["train_loss"][2:]).all()
    blocks = []
    resumed = surface(model, c, dirs, xs, ys, data, ("train", "test"), partial=part,
                      on_block=blocks.append, block_rows=2)
    assert len(blocks) == 2  # only the 3 missing rows were computed
    for k, v in full.values.items():
        torch.testing.assert_close(resumed.values[k], v)


def test_errors():
    model, a, b, data = _setup()
    with pytest.raises(ValueError, match="different parameter shapes"):
        line_direction(a, {k: v[..., :1] for k, v in b.items()})
    with pytest.raises(ValueError, match="unknown split"):
        slice_1d(model, a, line_direction(a, b), torch.zeros(2), data, ("val",))
    with pytest.raises(ValueError, match="needs 2 directions"):
        surface(model, a, line_direction(a, b), torch.zeros(2), torch.zeros(2), data)
    dirs = plane_directions(member(a, 0))
    part = surface(model, a, dirs, torch.zeros(2), torch.zeros(2), data)
    with pytest.raises(ValueError, match="cannot resume"):
        surface(model, a, dirs, torch.ones(2), torch.zeros(2), data, partial=part)
    with pytest.raises(ValueError, match="block_rows"):
        surface(model, a, dirs, torch.ones(2), torch.zeros(2), data, block_rows=0)
    with pytest.raises(ValueError, match="single member"):
        slice_1d(model, {k: torch.cat([a[k], b[k]]) for k in a}, line_direction(a, b),
                 torch.zeros(2), data)


def test_a_slice_plots_every_split_of_a_kind_or_the_one_asked_for():
    import matplotlib

    matplotlib.use("Agg")
    from minefield.landscape import Slice
    from minefield.plotting.landscape import plot_slice

    ts = torch.linspace(0, 1, 3)
    vals = {f"{s}_{k}": torch.rand(3) + 0.1 for s in ("train", "test") for k in ("loss", "acc")}
    res = Slice(ts, vals, {})
    assert [ln.get_label() for ln in plot_slice(res, metric="loss").get_lines()] == [
        "train", "test"]
    only = plot_slice(res, metric="test_loss").get_lines()
    assert [ln.get_label() for ln in only] == ["test"]
    assert only[0].get_ydata().tolist() == vals["test_loss"].tolist()
    with pytest.raises(ValueError, match="no 'val_loss' values"):
        plot_slice(res, metric="val_loss")


def test_cli_line_between_batchnorm_runs_is_refused(tmp_path):
    # the engine would use the first run's running statistics at every t, t = 1 included
    for name, seed in (("a", 0), ("b", 1)):
        cfg = tiny_config(name, seed=seed, steps=2, log_every=2, checkpoint_every=2)
        train_run(cfg.replace(data=DataConfig("digits", n_train=32, n_test=16, n_poison=0),
                              model=ModelConfig("resnet20", widths=(2, 2, 2))),
                  tmp_path, progress=False)
    r = CliRunner().invoke(main, ["--root", str(tmp_path), "landscape", "a", "--other", "b",
                                  "--dim", "1", "--points", "3", "--device", "cpu"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "has BatchNorm" in r.output and "minefield connect" in r.output
    assert not list((tmp_path / "a").glob("landscape/*"))


def test_a_checkpoint_centre_is_the_runs_own_file_keyed_by_its_content(tmp_path):
    from minefield.landscape import LandscapeConfig
    from minefield.runs import RunError
    from minefield.stages import landscape_run
    train_run(tiny_config("a"), tmp_path, progress=False)
    other = train_run(tiny_config("o", seed=1), tmp_path, progress=False)
    outside = str(other.run.path / "trajectory" / "step_00000060.safetensors")
    for bad in (outside, "../o/trajectory/step_00000060.safetensors", "trajectory/nope"):
        with pytest.raises(RunError, match="inside run a"):
            landscape_run("a", LandscapeConfig(dim=1, points=3, checkpoint=bad), root=tmp_path)
    cfg = LandscapeConfig(dim=1, points=3, checkpoint="trajectory/step_00000040.safetensors")
    first = landscape_run("a", cfg, root=tmp_path, device="cpu")
    assert first.config["centre"].startswith("trajectory/step_00000040.safetensors:")
    train_run(tiny_config("a", seed=3), tmp_path, progress=False, force=True)
    again = landscape_run("a", cfg, root=tmp_path, device="cpu")  # recomputed, not reused
    assert again.config["centre"] != first.config["centre"]


@pytest.mark.parametrize("lo,hi,anchors", [(-1, 1, (0.0,)), (-0.5, 1.5, (0.0, 1.0)),
                                           (-2, 2, (0.0,))])
def test_axis_has_no_near_duplicate_of_an_anchor(lo, hi, anchors):
    # linspace lands 5.6e-17 off 0.0: the README's --points 41 grid was 42 x 42
    for points in (5, 21, 41, 51, 101):
        t = axis(lo, hi, points, anchors)
        assert bool((t.diff() > 1e-6 * (hi - lo)).all())
        assert all(bool((t == a).any()) for a in anchors)


def test_a_model_with_a_nan_weight_gives_one_line_not_a_nan_landscape(tmp_path):
    """Regression: a centre (or the other end) with a NaN weight was drawn: a landscape of
    NaN losses and constant accuracies, written with exit status 0."""
    model, a, b, data = _setup()
    a["0.weight"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="the centre has NaN or infinite weights"):
        slice_1d(model, a, line_direction(b, b), torch.tensor([0.0, 1.0]), data)
    with pytest.raises(ValueError, match="the direction has NaN or infinite weights"):
        slice_1d(model, b, line_direction(b, a), torch.tensor([0.0, 1.0]), data)
    with pytest.raises(ValueError, match="the centre has NaN or infinite weights"):
        surface(model, a, plane_directions(member(b, 0)), torch.zeros(2), torch.zeros(2), data)
    for name, seed in (("good", 0), ("bad", 1)):
        train_run(tiny_config(name, seed=seed), tmp_path, progress=False)
    run = Run.open("bad", tmp_path)
    last = run.trajectory()[-1]
    ck = run.load_checkpoint(last)
    ck.params["0.weight"][0, 0, 0] = float("nan")
    tensors, meta = load_tensors(last)
    run.save_checkpoint(str(last.relative_to(run.path)), ck.params, ck.buffers, meta)
    for args in (["bad"], ["bad", "--dim", "2"], ["good", "--other", "bad"]):
        r = CliRunner().invoke(main, ["--root", str(tmp_path), "landscape", *args,
                                      "--points", "3", "--device", "cpu"])
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert "holds NaN or infinite weights at member(s) [0]" in r.output
    assert not list(tmp_path.glob("*/landscape/*"))


def test_an_empty_split_is_refused_not_drawn_as_nan(tmp_path):
    """Regression: --splits poison on a run without poison points wrote (and plotted) a
    landscape whose every value was NaN, with exit status 0."""
    model, a, b, data = _setup()  # n_poison=0
    with pytest.raises(ValueError, match="the data have no poison points"):
        slice_1d(model, a, line_direction(a, b), torch.tensor([0.0, 1.0]), data,
                 splits=("train", "poison"))
    with pytest.raises(ValueError, match="the data have no poison points"):
        surface(model, a, plane_directions(member(a, 0)), torch.zeros(2), torch.zeros(2), data,
                splits=("poison",))
    cfg = tiny_config("np")
    train_run(cfg.replace(data=cfg.data.replace(n_poison=0)), tmp_path, progress=False)
    for dim in ("1", "2"):
        r = CliRunner().invoke(main, ["--root", str(tmp_path), "landscape", "np", "--dim", dim,
                                      "--points", "3", "--splits", "poison", "--device", "cpu"])
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert "no poison points" in r.output
    assert not list(tmp_path.glob("np/landscape/*"))


def test_a_line_to_a_run_of_another_architecture_is_refused(tmp_path):
    """Regression: `landscape a --other b` with b a tanh net of a's shapes (a: ReLU) put b's
    weights into a's ReLU net, so 'the loss at t = 1' was 0.0357 where b's own is 0.0089."""
    train_run(tiny_config("a"), tmp_path, progress=False)
    cfg = tiny_config("b", seed=1)
    train_run(cfg.replace(model=cfg.model.replace(activation="leaky_relu")), tmp_path,
              progress=False)
    r = CliRunner().invoke(main, ["--root", str(tmp_path), "landscape", "a", "--other", "b",
                                  "--points", "3", "--device", "cpu"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "different model (model.activation" in r.output and "landscape --other" in r.output
    assert not list(tmp_path.glob("a/landscape/*"))


def test_an_empty_or_zero_length_line_is_refused(tmp_path):
    """Regression: `--other ''` drew random directions as if no --other were given, and
    `landscape a --other a` wrote a line of length 0 without a word."""
    train_run(tiny_config("a"), tmp_path, progress=False)
    base = ["--root", str(tmp_path), "landscape", "a", "--points", "3", "--device", "cpu"]
    r = CliRunner().invoke(main, [*base, "--other", ""])
    assert r.exit_code == 2 and "--other needs a run name" in r.output, r.output
    r = CliRunner().invoke(main, [*base, "--other", "a"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "holds the same weights as the centre" in r.output
    assert not list(tmp_path.glob("a/landscape/*"))
    first = sorted((tmp_path / "a").glob("trajectory/step_*.safetensors"))[0].name
    r = CliRunner().invoke(main, [*base, "--other", "a", "--checkpoint", f"trajectory/{first}"])
    assert r.exit_code == 0, r.output  # an earlier checkpoint of the same run: a real line


def test_a_line_measures_model_b_itself_at_t_1(tmp_path):
    # regression: the line was a + t (b - a); in float32 a + 1 * (b - a) is not b (both
    # the difference and the sum round), so t = 1 measured a model 1 ulp off b. Here a
    # train point sits exactly on b's decision boundary (logit 0: class 0), and the
    # rounded bias put it on the other side: the line's train accuracy at t = 1 was not b's.
    runs = {}
    for name, seed in (("a", 0), ("b", 1)):
        cfg = tiny_config(name, seed=seed, steps=20)
        runs[name] = train_run(cfg.replace(model=cfg.model.replace(widths=())), tmp_path,
                               progress=False).run
    model, p, _, data, _ = load_run_model(runs["b"])
    x0 = float(data.x_train[0, 0])
    wb, bb = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[-x0]])  # logit of point 0: 0
    ba = next(c for c in torch.linspace(-3, 3, 601).tolist()  # a bias whose line rounds up
              if float(torch.tensor([c]) + (bb[0] - torch.tensor([c]))) > float(bb))
    for name, bias in (("a", torch.tensor([[ba]])), ("b", bb)):
        path = runs[name].trajectory()[-1]
        tensors, meta = load_tensors(path)
        save_tensors(path, {**tensors, "param.0.weight": wb, "param.0.bias": bias}, meta)
    _, pb, _, _, _ = load_run_model(runs["b"])
    own = evaluate_members(model, pb, data)
    s = landscape_run(runs["a"], LandscapeConfig(other="b", points=5), root=tmp_path,
                      device="cpu")
    for k in ("train_acc", "test_acc"):
        assert s.values[k][s.ts == 1].item() == own[k][0].item(), k


def test_a_surface_made_by_tasks_carries_the_same_config(tmp_path):
    # regression: with an executor the returned surface's config was the LandscapeConfig
    # alone, without the centre's fingerprint that the serial path (and the file) holds
    from minefield.executor import make_executor

    run = train_run(tiny_config("a"), tmp_path, progress=False).run
    cfg = LandscapeConfig(dim=2, points=3)
    serial = landscape_run(run, cfg, tag="serial", device="cpu")
    tasks = landscape_run(run, cfg, tag="tasks", device="cpu", executor=make_executor("local"))
    assert tasks.config == serial.config and "centre" in tasks.config
    assert all(torch.equal(tasks.values[k], serial.values[k]) for k in serial.values)


def test_coordinates_beyond_the_parameters_range_are_refused_not_drawn_as_nan(tmp_path):
    """Regression: ``--span=1e39,2e39`` is finite in float64, so it passed, but t = 1e39 is
    inf in the run's float32: every point but the centre was NaN, saved with exit 0 and
    drawn with accuracy 0.5 (what a NaN logit predicts)."""
    model, a, b, data = _setup()
    f32 = {k: v.float() for k, v in a.items()}
    d = line_direction(f32, {k: v.float() for k, v in b.items()})
    with pytest.raises(ValueError, match="each finite in float32"):
        slice_1d(model, f32, d, torch.tensor([0.0, 1e39], dtype=torch.float64), data)
    with pytest.raises(ValueError, match="each finite in float32"):
        surface(model, f32, plane_directions(member(f32, 0)), torch.zeros(1),
                torch.tensor([1e39], dtype=torch.float64), data)
    slice_1d(model, a, line_direction(a, b), torch.tensor([0.0, 1e39], dtype=torch.float64),
             data)  # float64 parameters: a number
    train_run(tiny_config("good"), tmp_path, progress=False)
    r = CliRunner().invoke(main, ["--root", str(tmp_path), "landscape", "good", "--points", "3",
                                  "--span=1e39,2e39", "--device", "cpu"])
    assert r.exit_code == 2 and "--span needs two finite numbers (float32" in r.output, r.output
    assert not (tmp_path / "good" / "landscape").exists()
