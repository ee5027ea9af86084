"""Splitting a sweep or a study into tasks changes no number when members are isolated.

The oracle is the unsplit run: one stack, trained and measured in this process
(``sweep_run`` / ``study_run`` without an executor). Each split (one model per
task, two, all) must give the same table and the same weights, bit for bit. The
Ray executor is compared with the same oracle in ``test_executor.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from minefield import SweepConfig, VolumeConfig, sweep_run
from minefield.config import ConfigError
from minefield.executor import LocalExecutor, torch_threads
from minefield.measures import SharpnessConfig
from minefield.runs import Run
from minefield.stages import load_run_model
from minefield.stages.study import study_run
from minefield.study import StudyConfig, plan_study

pytestmark = pytest.mark.filterwarnings("ignore::minefield.basin.BasinWarning")

WHERE = ("stack", "member")  # where a model was trained, not what was measured


def isolated(tiny, name, **train):
    cfg = tiny(name, steps=40, **train)
    return cfg.replace(train=cfg.train.replace(isolate=True))


def sweep_cfg() -> SweepConfig:
    return SweepConfig(betas=(0.0, 0.1, 0.3), seeds=(0, 1),
                       volume=VolumeConfig(n_directions=4),
                       sharpness=SharpnessConfig(measures=("lambda_max",)))


def table(rows) -> str:
    """JSON text of the rows without the placement columns (NaN compares equal)."""
    return json.dumps([{k: v for k, v in r.items() if k not in WHERE} for r in rows],
                      sort_keys=True)


def final_weights(path) -> dict[str, torch.Tensor]:
    return load_run_model(Run.open(path))[1]


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


def test_sweep_split_into_1_2_or_all_tasks_equals_the_unsplit_sweep(tiny, tmp_path):
    base, sc = isolated(tiny, "sw"), sweep_cfg()
    whole = sweep_run(base, sc, tmp_path / "whole", progress=False)
    assert len(whole.rows) == 6 and "lambda_max" in whole.rows[0]
    for per in (1, 2, 6):
        split = sweep_run(base, sc, tmp_path / f"per{per}", progress=False,
                          models_per_task=per, executor=LocalExecutor())
        assert table(split.rows) == table(whole.rows), per
        assert json.dumps(split.spearman) == json.dumps(whole.spearman)
        assert same_bits(final_weights(tmp_path / f"per{per}/sw"),
                         final_weights(tmp_path / "whole/sw"))
        assert len(list((tmp_path / f"per{per}/sw/tasks").glob("*.safetensors"))) == 6 // per


def test_isolated_numbers_do_not_depend_on_threads(tiny, tmp_path):
    base, sc = isolated(tiny, "sw"), sweep_cfg()
    with torch_threads(1):
        one = sweep_run(base, sc, tmp_path / "one", progress=False, models_per_task=3)
    with torch_threads(2):
        two = sweep_run(base, sc, tmp_path / "two", progress=False, models_per_task=3)
        assert torch.get_num_threads() == 2  # restored after the isolated tasks
    assert table(one.rows) == table(two.rows)


def test_study_split_into_1_2_or_all_tasks_equals_the_unsplit_study(tiny, tmp_path):
    base = isolated(tiny, "st")
    cfg = StudyConfig(grid={"train.lr": [0.02, 0.05], "train.seed": [0, 1, 2]},
                      volume=VolumeConfig(n_directions=4))
    whole = study_run(base, cfg, tmp_path / "whole", progress=False)
    assert len(whole.rows) == 6 and len({r["stack"] for r in whole.rows}) == 1
    for per in (1, 2, 6):
        split = study_run(base, cfg, tmp_path / f"per{per}", progress=False,
                          models_per_task=per)
        assert len({r["stack"] for r in split.rows}) == 6 // per
        assert table(split.rows) == table(whole.rows), per
        assert json.dumps(split.scores) == json.dumps(whole.scores)


def test_a_split_of_batched_members_is_refused(tiny, tmp_path):
    base = tiny("sw", steps=40)
    with pytest.raises(ConfigError, match=r"models_per_task=2 splits the sweep's stack of 6 "
                                          r"models.*--isolate"):
        sweep_run(base, sweep_cfg(), tmp_path, progress=False, models_per_task=2)
    assert not (tmp_path / "sw").exists()
    cfg = StudyConfig(grid={"train.seed": [0, 1, 2]})
    with pytest.raises(ConfigError, match="models_per_task=2 splits a stack of 3 models"):
        plan_study(base, cfg, models_per_task=2)
    with pytest.raises(ConfigError, match="models_per_task must be >= 1, got 0"):
        plan_study(base, cfg, models_per_task=0)
    assert len(plan_study(base, cfg, models_per_task=3).stacks) == 1  # no split: batched ok


def test_isolate_is_left_out_of_old_configs(tiny):
    d = tiny().to_dict()
    assert "isolate" not in d["train"]  # configs saved before the field stay valid keys
    assert isolated(tiny, "x").to_dict()["train"]["isolate"] is True


def test_cli_refuses_a_split_without_isolate_in_one_line(tmp_path):
    from click.testing import CliRunner

    from minefield.cli import main

    args = ["--root", str(tmp_path / "runs"), "study", "--name", "st", "--dataset", "blobs",
            "--steps", "5", "--vary", "train.seed=0,1,2", "--models-per-task", "2"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        "Error: models_per_task=2 splits a stack of 3 models, which changes how their numbers "
        "round; isolate the members (train.isolate, --isolate) to split it"]
    assert not (tmp_path / "runs").exists()


def test_a_diverging_sweep_says_so_in_one_line_split_or_not(tiny, tmp_path):
    """Not 'models.json is corrupt ... use --force' (which --force repeated)."""
    from minefield.executor import TaskFailed
    from minefield.train import TrainingDiverged

    base = isolated(tiny, "dv", optimizer="sgd", lr=1e12)
    sc = SweepConfig(betas=(0.0, 0.3), seeds=(0,), volume=VolumeConfig(n_directions=2))
    for force in (False, True):
        with pytest.raises(TrainingDiverged, match=r"^loss became NaN/inf at step \d+; last"):
            sweep_run(base, sc, tmp_path, force=force, progress=False)
    with pytest.raises((TrainingDiverged, TaskFailed), match="loss became NaN/inf at step"):
        sweep_run(base.replace(name="dv1"), sc, tmp_path, progress=False, models_per_task=1)


@pytest.mark.parametrize("lo, hi, n, want", [
    # 6 decimals made 1e-7 a 0 ("beta 0 is given twice"), 0.9999999 a 1.0 (refused),
    # 1.1e-6 and 1.2e-6 one 1e-6 ("given twice") and 1.6e-6 a 2e-6 (silently)
    (1e-7, 0.1, 3, (0.0, 1e-7, 1e-4, 0.1)),
    (0.9999991, 0.9999999, 2, (0.0, 0.9999991, 0.9999999)),
    (1.1e-6, 1.2e-6, 2, (0.0, 1.1e-6, 1.2e-6)),
    (1.6e-6, 0.1, 2, (0.0, 1.6e-6, 0.1)),
    (0.001, 0.6, 3, (0.0, 0.001, 0.0244949, 0.6)),  # 6 significant digits between
    (0.1000001, 0.1000002, 3, (0.0, 0.1000001, 0.10000015, 0.1000002)),  # more where needed
])
def test_log_spaced_betas_keep_the_given_range_and_stay_distinct(lo, hi, n, want):
    from minefield.sweep import log_spaced_betas

    got = log_spaced_betas(lo, hi, n)
    assert got == want and SweepConfig(betas=got).betas == want


def test_a_beta_range_sweeps_and_prints_the_factors_asked_for(tmp_path):
    """0.9999999 was rounded to 1.0 and refused ("got [1.0]"); the table printed 1."""
    from click.testing import CliRunner

    from minefield.cli import main

    res = CliRunner().invoke(main, [
        "--root", str(tmp_path / "runs"), "sweep", "--name", "r", "--dataset", "blobs",
        "--n-train", "20", "--n-test", "20", "--n-poison", "20", "--widths", "4", "--steps",
        "2", "--beta-range", "0.9999991,0.9999999,2", "--seeds", "0", "--directions", "2",
        "-q", "--figures", str(tmp_path / "fig")])
    assert res.exit_code == 0, res.output
    assert [line.split()[0] for line in res.output.splitlines()[1:4]] == [
        "0.0", "0.9999991", "0.9999999"]


def test_log_spaced_betas_refuse_what_they_cannot_give():
    from minefield.sweep import log_spaced_betas

    for n in (2.7, float("nan"), 0, True):
        with pytest.raises(ConfigError, match=r"^need 0 < lo < hi < 1 and an integer n >= 1"):
            log_spaced_betas(0.001, 0.1, n)
    with pytest.raises(ConfigError, match=r"^3 factors in \[0.1, 0.10000000000000002\] are "
                                          r"not distinct floats"):
        log_spaced_betas(0.1, 0.10000000000000002, 3)


@pytest.mark.parametrize("split", [(), ("--isolate", "--models-per-task", "1")])
def test_a_sweep_refuses_a_member_seed_past_2_to_the_32(tmp_path, split):
    """--seed 4294967295 --seeds 0,1 gave member seed 2**32: seed 0's model again."""
    from click.testing import CliRunner

    from minefield.cli import main

    res = CliRunner().invoke(main, [
        "--root", str(tmp_path / "runs"), "sweep", "--name", "d", "--dataset", "blobs",
        "--widths", "4", "--steps", "5", "--betas", "0", "--seed", "4294967295", "--seeds",
        "0,1", "--directions", "2", "-q", "--figures", str(tmp_path / "fig"), *split])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1] == (
        "Error: sweep: seed 4294967295 + 1 = 4294967296 is outside [0, 2**32); "
        "lower --seed or --seeds")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "fig").exists()


