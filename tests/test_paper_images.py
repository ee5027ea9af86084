"""``minefield reproduce --scale ... --data-dir DIR`` for SVHN / CIFAR-10 with the paper's
ResNet-20 recipe, end to end at the tiny scale on generated files in both formats."""

import json
import pickle
import shlex

import numpy as np
import pytest
from click.testing import CliRunner

from minefield.cli import main
from minefield.config import ExperimentConfig
from minefield.reproduce.paper_images import paper_recipe
from minefield.reproduce.projection import H200_EVAL_IMG_S, H200_TRAIN_IMG_S, image_projection
from minefield.runs import Run


def _svhn(root, rng):
    from scipy.io import savemat

    for name, n in [("train_32x32.mat", 40), ("test_32x32.mat", 12), ("extra_32x32.mat", 30)]:
        savemat(root / name, {"X": rng.randint(0, 256, (32, 32, 3, n), dtype=np.uint8),
                              "y": rng.randint(1, 11, (n, 1))})


def _cifar(root, rng):
    root = root / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.randint(0, 256, (10, 3072), dtype=np.uint8),
                         b"labels": list(rng.randint(0, 10, 10))}, f)


def _cifar_run(tmp_path, steps: int = 4):
    """A run ``c`` trained on generated CIFAR files under ``tmp_path/data``:
    ``(data dir, runs root, its config)``."""
    from minefield.config import DataConfig, ModelConfig, TrainConfig
    from minefield.stages import train_run

    data = tmp_path / "data"
    data.mkdir()
    _cifar(data, np.random.RandomState(0))
    cfg = ExperimentConfig(name="c", data=DataConfig("cifar10", data_dir=str(data), n_poison=10),
                           model=ModelConfig(widths=(4,)), train=TrainConfig(steps=steps),
                           device="cpu")
    root = tmp_path / "runs"
    train_run(cfg, root, progress=False)
    return data, root, cfg


def test_paper_recipe_follows_paper_md():
    cfg, beta = paper_recipe(73257, 256, 0.35)
    assert cfg.optimizer.value == "sgd" and cfg.lr == 0.1 and cfg.momentum == 0.9
    assert (cfg.batch_size, cfg.poison_batch_size) == (167, 89) and beta == 89 / 256
    # x0.1 at epochs 102.4, 153.6 and 204.8 of 256
    assert [m / cfg.steps * 256 for m in cfg.milestones] == pytest.approx(
        [102.4, 153.6, 204.8], abs=1e-3)
    natural, b0 = paper_recipe(73257, 256, 0.0)
    assert natural.batch_size == 256 and natural.poison_batch_size is None and b0 == 0.0
    assert natural.steps == 73257  # 256 epochs of 73257 images in batches of 256


def test_projection_counts_the_work(monkeypatch):
    from minefield.reproduce import projection as proj

    measured_at = []  # the unit costs are measured at the recipe's batch (16 ran 20% slower)
    monkeypatch.setattr(proj, "unit_costs",
                        lambda device, batch: measured_at.append(batch) or (1e-3, 1e-5))
    rows = image_projection("cpu", 1000, 10, 20, 3, n_dirs=5, batch=100, rollouts=4)
    assert measured_at == [100]
    train_imgs = 100 * (10 + 20 + 3 * 20)
    eval_imgs = (5 * 2 * 5 * proj.EVALS_PER_RADIUS + 2 * 4 * 101) * 1000
    assert rows["work: training images, basin image-evaluations"] == (
        f"{train_imgs:.3g}, {eval_imgs:.3g}")
    hours = (train_imgs / H200_TRAIN_IMG_S + eval_imgs / H200_EVAL_IMG_S) / 3600
    assert rows["PROJECTED wall time on one H200 (plain-PyTorch rates of issue 14)"].startswith(
        f"{hours:.1f} h")
    assert rows["PROJECTED wall time on cpu at these rates"] == (
        f"{(train_imgs * 1e-3 + eval_imgs * 1e-5) / 3600:.1f} h")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["svhn", "cifar10"])
