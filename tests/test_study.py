"""Studies: planning (stacks, checks), the per-stack task, the table, the CLI's bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_config

from minefield.basin import VolumeConfig
from minefield.cli import main
from minefield.config import ConfigError
from minefield.measures import SharpnessConfig
from minefield.runs import Run, RunError
from minefield.stages import train_run
from minefield.stages.study import load_study, run_stack, run_stacks, stack_rows, study_run
from minefield.study import MAX_CHECKPOINTS, STACKABLE, StackSpec, StudyConfig, plan_study

VOL = VolumeConfig(n_directions=3, n_bootstrap=10)
# tiny nets have radii at r_max; the table counts them (n_at_r_max)
pytestmark = pytest.mark.filterwarnings("ignore::minefield.basin.BasinWarning")


def study(**kw) -> StudyConfig:
    return StudyConfig(volume=VOL, **kw)


# --- planning ----------------------------------------------------------------------------


def test_plan_stacks_members_that_differ_only_in_stackable_fields():
    base = tiny_config("s")
    plan = plan_study(base, study(grid={"train.batch_size": [8, 16], "train.seed": [0, 1],
                                        "poison.beta": [0.0, 0.3], "train.l2": [0.0, 1e-3]}))
    assert len(plan.stacks) == 2 and len(plan.points) == 16
    for spec, bs in zip(plan.stacks, (8, 16)):
        assert spec.config.train.batch_size == bs and spec.config.train.members == 8
        assert spec.config.name == spec.name and spec.steps == (base.train.steps,)
        assert set(spec.train_kwargs()) == set(STACKABLE.values())
        assert sorted(m["train.l2"] for m in spec.members) == [0.0] * 4 + [1e-3] * 4
        # the shared config keeps the base's stackable values: members carry their own
        assert spec.config.train.seed == base.train.seed and spec.config.poison.beta == 0.0
    assert len({s.name for s in plan.stacks}) == 2
    # learning rates and SAM radii stack too: one stack, each member its own value
    sam = base.replace(train=base.train.replace(sam="sam"))
    (spec,) = plan_study(sam, study(grid={"train.lr": [0.01, 0.1], "train.rho": [0.0, 0.05]})
                         ).stacks
    assert sorted(spec.train_kwargs()["lrs"]) == [0.01, 0.01, 0.1, 0.1]
    assert sorted(spec.train_kwargs()["rhos"]) == [0.0, 0.0, 0.05, 0.05]


def test_plan_sets_a_points_fields_together_in_any_order():
    """Set one at a time, a point's fields met the base's values half way: the README's
    SAM grid on a SAM base (sam = none beside the base's rho 0.05) and asam_eta before
    sam were refused, naming combinations no point asked for."""
    base = tiny_config("s", optimizer="sgd", sam="sam", rho=0.05)
    grid = json.loads(open("docs/studies/sam.json").read())
    plan = plan_study(base, study(points=tuple(grid["points"]), grid=grid["grid"]))
    assert len(plan.points) == 25 and [len(s.members) for s in plan.stacks] == [5, 10, 10]
    none, sam, asam = (s.config.train for s in plan.stacks)
    assert (none.sam.value, none.rho, sam.sam.value, sam.rho) == ("none", 0.0, "sam", 0.05)
    assert asam.sam.value == "asam" and sorted({m["train.rho"] for m in plan.stacks[2].members}
                                               ) == [0.5, 1.0]
    for pts in ([{"train.sam": "none", "train.rho": 0.0}],
                [{"train.rho": 0.0, "train.sam": "none"}]):
        (spec,) = plan_study(base, study(points=tuple(pts))).stacks
        assert (spec.config.train.sam.value, spec.config.train.rho) == ("none", 0.0)
    plain = tiny_config("s", optimizer="sgd")
    a, b = (plan_study(plain, study(grid=g)).stacks[0].config.train for g in (
        {"train.sam": ["asam"], "train.asam_eta": [0.05]},
        {"train.asam_eta": [0.05], "train.sam": ["asam"]}))
    assert a == b and (a.sam.value, a.asam_eta) == ("asam", 0.05)
    # a point that is really invalid is still refused, naming the point
    with pytest.raises(ConfigError, match=r'^study: the point \{"train.sam": "none"\} is not a '
                       r"valid config: train.rho and train.sam_m need train.sam = sam or asam"):
        plan_study(base, study(grid={"train.sam": ["none"]}))


def test_plan_puts_steps_on_one_trajectory_with_a_checkpoint_at_each():
    plan = plan_study(tiny_config("s"), study(grid={"train.steps": [0, 20, 50],
                                                    "train.batch_size": [8, 16]}))
    assert len(plan.stacks) == 2
    for spec in plan.stacks:
        assert spec.steps == (0, 20, 50) and spec.config.train.steps == 50
        assert spec.config.train.checkpoint_every == 10 and len(spec.members) == 1


def test_plan_accepts_a_list_of_points():
    plan = plan_study(tiny_config("s"), study(points=(
        {"train.lr": 0.01, "model.widths": [4]}, {"train.lr": 0.1, "model.widths": [4, 4]})))
    assert [s.config.model.widths for s in plan.stacks] == [(4,), (4, 4)]
    assert plan.points[1] == {"train.lr": 0.1, "model.widths": [4, 4]}


def test_stack_spec_travels_as_json():
    (spec,) = plan_study(tiny_config("s"), study(grid={"train.seed": [0, 1]},
                                                 sharpness=SharpnessConfig(measures=("trace",)))
                         ).stacks
    assert StackSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("grid, match", [
    ({"train.lrr": [0.1]}, r"unknown field 'train.lrr' \(did you mean train.lr\?\)"),
    ({"lr": [0.1]}, r"unknown field 'lr' \(did you mean train.lr\?\)"),
    ({"model.depth": [2]}, "unknown field 'model.depth'"),
    ({"train.members": [2]}, "train.members is set by the study itself"),
    ({"train.lr": ["fast"]}, r"study: train.lr: expected a number, got 'fast'"),
    ({"train.batch_size": [1.5]}, "study: train.batch_size: expected an integer"),
    ({"model.widths": [8]}, "study: model.widths: expected a list"),
    ({"train.optimizer": ["sgdd"]}, "'sgdd' is not one of"),
    ({"train.lr": [-1.0]}, r"train.lr must be > 0"),
    ({"train.lr": [0.1, 0.1]}, "appears more than once"),
    ({"train.lr": []}, "needs a non-empty list"),
    ({"train.lr": 0.1}, "needs a non-empty list"),
    ({}, "the grid is empty"),
    ({"train.steps": [1, 2 * MAX_CHECKPOINTS + 1]}, "more than 2000"),
])
def test_bad_grids_raise_one_clear_config_error(grid, match):
    with pytest.raises(ConfigError, match=match):
        plan_study(tiny_config("s"), study(grid=grid))


def test_points_cross_the_grid():
    plan = plan_study(tiny_config("s"), study(
        points=({"train.optimizer": "sgd", "train.lr": 0.1},
                {"train.optimizer": "adam", "train.lr": 0.01}),
        grid={"train.seed": [0, 1, 2]}))
    assert plan.design == ["train.optimizer", "train.lr", "train.seed"]
    assert len(plan.points) == 6 and [len(s.members) for s in plan.stacks] == [3, 3]
    assert plan.stacks[1].config.train.optimizer.value == "adam"


def test_bad_point_lists_raise():
    with pytest.raises(ConfigError, match="train.lr is in both the points and the grid"):
        study(grid={"train.lr": [0.1]}, points=({"train.lr": 0.1},))
    with pytest.raises(ConfigError, match="study: point 1, train.lr: expected a number"):
        plan_study(tiny_config("s"), study(points=({"train.lr": 0.1}, {"train.lr": "x"})))
    with pytest.raises(ConfigError, match="name the same fields"):
        study(points=({"train.lr": 0.1}, {"train.l2": 0.1}))
    with pytest.raises(ConfigError, match="target must be"):
        study(grid={"train.lr": [0.1]}, target="acc")
    with pytest.raises(ConfigError, match="must be an object"):
        study(grid=[("train.lr", [0.1])])


# --- the task and the study --------------------------------------------------------------


def test_a_stacked_member_equals_its_own_single_run(tmp_path):
    base = tiny_config("s", steps=30)
    plan = plan_study(base, study(grid={"train.seed": [3, 4], "train.l2": [0.0, 0.01]}))
    (spec,) = plan.stacks
    run_stack(spec, tmp_path)
    rows = stack_rows(spec, tmp_path, plan.design)
    for row in rows:
        # one model alone: init seed = the member's seed, its l2, minibatches of the base
        single = base.replace(name=f"one-{row['member']}", train=base.train.replace(
            l2=row["train.l2"]))
        res = train_run(single, tmp_path, progress=False, seeds=[row["train.seed"]])
        assert row["train_loss"] == pytest.approx(res.metrics["train_loss"][0], abs=1e-5)
        assert row["weight_norm"] == pytest.approx(res.metrics["weight_norm"][0], rel=1e-5)
    # l2 acts per member: the penalised members end with smaller weights
    norm = {(r["train.seed"], r["train.l2"]): r["weight_norm"] for r in rows}
    assert all(norm[(s, 0.01)] < norm[(s, 0.0)] for s in (3, 4))


def test_a_checkpoint_of_a_long_run_is_the_short_run(tmp_path):
    base = tiny_config("s")
    plan = plan_study(base, study(grid={"train.steps": [20, 40]}))
    (spec,) = plan.stacks
    run_stack(spec, tmp_path)
    short = plan_study(base, study(grid={"train.steps": [20]})).stacks[0]
    run_stack(short, tmp_path)
    long_rows = stack_rows(spec, tmp_path, plan.design)
    short_row = stack_rows(short, tmp_path, plan.design)[0]
    assert long_rows[0]["step"] == 20 and long_rows[1]["step"] == 40
    for k in ("train_loss", "test_acc", "weight_norm", "mean_radius", "log10_volume"):
        assert long_rows[0][k] == short_row[k]


def test_a_stack_of_other_models_under_the_same_name_is_not_reused(tmp_path):
    """models.json keys how models are measured; what they are is the run's config.json:
    a stack spec with other data under the same name refuses, it does not return the
    old file."""
    (spec,) = plan_study(tiny_config("s", steps=20), study(grid={"train.seed": [0]})).stacks
    run_stack(spec, tmp_path)
    (other,) = plan_study(tiny_config("s", steps=20).replace(
        data=tiny_config().data.replace(n_train=30)), study(grid={"train.seed": [0]})).stacks
    other = dataclasses.replace(other, name=spec.name,
                                config=other.config.replace(name=spec.config.name))
    with pytest.raises(RunError, match="not finished for this study"):
        stack_rows(other, tmp_path, [])
    with pytest.raises(RunError, match="exists with a different config"):
        run_stack(other, tmp_path)


def test_study_writes_a_tidy_table_and_scores_and_resumes(tmp_path):
    base = tiny_config("st", steps=20)
    cfg = study(grid={"train.lr": [0.02, 0.2], "train.seed": [0, 1], "poison.beta": [0.0, 0.5]},
                sharpness=SharpnessConfig(measures=("lambda_max",)))
    res = study_run(base, cfg, tmp_path, progress=False)
    df = pd.read_csv(tmp_path / "st" / "study.csv")
    assert len(df) == 8 and {"train.lr", "train.seed", "poison.beta", "gap", "mean_radius",
                             "log10_volume", "lambda_max", "stack"} <= set(df.columns)
    assert ((df["gap"] - (df["train_acc"] - df["test_acc"])).abs() <= 1e-12).all()  # rounded
    scores = pd.read_csv(tmp_path / "st" / "scores.csv")
    assert list(scores["measure"]) == res.measures and "lambda_max" in res.measures
    assert {"kendall_tau", "granulated_tau", "psi_train.lr", "psi_poison.beta", "cmi"} <= set(
        scores.columns)
    # three hyper-parameters in a complete grid: the CMI is defined
    assert scores["cmi"].notna().all()
    models = [tmp_path / "st" / "stacks" / s / "models.json" for s in df["stack"].unique()]
    stamps = [p.stat().st_mtime_ns for p in models]
    again = study_run(base, cfg, tmp_path, progress=False)
    assert again.rows == res.rows and [p.stat().st_mtime_ns for p in models] == stamps
    assert load_study("st", tmp_path).scores == res.scores
    with pytest.raises(Exception, match="different config"):
        study_run(base, study(grid={"train.lr": [0.02]}), tmp_path, progress=False)


def test_median_radius_is_the_median_of_the_stored_radii(tmp_path):
    """2K radii are an even count: the median is the mean of the two middle ones (torch's
    ``median()`` is the lower one); the study's and the sweep's tables agree."""
    import statistics

    from minefield.basin import BasinResult
    from minefield.sweep import sweep_rows

    (spec,) = plan_study(tiny_config("md", steps=20), study(grid={"train.seed": [0, 1]})).stacks
    path = run_stack(spec, tmp_path)
    at = json.loads(path.read_text())["steps"]["20"]
    rows = stack_rows(spec, tmp_path, [])
    basins = [BasinResult.from_dict(b) for b in at["basins"]]
    swept = sweep_rows([(0.0, 0), (0.0, 1)], at["metrics"], basins)
    for row, sw, b in zip(rows, swept, at["basins"]):
        assert len(b["radii"]) == 6
        assert row["median_radius"] == sw["median_radius"] == statistics.median(b["radii"])
    assert BasinResult.from_dict({**at["basins"][0], "radii": [1.0, 4.0, 2.0, 3.0]}
                                 ).median_radius == 2.5


def test_a_partial_task_resumes_from_its_last_measured_step(tmp_path):
    (spec,) = plan_study(tiny_config("s"), study(grid={"train.steps": [20, 40, 60]})).stacks
    path = run_stack(spec, tmp_path)
    full = json.loads(path.read_text())
    partial = {**full, "complete": False, "steps": {"20": full["steps"]["20"]}}
    path.write_text(json.dumps(partial))
    with pytest.raises(RunError, match="is not finished for this study"):
        stack_rows(spec, tmp_path, [])
    with pytest.raises(RunError, match="has no study results"):
        load_study(path.parent)
    run_stack(spec, tmp_path)
    assert json.loads(path.read_text()) == full


def test_a_diverged_stack_is_a_row_of_nan_not_the_end_of_the_study(tmp_path):
    base = tiny_config("dv", steps=20, optimizer="sgd")
    points = ({"train.lr": 0.05, "train.batch_size": 16},
              {"train.lr": 1e12, "train.batch_size": 32})  # two stacks: one diverges
    res = study_run(base, study(points=points), tmp_path, progress=False)
    ok, bad = res.rows
    assert not ok["diverged"] and ok["test_acc"] > 0.5
    assert bad["diverged"] and math.isnan(bad["gap"]) and math.isnan(bad["test_acc"])
    assert all(s["n"] == 1 for s in res.scores)
    models = tmp_path / "dv" / "stacks" / bad["stack"] / "models.json"
    stamp = models.stat().st_mtime_ns
    study_run(base, study(points=points), tmp_path, progress=False)
    assert models.stat().st_mtime_ns == stamp  # not retrained on resume


def test_a_diverging_member_leaves_the_other_members_of_its_stack_as_they_are_alone(tmp_path):
    """lr is stackable: a study over lr that meets a diverging lr keeps the healthy
    models' numbers (those of their own stack, bit for bit when isolated); the diverged
    member is NaN from the step it diverged, its earlier checkpoints measured as usual."""
    base = tiny_config("dm", steps=40, optimizer="sgd", log_every=1, checkpoint_every=5,
                       isolate=True, batch_size=16)
    cfg = study(grid={"train.lr": [0.05, 1e6], "train.seed": [0, 1], "train.steps": [1, 40]})
    res = study_run(base, cfg, tmp_path, progress=False)
    alone = study_run(base.replace(name="dm1"), study(grid={
        "train.lr": [0.05], "train.seed": [0, 1], "train.steps": [1, 40]}), tmp_path,
        progress=False)
    assert len({r["stack"] for r in res.rows}) == 1  # all 8 models in one stack
    healthy = [r for r in res.rows if r["train.lr"] == 0.05]
    skip = ("stack", "member")
    assert [{k: v for k, v in r.items() if k not in skip} for r in healthy] == [
        {k: v for k, v in r.items() if k not in skip} for r in alone.rows]
    bad = {r["step"]: r for r in res.rows if r["train.lr"] == 1e6 and r["train.seed"] == 0}
    assert not bad[1]["diverged"] and math.isfinite(bad[1]["train_loss"])
    assert bad[40]["diverged"] and math.isnan(bad[40]["gap"])
    # scored: 4 healthy rows + the 2 at step 1, before they diverged (volumes: -inf at lr 1e6)
    assert {s["measure"]: s["n"] for s in res.scores}["weight_norm"] == 6


def test_the_executor_is_one_pluggable_loop(tmp_path):
    seen = []

    def backwards(specs, root):  # any executor: here the tasks run in reverse order
        seen.extend(s.name for s in specs)
        run_stacks(list(reversed(specs)), root)

    base = tiny_config("ex", steps=10)
    cfg = study(grid={"train.batch_size": [8, 16]})
    res = study_run(base, cfg, tmp_path, progress=False, run_all=backwards)
    assert seen == [r["stack"] for r in res.rows]
    ref = study_run(base.replace(name="ex2"), cfg, tmp_path, progress=False)
    strip = [{k: v for k, v in r.items()} for r in ref.rows]
    assert [r["test_acc"] for r in res.rows] == [r["test_acc"] for r in strip]


# --- the command line ------------------------------------------------------------------


def _cli(root, *args):
    return CliRunner().invoke(main, ["--root", str(root), "study", "--name", "c", "--dataset",
                                     "blobs", "--n-train", "40", "--n-test", "40", "--widths",
                                     "8", "--steps", "10", "--directions", "2", "-q", *args])


@pytest.mark.parametrize("args, match", [
    (("--vary", "train.lrr=0.1,0.2"), "unknown field 'train.lrr'"),
    # float(10**400) was "unexpected error OverflowError ... (this is a bug)"
    (("--vary", "train.lr=1" + "0" * 400), "train.lr: 100000000000... is too large"),
    ((), "the grid is empty"),
    (("--vary", "train.lr=fast,0.1"), "train.lr: expected a number, got 'fast'"),
    # 2**32 and -1 trained the models of seeds 0 and 2**32-1 again (counted twice in every
    # score); 2**64 overflowed in torch
    (("--vary", "train.seed=0,4294967296"), "train.seed must be in [0, 2**32), got 4294967296"),
    (("--vary", "train.seed=-1,0"), "train.seed must be in [0, 2**32), got -1"),
    (("--vary", "train.seed=18446744073709551616"), "train.seed must be in [0, 2**32)"),
    (("--vary", "model.widths=3"), "model.widths: expected a list"),
    (("--vary", "train.lr"), "expected FIELD=V1,V2"),
    (("--vary", "train.steps=10:0:5"), "needs step >= 1 and b >= a"),
    (("--vary", "train.steps=0:x:5"), "expected integers a:b:step"),
    (("--vary", "train.lr=0.1", "--vary", "train.lr=0.2"), "train.lr is varied twice"),
    # what only the data or the model can check: still before anything is written
    (("--vary", "data.name=blobs,nosuch"), "unknown dataset 'nosuch'"),
    (("--vary", "model.name=mlp,nosuch"), "unknown model 'nosuch'"),
    (("--vary", "model.name=mlp,resnet20"), "resnet20"),
    (("--vary", "data.n_train=40,0"), "n_train"),
    (("--beta", "0.3", "--vary", "data.n_poison=40,0"), "needs a poison set"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, match):
    root = tmp_path / "runs"
    res = _cli(root, "--figures", str(tmp_path / "fig"), *args)
    assert res.exit_code != 0 and match in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert "Traceback" not in res.output and len(errors) == 1
    assert not root.exists() and not (tmp_path / "fig").exists()


@pytest.mark.parametrize("text, match", [
    ("{not json", "is not valid JSON"), ("3", "must hold an object"),
    # a misspelt "points" beside "grid" was read as a grid field named "grid"
    ('{"point": [{"lr": 0.1}], "grid": {"seed": [0, 1]}}', "unknown key(s) ['point']"),
    # json kept the last of a repeated field: one axis silently dropped
    ('{"train.lr": [0.1], "train.lr": [0.2]}', "gives the key(s) train.lr twice")])
def test_cli_bad_grid_file_is_one_line(tmp_path, text, match):
    grid = tmp_path / "grid.json"
    grid.write_text(text)
    res = _cli(tmp_path / "runs", "--grid", str(grid))
    assert res.exit_code == 1 and match in res.output and not (tmp_path / "runs").exists()


def test_per_member_l2_needs_one_coefficient_per_member(tmp_path):
    from minefield.data import load_dataset
    from minefield.models import build_model
    from minefield.train import fit, init_stack

    cfg = tiny_config("l2", members=2)
    with pytest.raises(ValueError, match="3 l2 coefficients for 2 members"):
        train_run(cfg, tmp_path, progress=False, l2s=[0.0, 0.1, 0.2])
    assert not (tmp_path / "l2").exists()
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.n_classes)
    with pytest.raises(ValueError, match=r"l2s and rhos >= 0"):
        fit(model, init_stack(model, "torch", [0, 1]), data, cfg.train, l2s=[0.1, -1.0])


def test_cli_runs_a_study_with_a_grid_file_and_redraws_it(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"train.lr": [0.02, 0.2], "train.seed": [0, 1]}))
    root, fig = tmp_path / "runs", tmp_path / "fig"
    res = _cli(root, "--grid", str(grid), "--measures", "lambda_max", "--figures", str(fig))
    assert res.exit_code == 0, res.output
    assert "lambda_max" in res.output and "Kendall tau" in res.output
    assert (fig / "c" / "lambda_max.png").exists() and (fig / "c" / "scores.png").exists()
    assert (fig / "c" / "groups.png").exists()  # two settings (lr) with two seeds each
    assert len(pd.read_csv(root / "c" / "study.csv")) == 4
    again = CliRunner().invoke(main, ["--root", str(root), "plot", "study", "c", "--figures",
                                      str(tmp_path / "f2")])
    assert again.exit_code == 0 and (tmp_path / "f2" / "c" / "mean_radius.png").exists()
    assert Run.open(root / "c").config["kind"] == "study"
    # a hand-edited study.json: one "corrupt" line ("unexpected error KeyError: 'gap' (this
    # is a bug ...)" before, or an empty <measure>.png for a measure with no column)
    path = root / "c" / "study.json"
    saved = json.loads(path.read_text())
    for edit, why in ((lambda d: d["rows"][0].pop("gap"), "row 0 has no gap"),
                      (lambda d: d["rows"][1].pop("train.lr"), "row 1 has no train.lr"),
                      (lambda d: d["measures"].append("nosuch"), "row 0 has no nosuch"),
                      (lambda d: d["rows"][2].update(lambda_max="x"), "row 2: lambda_max is"),
                      (lambda d: d["scores"][0].pop("kendall_tau"), "a score has only")):
        edited = json.loads(json.dumps(saved))
        edit(edited)
        path.write_text(json.dumps(edited))
        r = CliRunner().invoke(main, ["--root", str(root), "plot", "study", "c", "--figures",
                                      str(tmp_path / "f3")])
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert r.output.strip().startswith(f"Error: {path} is corrupt") and why in r.output
        assert "this is a bug" not in r.output and not (tmp_path / "f3").exists()


def test_cli_study_with_a_diverged_stack_reports_it_and_draws_the_figures(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"train.lr": 0.05, "train.batch_size": 16},
                                {"train.lr": 1e12, "train.batch_size": 32}]))
    fig = tmp_path / "fig"
    res = _cli(tmp_path / "runs", "--grid", str(grid), "--optimizer", "sgd", "--figures",
               str(fig))
    assert res.exit_code == 0, res.output
    assert "1 model(s) diverged" in res.output and "Kendall tau" in res.output
    assert (fig / "c" / "scores.png").exists()


def test_cli_trajectory_study_draws_the_trajectory(tmp_path):
    res = _cli(tmp_path / "runs", "--vary", "train.steps=0:10:5", "--figures",
               str(tmp_path / "fig"), "--measures", "lambda_max")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "fig" / "c" / "trajectory.png").exists()
    assert not (tmp_path / "fig" / "c" / "groups.png").exists()
    df = pd.read_csv(tmp_path / "runs" / "c" / "study.csv")
    assert list(df["step"]) == [0, 5, 10]
    assert torch.isfinite(torch.tensor(df["lambda_max"].values)).all()


def test_groups_figure_puts_each_model_at_its_setting():
    from types import SimpleNamespace

    from minefield.plotting.study import group_label, plot_groups

    rows = [{"train.sam": k, "train.rho": r, "train.seed": s, "test_acc": 0.9 + r + s / 100,
             "lambda_max": float("nan"), "diverged": False}
            for k, r in (("none", 0.0), ("sam", 0.05)) for s in (0, 1, 2)]
    rows.append({**rows[0], "train.seed": 3, "test_acc": float("nan"), "diverged": True})
    assert group_label(rows[3], ["train.sam", "train.rho"]) == "sam=sam, rho=0.05"
    fig = plot_groups(SimpleNamespace(rows=rows, design=["train.sam", "train.rho", "train.seed"]))
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["test_acc"]  # lambda_max: no finite value
    ax = shown[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sam=none, rho=0.0",
                                                           "sam=sam, rho=0.05"]
    from matplotlib.collections import PathCollection

    dots = [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]
    xs = sorted((float(x), round(float(y), 12)) for d in dots for x, y in d)
    assert xs == [(0.0, 0.9), (0.0, 0.91), (0.0, 0.92), (1.0, 0.95), (1.0, 0.96), (1.0, 0.97)]


def test_study_figures_say_how_many_models_have_log10_volume_minus_inf():
    """Models with a basin of radius 0 (log10 V = -inf) were silently missing from the
    volume figures (an empty axes when all were), and groups.png averaged the others."""
    from types import SimpleNamespace

    from matplotlib.collections import LineCollection

    from minefield.plotting.study import plot_groups, plot_measure

    inf = float("-inf")
    rows = [{"train.lr": lr, "train.seed": s, "gap": 0.1 * s + lr, "test_acc": 0.8,
             "log10_volume": v, "diverged": False}
            for lr, vs in ((0.1, (inf, -3.0, -5.0)), (0.2, (-2.0, -4.0, -6.0)))
            for s, v in enumerate(vs)]
    res = SimpleNamespace(rows=rows, design=["train.lr", "train.seed"], scores=[])
    texts = [t.get_text() for t in plot_measure(res, "log10_volume").texts]
    assert texts == ["1 of 6 models not drawn: log10_volume = -inf (a volume of 0)"]
    every = SimpleNamespace(**{**vars(res), "rows": [{**r, "log10_volume": inf} for r in rows]})
    texts = [t.get_text() for t in plot_measure(every, "log10_volume").texts]
    assert texts == ["all 6 models have log10_volume = -inf (a volume of 0): nothing to draw"]
    assert len(plot_measure(res, "test_acc").texts) == 0
    from minefield.plotting.sweep import plot_sweep_geometry  # the sweep's volume too

    sweep = SimpleNamespace(rows=[{**r, "beta": r["train.lr"]} for r in rows], spearman={})
    assert [t.get_text() for t in plot_sweep_geometry(sweep, "gap", "log10_volume").texts] == [
        "1 of 6 models not drawn: log10_volume = -inf (a volume of 0)"]
    for r, n_inf in ((res, [1, 0]), (every, [3, 3])):
        (ax,) = [a for a in plot_groups(r).axes if a.get_title() == "log10_volume"]
        assert [t.get_text() for t in ax.texts] == [f"{k} at\n-inf" for k in n_inf if k]
        # a bar only where every replicate is finite: lr 0.2's mean -4, never lr 0.1's -4
        bars = [seg for c in ax.collections if isinstance(c, LineCollection)
                for seg in c.get_segments()]
        assert [(float(b[0][0]), float(b[0][1])) for b in bars] == (
            [(0.7, -4.0)] if n_inf[1] == 0 else [])


def test_a_study_refuses_m_larger_than_a_stacks_training_set_at_plan_time(tmp_path):
    sharp = SharpnessConfig(measures=("lambda_max", "m_sharpness"), m=30)
    base = tiny_config("mm")
    plan_study(base, study(grid={"train.seed": [0]}, sharpness=sharp))  # 40 points: fine
    grid = {"train.seed": [0], "data.n_train": [40, 20]}
    with pytest.raises(ConfigError, match=r"m must be in \[1, 20\].*got 30"):
        study_run(base, study(grid=grid, sharpness=sharp), tmp_path, progress=False)
    assert not (tmp_path / "mm").exists()


def test_sharpness_of_a_study_points_at_its_stacks(tmp_path):
    study_run(tiny_config("sd", steps=10), study(grid={"train.seed": [0]}), tmp_path,
              progress=False)
    stack = next((tmp_path / "sd" / "stacks").iterdir()).name
    # regression: landscape and connect said "unknown key(s) base, kind, study", embed and
    # search "has no trajectory checkpoints; train it first"
    for cmd in (["sharpness", "sd", "--measures", "lambda_max"], ["basin", "sd"],
                ["landscape", "sd", "--points", "3"], ["connect", "sd", "sd"],
                ["embed", "sd"], ["search", "sd"]):
        before = sorted(p for p in tmp_path.rglob("*") if p.name != ".lock")
        res = CliRunner().invoke(main, ["--root", str(tmp_path), *cmd])
        assert sorted(p for p in tmp_path.rglob("*") if p.name != ".lock") == before, cmd
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert (f"sd is a study, not a trained run: its models are the runs of its stacks in "
                f"{tmp_path / 'sd' / 'stacks'} ({stack}); name one as in 'minefield --root "
                f"{tmp_path / 'sd' / 'stacks'} COMMAND STACK'") in res.output.replace("\n", "")
    res = CliRunner().invoke(main, ["--root", str(tmp_path / "sd" / "stacks"), "sharpness",
                                    stack, "--measures", "lambda_max"])
    assert res.exit_code == 0, res.output


def test_cli_options_the_grid_makes_meaningful_are_not_refused(tmp_path):
    # `train` refuses --momentum without sgd and --gamma without milestones (ignored);
    # in a study the grid may supply the optimizer or the milestones
    grid = tmp_path / "grid.json"
    grid.write_text('{"train.milestones": [[5], [8]]}')
    res = _cli(tmp_path / "runs", "--grid", str(grid), "--gamma", "0.5", "--momentum", "0.5",
               "--vary", "train.optimizer=sgd,adam", "--figures", str(tmp_path / "fig"))
    assert res.exit_code == 0, res.output


def test_cli_study_over_steps_with_a_diverged_model_draws_its_figures(tmp_path):
    # diverged rows carry every measured column (NaN): the trajectory plot read
    # 'mean_radius' from them and the study ended in a KeyError after its tables
    fig = tmp_path / "fig"
    res = _cli(tmp_path / "runs", "--optimizer", "sgd", "--batch-size", "16", "--log-every",
               "1", "--vary", "train.steps=2,4,6,12", "--vary", "train.lr=0.05,6e4",
               "--figures", str(fig))
    assert res.exit_code == 0, res.output
    assert "diverged" in res.output and any(fig.rglob("trajectory.png"))


def test_too_many_checkpoints_is_one_short_line():
    """The refusal had listed every step: 0:20000:1 made a 120 kB 'one line'."""
    with pytest.raises(ConfigError, match="20000 checkpoints") as e:
        plan_study(tiny_config("s"), study(grid={"train.steps": list(range(20001))}))
    assert len(str(e.value)) < 300


def test_one_value_spelt_two_ways_names_one_stack():
    """A base from Python with gamma=1 (an int) named another stack than gamma=1.0 (the
    digest hashed the JSON text "1" vs "1.0"): a rerun retrained every stack."""
    from minefield.config import TrainConfig

    base = tiny_config("s")
    names = [[st.name for st in plan_study(base.replace(train=TrainConfig(
        steps=10, gamma=g, milestones=ms)), study(grid={"train.batch_size": [8]})).stacks]
        for g, ms in ((1, [5]), (1.0, (5,)))]
    assert names[0] == names[1]


@pytest.mark.parametrize("text,want", [
    ("train.lr=0.01,0.1", ("train.lr", [0.01, 0.1])),
    ("model.widths=[16,16],[8]", ("model.widths", [[16, 16], [8]])),
    ('data.path="a,b",blobs', ("data.path", ["a,b", "blobs"])),  # a comma in a JSON string
    ('data.path="q\\",x",z', ("data.path", ['q",x', "z"])),  # an escaped quote inside it
    ("train.steps=0:4:2", ("train.steps", [0, 2, 4])),
    # a JSON string with two colons was read as a range a:b:step and refused
    ('data.data_dir="a:b:c"', ("data.data_dir", ["a:b:c"])),
])
def test_vary_splits_values_at_top_level_commas_only(text, want):
    from minefield.cli.study import parse_vary

    assert parse_vary(text) == want


def test_measure_figure_colours_a_numeric_field_in_numeric_order():
    """The colour field's values were sorted as JSON text: batch sizes 8, 16, 32, 128 ran
    128, 16, 32, 8 along the sequential colour map and in the legend."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt
    import numpy as np

    from minefield.plotting.study import plot_measure

    rows = [{"train.batch_size": b, "train.seed": s, "gap": b / 800 + s / 1000,
             "mean_radius": 1.0 / b} for b in (8, 16, 32, 128) for s in (0, 1)]
    res = SimpleNamespace(rows=rows, design=["train.batch_size", "train.seed"], scores=[])
    ax = plot_measure(res, "mean_radius")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        f"train.batch_size {b}" for b in (8, 16, 32, 128)]
    cmap = plt.get_cmap("viridis", 4)
    for k, (b, dots) in enumerate(zip((8, 16, 32, 128), ax.collections)):
        np.testing.assert_allclose(dots.get_facecolors()[0], cmap(k))
        np.testing.assert_allclose(dots.get_offsets()[:, 0], [b / 800, b / 800 + 0.001])