@pytest.mark.parametrize("betas, seeds, match", [
    ((0.0, 0.1, 0.1), (0,), "beta 0.1 is given twice"),
    ((0.0,), (1, 2, 1), "seed 1 is given twice"),
    # it overflowed deep in torch ("Overflow when unpacking long long")
    ((0.0,), (0, 2**70), "seed 1180591620717411303424 is outside 0 to 4294967295"),
])
def test_a_sweep_refuses_a_model_given_twice_split_or_not(tmp_path, betas, seeds, match):
    """A split sweep trained the model twice and counted it twice in the correlations."""
    from click.testing import CliRunner

    from minefield.cli import main

    with pytest.raises(ConfigError, match=f"^sweep: {match}$"):
        SweepConfig(betas=betas, seeds=seeds)
    res = CliRunner().invoke(main, [
        "--root", str(tmp_path / "runs"), "sweep", "--name", "d", "--dataset", "blobs",
        "--widths", "4", "--steps", "5", "--betas", ",".join(map(str, betas)), "--seeds",
        ",".join(map(str, seeds)), "--n-poison", "20", "--isolate", "--models-per-task", "1",
        "--directions", "2", "-q", "--figures", str(tmp_path / "fig")])
    assert res.exit_code != 0 and f"Error: sweep: {match}" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "runs").exists()