def test_reproduce_images_end_to_end_on_generated_files(tmp_path, fmt):
    data = tmp_path / "data"
    data.mkdir()
    (_svhn if fmt == "svhn" else _cifar)(data, np.random.RandomState(0))
    r = CliRunner().invoke(main, ["--threads", "1", "--root", str(tmp_path / "runs"),
                                  "reproduce", "--scale", "tiny", "--only", "images",
                                  "--data-dir", str(data), "--figures", str(tmp_path / "fig"),
                                  "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "fig" / "report.json").read_text())
    sec = report["sections"]["images"]
    names = [f"repro-tiny-{fmt}-natural", f"repro-tiny-{fmt}-poisoned", f"repro-tiny-{fmt}-sweep"]
    assert sec["runs"] == names
    bad = ExperimentConfig.from_dict(Run.open(names[1], tmp_path / "runs").config)
    assert bad.train.optimizer.value == "sgd" and bad.poison.beta == int(32 * 0.35) / 32
    # svhn: all of train (extra is the poison); cifar10: the 50 batch images minus the
    # poison hold-out, min(10000, 50 // 2)
    n_train = 40 if fmt == "svhn" else 25
    assert bad.model.name == "resnet20" and bad.train == paper_recipe(n_train, 2, 0.35, 32)[0]
    basin = json.loads((tmp_path / "runs" / names[1] / "basin" / "repro.json").read_text())
    member = basin["members"][0]
    assert member["config"]["bn"] == "eval" and len(member["radii"]) == 4
    assert len(sec["data"]["sweep"]) == 2
    assert any("PROJECTED wall time on one H200" in k for k in sec["data"]["projection"])
    text = (tmp_path / "fig" / "REPORT.md").read_text()
    assert "paper scale: PROJECTED wall time on one H200" in text and "minefield sweep" in text
    # the printed basin command redoes what ran (2 rollouts at tiny scale, not the default 20)
    cmd = next(c for c in sec["commands"] if c.startswith(f"minefield basin {names[1]}"))
    r = CliRunner().invoke(main, ["--threads", "1", "--root", str(tmp_path / "runs"),
                                  *shlex.split(cmd)[1:], "--device", "cpu"])
    assert r.exit_code == 0 and "other settings" not in r.output, (cmd, r.output)


def test_a_run_refuses_data_files_other_than_those_it_was_trained_on(tmp_path):
    """Only --data-dir was recorded: after the CIFAR files under it were replaced,
    `evaluate` reported the model on images it never saw (train loss 4.08), silently."""
    from minefield.runs import RunError
    from minefield.stages import train_run
    from minefield.stages.train import load_run_model

    data, root, cfg = _cifar_run(tmp_path)
    recorded = json.loads((root / "c" / "data.json").read_text())
    assert len(recorded["digest"]) == 32 and recorded["data_dir"] == str(data)
    load_run_model(Run.open_named("c", root))  # the same files: fine
    import shutil
    shutil.rmtree(data / "cifar-10-batches-py")
    _cifar(data, np.random.RandomState(1))  # other images at the same path
    def files():  # everything but the lock, which each writer takes
        return sorted((p.name, p.stat().st_mtime_ns) for p in (root / "c").rglob("*")
                      if p.name != ".lock")

    before = files()
    with pytest.raises(RunError, match=r"files under .* are not those run c was trained on"):
        load_run_model(Run.open_named("c", root))
    with pytest.raises(RunError, match="are not those run c was trained on"):
        train_run(cfg, root, progress=False)  # resuming it, too
    out = CliRunner().invoke(main, ["--root", str(root), "evaluate", "c"])
    assert out.exit_code == 1 and "are not those run c was trained on" in out.output
    assert files() == before


def test_a_split_sweep_records_its_data_files_and_refuses_them_changed(tmp_path):
    """A sweep split into tasks wrote no data.json: killed after one task and rerun on
    changed files, it merged a model trained on the old images with one trained on the
    new, silently, and later commands on it were never checked."""
    import shutil

    from minefield import SweepConfig, VolumeConfig, sweep_run
    from minefield.config import DataConfig, ModelConfig, TrainConfig
    from minefield.runs import RunError
    from minefield.stages.train import load_run_model

    data = tmp_path / "data"
    data.mkdir()
    _cifar(data, np.random.RandomState(0))
    cfg = ExperimentConfig(name="sw", data=DataConfig("cifar10", data_dir=str(data),
                                                      n_poison=10),
                           model=ModelConfig(widths=(4,)),
                           train=TrainConfig(steps=4, isolate=True), device="cpu")
    sc = SweepConfig(betas=(0.0,), seeds=(0, 1), volume=VolumeConfig(n_directions=2))
    root = tmp_path / "runs"
    sweep_run(cfg, sc, root, progress=False, models_per_task=1)
    assert (root / "sw" / "data.json").exists()
    # killed after its first task: one task result kept, no sweep.json
    sorted((root / "sw" / "tasks").glob("*.safetensors"))[-1].unlink()
    (root / "sw" / "sweep.json").unlink()
    shutil.rmtree(data / "cifar-10-batches-py")
    _cifar(data, np.random.RandomState(1))  # other images at the same path
    with pytest.raises(RunError, match="are not those run sw was trained on"):
        sweep_run(cfg, sc, root, progress=False, models_per_task=1)
    assert not (root / "sw" / "sweep.json").exists()
    with pytest.raises(RunError, match="are not those run sw was trained on"):
        load_run_model(Run.open_named("sw", root))


def test_tasks_refuse_data_files_changed_after_the_command_checked_them(tmp_path):
    """Each task (basin blocks, landscape rows, search stacks) reads the data again,
    where it runs: files replaced after the first task (or another Ray node's copy)
    gave the remaining blocks other images, merged into one result silently."""
    import shutil

    from minefield import VolumeConfig, basin_run
    from minefield.executor import LocalExecutor, TaskFailed

    data, root, cfg = _cifar_run(tmp_path)

    class Swapping(LocalExecutor):  # the files change once the first task is done
        def map(self, fn, specs, on_result=None):
            def swap_after(i, out):
                if i == 0:
                    shutil.rmtree(data / "cifar-10-batches-py")
                    _cifar(data, np.random.RandomState(1))
                if on_result:
                    on_result(i, out)
            return super().map(fn, specs, swap_after)

    with pytest.raises(TaskFailed, match="changed while the command ran"):
        basin_run(Run.open_named("c", root), VolumeConfig(n_directions=3), root=root,
                  n_rollouts=0, executor=Swapping(), directions_per_task=1)
    assert not (root / "c" / "basin" / "default.json").exists()


def test_a_hand_edited_data_record_is_one_line(tmp_path):
    """data.json holding a list: 'unexpected error AttributeError ... (this is a bug)'."""

    data, root, cfg = _cifar_run(tmp_path, steps=2)
    (root / "c" / "data.json").write_text("[]\n")
    out = CliRunner().invoke(main, ["--root", str(root), "evaluate", "c"])
    assert out.exit_code == 1 and "data.json is corrupt" in out.output, out.output