def test_study_figures_say_how_many_models_diverged():
    """A diverged model (a row of NaN) was dropped from the measure figures and from
    groups.png without a word: with lr 1e30 diverging in every seed, the figures showed
    half the study as if it were all of it (lr=1e+30 not on groups.png at all)."""
    from types import SimpleNamespace

    from minefield.plotting.study import plot_groups, plot_measure

    nan = float("nan")
    rows = [{"train.lr": lr, "train.seed": s, "diverged": lr > 1,
             "gap": nan if lr > 1 else 0.1 * s, "mean_radius": nan if lr > 1 else 0.2 + s,
             "test_acc": nan if lr > 1 else 0.9} for lr in (0.05, 1e30) for s in range(3)]
    res = SimpleNamespace(rows=rows, design=["train.lr", "train.seed"], scores=[])
    note = "3 of 6 models diverged (loss NaN/inf), not drawn: lr=1e+30 (3)"
    assert [t.get_text() for t in plot_measure(res, "mean_radius").texts] == [note]
    fig = plot_groups(res)
    assert fig.get_suptitle() == note
    fine = SimpleNamespace(rows=rows[:3], design=res.design, scores=[])
    assert len(plot_measure(fine, "mean_radius").texts) == 0
    assert plot_groups(fine).get_suptitle() == ""


def test_scores_figure_marks_a_nan_score_apart_from_a_zero_one():
    """A NaN tau got a bar of NaN width, which is not drawn: the same empty row as a
    tau of exactly 0."""
    from types import SimpleNamespace

    from minefield.plotting.study import plot_scores

    scores = [{"measure": "a", "kendall_tau": 0.0, "granulated_tau": float("nan")},
              {"measure": "b", "kendall_tau": 0.5, "granulated_tau": 0.25}]
    ax = plot_scores(SimpleNamespace(scores=scores))
    assert [(t.get_text(), t.get_position()[1]) for t in ax.texts] == [("NaN", 0.2)]
