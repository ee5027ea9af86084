"""Executors: local and Ray give the same numbers; failures lose and duplicate nothing.

The Ray tests start one local Ray instance for the module (2 CPUs, no
dashboard) and shut it down at the end; they skip when Ray is not installed.
``test_local_tests_pass_without_ray`` runs this file again in a Python where
``import ray`` fails, so the local executor is shown to need no Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from minefield import (
    DirectionSpec,
    LandscapeConfig,
    ModelConfig,
    SearchConfig,
    SweepConfig,
    VolumeConfig,
    basin_run,
    landscape_run,
    load_landscape,
    search_run,
    sweep_run,
    train_run,
)
from minefield.basin import direction_radii, find_radii
from minefield.config import ConfigError
from minefield.executor import (
    LocalExecutor,
    RayExecutor,
    TaskFailed,
    TaskStore,
    make_executor,
    run_tasks,
    task_seed,
)
from minefield.runs import Run, RunError
from minefield.stages import load_run_model
from minefield.stages.study import study_run
from minefield.study import StudyConfig

pytestmark = pytest.mark.filterwarnings("ignore::minefield.basin.BasinWarning")

REPO = Path(__file__).resolve().parents[1]
CHILD = "MINEFIELD_TEST_NO_RAY"  # set in the Ray-less child run


# --- top-level task functions (picklable; Ray workers import this module) -----------------


def square_task(spec: dict) -> dict:
    """Squares spec["x"]; leaves a file per call in spec["calls"] to count calls."""
    calls = Path(spec["calls"])
    calls.mkdir(parents=True, exist_ok=True)
    n = len(list(calls.glob(f"{spec['id']}.*")))
    (calls / f"{spec['id']}.{n}").touch()
    return {"y": spec["x"] ** 2, "t": torch.full((2,), float(spec["x"]), dtype=torch.float64)}


def crash_once_task(spec: dict) -> dict:
    """Like ``square_task``, but the worker process dies (os._exit) the first time a task
    with ``spec["crash"]`` runs: a killed worker in the middle of its task."""
    marker = Path(spec["calls"]) / f"crashed-{spec['id']}"
    if spec["crash"] and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os._exit(1)
    return square_task(spec)


def killed_task(spec: dict) -> dict:
    """Like ``square_task``, but the task with ``spec["crash"]`` writes its process id
    and waits to be killed from outside (SIGKILL, :func:`_kill_when_started`), once."""
    calls = Path(spec["calls"])
    if spec["crash"] and not (calls / f"killed-{spec['id']}").exists():
        calls.mkdir(parents=True, exist_ok=True)
        (calls / f"pid-{spec['id']}.tmp").write_text(str(os.getpid()))
        (calls / f"pid-{spec['id']}.tmp").rename(calls / f"pid-{spec['id']}")
        time.sleep(300)
        raise RuntimeError("the worker was not killed")
    return square_task(spec)


def _kill_when_started(calls: Path, task: str) -> list[int]:
    """SIGKILL the process running ``task`` once it has started; its pid lands in the list."""
    killed: list[int] = []

    def kill() -> None:
        pid_file = calls / f"pid-{task}"
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        (calls / f"killed-{task}").touch()
        killed.append(int(pid_file.read_text()))
        os.kill(killed[-1], signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()
    return killed


def _gone(pid: int, wait: float = 30.0) -> bool:
    """Whether process ``pid`` has ended (and was reaped) within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def failing_task(spec: dict) -> dict:
    if spec["x"] == 2:
        raise ValueError("no twos")
    return square_task(spec)


def _specs(tmp_path: Path, xs=(1, 2, 3, 4), crash=()) -> dict[str, dict]:
    return {f"t{x}": {"id": f"t{x}", "x": x, "calls": str(tmp_path / "calls"),
                      "crash": x in crash} for x in xs}


def _calls(tmp_path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in (tmp_path / "calls").glob("t*.*"):
        out[p.stem] = out.get(p.stem, 0) + 1
    return out


def _store(tmp_path: Path, key=None) -> TaskStore:
    run = Run.create("tasks", {"what": "test"}, tmp_path / "runs")
    return TaskStore(run, "tasks", key or {"k": 1})


# --- the local executor, the store, the driver loop ----------------------------------------


def test_local_map_keeps_order_and_reports_each_result(tmp_path):
    heard = []
    out = LocalExecutor().map(square_task, list(_specs(tmp_path).values()),
                              lambda i, r: heard.append((i, r["y"])))
    assert [r["y"] for r in out] == [1, 4, 9, 16]
    assert heard == [(0, 1), (1, 4), (2, 9), (3, 16)]


def _fails_at_zero(x):
    if x == 0:
        raise ValueError("task 0 fails")
    return {"x": x}


def test_local_map_runs_the_other_tasks_then_raises_task_failed():
    """Executor.map's contract, as Ray keeps it: a failed task loses no other result."""
    heard = []
    with pytest.raises(TaskFailed, match=r"^1 of 3 tasks failed \(task 0: ValueError: "
                                         r"task 0 fails\); run the same") as e:
        LocalExecutor().map(_fails_at_zero, [0, 1, 2], lambda i, r: heard.append(i))
    assert heard == [1, 2] and isinstance(e.value.__cause__, ValueError)


def _diverges_at_zero(x):
    from minefield.train import TrainingDiverged
    if x == 0:
        raise TrainingDiverged("loss became NaN/inf at step 3")
    return {"x": x}


def test_a_seeded_divergence_is_not_told_to_run_again():
    """Same seed, same numbers: a rerun would diverge again, so the hint is not given."""
    with pytest.raises(TaskFailed, match=r"step 3\); rerunning repeats them \(same seed") as e:
        LocalExecutor().map(_diverges_at_zero, [0, 1])
    assert "run the same command" not in str(e.value)


def test_store_round_trip_and_wrong_file(tmp_path):
    store = _store(tmp_path)
    store.save("a", {"y": [1.5, float("nan")], "n": 3, "t": torch.arange(3.0)})
    got = store.load("a")
    assert got["n"] == 3 and got["y"][0] == 1.5 and got["y"][1] != got["y"][1]
    assert torch.equal(got["t"], torch.arange(3.0))
    store.run.file("tasks/a.safetensors").rename(store.run.file("tasks/b.safetensors"))
    with pytest.raises(RunError, match="not the stored result of task b"):
        store.load("b")
    with pytest.raises(RunError, match="holds results for other settings"):
        TaskStore(store.run, "tasks", {"k": 2})


def test_rerun_after_a_failure_runs_only_the_missing_tasks(tmp_path):
    store = _store(tmp_path)
    specs = _specs(tmp_path)
    with pytest.raises(TaskFailed, match="1 of 4 tasks failed"):
        run_tasks(_FailOnce(), square_task, specs, store)
    assert _calls(tmp_path) == {"t1": 1, "t2": 1, "t4": 1}  # t3 failed, the rest stored
    out = run_tasks(LocalExecutor(), square_task, specs, store)
    assert _calls(tmp_path) == {"t1": 1, "t2": 1, "t3": 1, "t4": 1}
    assert [r["y"] for r in out.values()] == [1, 4, 9, 16]
    again = run_tasks(LocalExecutor(), square_task, specs, store)  # all stored: no call
    assert _calls(tmp_path) == {"t1": 1, "t2": 1, "t3": 1, "t4": 1}
    assert all(again[t]["y"] == out[t]["y"] and torch.equal(again[t]["t"], out[t]["t"])
               for t in specs)


class _FailOnce(LocalExecutor):
    """A local executor whose third task fails after the others ran (as on a cluster)."""

    def map(self, fn, specs, on_result=None):
        for i, spec in enumerate(specs):
            if spec["x"] != 3:
                on_result(i, fn(spec))
        raise TaskFailed("1 of 4 tasks failed (task 2: ValueError)")


def test_task_seed_is_the_same_in_another_process():
    code = "from minefield.executor import task_seed; print(task_seed('sweep', 0.3, 1))"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, check=True).stdout.strip()
    assert int(other) == task_seed("sweep", 0.3, 1)
    assert task_seed("sweep", 0.3, 1) != task_seed("sweep", 0.3, 2)
    assert 0 <= task_seed("x") < 2**63


def test_make_executor_errors():
    assert isinstance(make_executor("local", address="ignored"), LocalExecutor)
    with pytest.raises(ConfigError, match="executor: 'dask' is not one of local, ray"):
        make_executor("dask")


# --- splitting the work changes no number ------------------------------------------------------


def test_radii_of_a_direction_do_not_depend_on_its_batch():
    scale = torch.linspace(0.5, 3.0, 12, dtype=torch.float64)

    def loss(ts, rows=slice(None)):  # direction i: L = (scale_i t)^2, radius 1/scale_i
        s = scale[rows]
        return (s.view(-1, *[1] * (ts.dim() - 1)) * ts) ** 2

    together, _ = find_radii(loss, 12, 1.0, r_max=2.0)
    alone = torch.cat([find_radii(lambda t, i=i: loss(t, slice(i, i + 1)), 1, 1.0,
                                  r_max=2.0)[0] for i in range(12)])
    assert torch.equal(together, alone)
    assert torch.allclose(together, 1 / scale, rtol=1e-3)


def test_direction_block_errors(tiny, tmp_path):
    res = train_run(tiny(), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"direction block \(3, 11\) is not inside"):
        direction_radii(res.model, res.params, res.data, VolumeConfig(n_directions=10),
                        block=(3, 11))
    cfg = VolumeConfig(n_directions=4, estimator="gaussian")
    with pytest.raises(ConfigError, match="applies to the naive estimator only"):
        basin_run("tiny", cfg, root=tmp_path, n_rollouts=0, directions_per_task=2)
    with pytest.raises(ConfigError, match="directions_per_task must be >= 1"):
        basin_run("tiny", VolumeConfig(n_directions=4), root=tmp_path, directions_per_task=0)


def _text(obj) -> str:
    """JSON text: compares NaN with NaN (``==`` on floats does not)."""
    return json.dumps(obj, sort_keys=True)


def test_basin_in_blocks_of_directions_equals_the_unsplit_estimate(tiny, tmp_path):
    train_run(tiny(members=2), tmp_path, progress=False)
    cfg = VolumeConfig(n_directions=10, cutoff=0.5, directions=DirectionSpec(seed=3))
    basin_run("tiny", cfg, tag="whole", root=tmp_path, n_rollouts=3)
    basin_run("tiny", cfg, tag="blocks", root=tmp_path, n_rollouts=3, directions_per_task=3)
    whole, blocks = [(tmp_path / "tiny/basin" / f"{t}.json").read_bytes()
                     for t in ("whole", "blocks")]
    assert whole == blocks
    tasks = sorted(p.name for p in (tmp_path / "tiny/basin/blocks.tasks").glob("*.safetensors"))
    assert len(tasks) == 8 and tasks[0] == "m0000-d0000000-0000003.safetensors"


def test_sweep_with_one_model_per_task_equals_models_trained_alone(tiny, tmp_path):
    base = tiny("sw", steps=40)
    base = base.replace(train=base.train.replace(isolate=True))
    sc = SweepConfig(betas=(0.0, 0.3), seeds=(0, 1), volume=VolumeConfig(n_directions=4))
    res = sweep_run(base, sc, tmp_path, progress=False, models_per_task=1)
    for row in res.rows:  # the slow obvious loop: each model alone, in its own run
        alone = train_run(base.replace(name=f"m{row['member']}"), tmp_path, progress=False,
                          betas=[row["beta"]], seeds=[base.train.seed + row["seed"]])
        assert alone.metrics["test_acc"] == [row["test_acc"]]
        b = basin_run(alone.run, sc.volume, root=tmp_path, n_rollouts=0).members[0]
        assert b.log10_volume == row["log10_volume"] and b.mean_radius == row["mean_radius"]
        _, params, _, _, _ = load_run_model(res.run)
        assert all(torch.equal(params[k][row["member"]], v[0]) for k, v in alone.params.items())
    # the split changes no number, so another split, or none, reuses the result
    assert sweep_run(base, sc, tmp_path, progress=False, models_per_task=2).rows == res.rows
    assert sweep_run(base, sc, tmp_path, progress=False).rows == res.rows
    files = {p: p.read_bytes() for p in res.run.path.rglob("*") if p.is_file()}
    with pytest.raises(RunError, match="holds results for other settings"):
        sweep_run(base, SweepConfig(betas=(0.0, 0.5), seeds=(0, 1),
                                    volume=VolumeConfig(n_directions=4)), tmp_path,
                  progress=False)
    assert {p: p.read_bytes() for p in res.run.path.rglob("*") if p.is_file()} == files
    other = base.replace(train=base.train.replace(lr=base.train.lr * 2))  # other models
    with pytest.raises(RunError, match="different config"):
        sweep_run(other, sc, tmp_path, progress=False)
    assert {p: p.read_bytes() for p in res.run.path.rglob("*") if p.is_file()} == files


# --- Ray ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_ex():
    pytest.importorskip("ray")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "OMP_NUM_THREADS": "1"}
    ex = RayExecutor(cpus_per_task=1, num_cpus=2, include_dashboard=False,
                     runtime_env={"env_vars": env})
    ex._ray()
    yield ex
    ex.close()


@pytest.fixture
def one_thread():
    torch.set_num_threads(1)  # Ray tasks with 1 CPU run 1 thread: compare like with like
    yield


def test_ray_sweep_and_volume_equal_local(ray_ex, one_thread, tiny, tmp_path):
    # default options: no split, so Ray trains the one batched stack as one task
    base = tiny("sw", steps=40)
    sc = SweepConfig(betas=(0.0, 0.1, 0.3), seeds=(0, 1), volume=VolumeConfig(n_directions=6))
    loc = sweep_run(base, sc, tmp_path / "local", progress=False)
    ray = sweep_run(base, sc, tmp_path / "ray", progress=False, executor=ray_ex)
    assert _text(ray.rows) == _text(loc.rows)
    weights = [load_run_model(Run.open(tmp_path / r / "sw"))[1] for r in ("local", "ray")]
    assert all(torch.equal(weights[0][k].view(torch.int32), weights[1][k].view(torch.int32))
               for k in weights[0])  # bit for bit
    cfg = VolumeConfig(n_directions=12, cutoff=0.5)
    whole = basin_run("sw", cfg, tag="v", root=tmp_path / "local", n_rollouts=2)
    split = basin_run("sw", cfg, tag="v", root=tmp_path / "ray", n_rollouts=2,
                      directions_per_task=5, executor=ray_ex)
    assert _text([m.to_dict() for m in whole.members]) == \
        _text([m.to_dict() for m in split.members])
    small = tiny("small").replace(model=ModelConfig(widths=(3,)))  # n = 9: short walks
    for root in ("local", "ray"):
        train_run(small, tmp_path / root, progress=False)
    chains = VolumeConfig(estimator="mcmc", n_chains=8, n_replicates=4, walk_length=3,
                          r_max=1.0, mcmc_blocks=2)  # blocks of chains, one task each
    whole = basin_run("small", chains, tag="c", root=tmp_path / "local", n_rollouts=0)
    split = basin_run("small", chains, tag="c", root=tmp_path / "ray", n_rollouts=0,
                      executor=ray_ex)
    assert _text([m.to_dict() for m in whole.members]) == \
        _text([m.to_dict() for m in split.members])


def test_ray_split_of_isolated_members_equals_the_unsplit_local_sweep(ray_ex, tiny, tmp_path):
    # the driver runs 2 threads, Ray tasks 1: isolated numbers depend on neither
    base = tiny("sw", steps=40)
    base = base.replace(train=base.train.replace(isolate=True))
    sc = SweepConfig(betas=(0.0, 0.1, 0.3), seeds=(0, 1), volume=VolumeConfig(n_directions=6))
    loc = sweep_run(base, sc, tmp_path / "local", progress=False)
    ray = sweep_run(base, sc, tmp_path / "ray", progress=False, models_per_task=2,
                    executor=ray_ex)
    assert _text(ray.rows) == _text(loc.rows)
    weights = [load_run_model(Run.open(tmp_path / r / "sw"))[1] for r in ("local", "ray")]
    assert all(torch.equal(weights[0][k].view(torch.int32), weights[1][k].view(torch.int32))
               for k in weights[0])


def test_ray_study_equals_local(ray_ex, one_thread, tiny, tmp_path):
    base = tiny("st", steps=20)
    cfg = StudyConfig(grid={"train.lr": [0.01, 0.05], "train.batch_size": [16, 32]},
                      volume=VolumeConfig(n_directions=4))
    loc = study_run(base, cfg, tmp_path / "local", progress=False)
    ray = study_run(base, cfg, tmp_path / "ray", progress=False, executor=ray_ex)
    assert len(loc.rows) == 4 and _text(loc.rows) == _text(ray.rows)
    assert [(tmp_path / r / "st" / "study.csv").read_bytes() for r in ("local", "ray")] \
        == [(tmp_path / "local" / "st" / "study.csv").read_bytes()] * 2
    iso = base.replace(name="iso", train=base.train.replace(isolate=True))  # split stacks
    whole = study_run(iso, cfg, tmp_path / "local", progress=False)
    split = study_run(iso, cfg, tmp_path / "ray", progress=False, executor=ray_ex,
                      models_per_task=1)
    where = ("stack", "member")
    assert len({r["stack"] for r in whole.rows}) == 2  # batch sizes do not stack, lrs do
    assert len({r["stack"] for r in split.rows}) == 4
    assert _text([{k: v for k, v in r.items() if k not in where} for r in whole.rows]) == \
        _text([{k: v for k, v in r.items() if k not in where} for r in split.rows])
    assert _text(whole.scores) == _text(split.scores)


def test_ray_landscape_and_search_equal_local(ray_ex, one_thread, tiny, tmp_path):
    for root in ("local", "ray"):
        train_run(tiny(), tmp_path / root, progress=False)
    lc = LandscapeConfig(dim=2, points=7, splits=("train",))
    loc = landscape_run("tiny", lc, root=tmp_path / "local", device="cpu", block_rows=2)
    ray = landscape_run("tiny", lc, root=tmp_path / "ray", device="cpu", block_rows=2,
                        executor=ray_ex)
    assert all(torch.equal(loc.values[k], ray.values[k]) for k in loc.values)
    assert bool(load_landscape("tiny", root=tmp_path / "ray")[0].done.all())
    sc = SearchConfig.make(every=1, steps=30, log_every=10, milestones=(), max_batch=2,
                           extra_poison=0)
    s_loc = search_run("tiny", sc, root=tmp_path / "local", device="cpu")
    s_ray = search_run("tiny", sc, root=tmp_path / "ray", device="cpu", executor=ray_ex)
    assert _text(s_loc.rows) == _text(s_ray.rows)
    assert len(s_ray.rows) == 3  # starts at steps 20, 40, 60: two stacks


def test_ray_killed_worker_loses_nothing_and_duplicates_nothing(ray_ex, tmp_path):
    specs = _specs(tmp_path, xs=(1, 2, 3, 4, 5, 6), crash=(3,))
    store = _store(tmp_path)
    no_retry = RayExecutor(max_retries=0)  # the running instance: a death is a failure
    killed = _kill_when_started(tmp_path / "calls", "t3")  # SIGKILL from outside, mid-task
    with pytest.raises(TaskFailed, match="1 of 6 tasks failed"):
        run_tasks(no_retry, killed_task, specs, store)
    assert killed and killed[0] != os.getpid() and _gone(killed[0])
    assert _calls(tmp_path) == {"t1": 1, "t2": 1, "t4": 1, "t5": 1, "t6": 1}
    assert sorted(p.stem for p in store.run.file("tasks").glob("*.safetensors")) == \
        ["t1", "t2", "t4", "t5", "t6"]
    out = run_tasks(no_retry, killed_task, specs, store)  # the rerun: only t3
    assert _calls(tmp_path) == {f"t{x}": 1 for x in range(1, 7)}
    local = run_tasks(LocalExecutor(), square_task, _specs(tmp_path / "ref", range(1, 7)))
    assert [r["y"] for r in out.values()] == [r["y"] for r in local.values()]
    assert all(torch.equal(out[t]["t"], local[t]["t"]) for t in out)


def test_ray_retries_a_killed_worker_and_reports_task_errors(ray_ex, tmp_path):
    specs = _specs(tmp_path, xs=(1, 2), crash=(1,))
    out = ray_ex.map(crash_once_task, list(specs.values()))  # max_retries=2: retried
    assert [r["y"] for r in out] == [1, 4] and _calls(tmp_path) == {"t1": 1, "t2": 1}
    heard = []
    with pytest.raises(TaskFailed, match=r"1 of 3 tasks failed \(task 1: .*no twos"):
        ray_ex.map(failing_task, list(_specs(tmp_path / "f", (1, 2, 3)).values()),
                   lambda i, r: heard.append(i))
    assert sorted(heard) == [0, 2]


def niceness_task(spec: dict) -> int:
    return os.nice(0)


def test_ray_workers_of_an_instance_started_here_are_not_niced(ray_ex):
    # Ray's default niceness 15 gave 2 workers a fraction of a core each on a busy machine
    assert ray_ex.map(niceness_task, [{}, {}]) == [0, 0]


def test_ray_executor_errors(ray_ex):
    with pytest.raises(ConfigError, match="cpus_per_task must be a positive number"):
        RayExecutor(cpus_per_task=0)
    with pytest.raises(ConfigError, match="gpus_per_task must be >= 0"):
        RayExecutor(gpus_per_task=-0.5)
    with pytest.raises(ConfigError, match="max_retries must be >= 0"):
        RayExecutor(max_retries=-1)


def test_ray_tasks_no_node_can_run_are_one_line_not_a_silent_wait(ray_ex, tmp_path):
    """The instance here has 2 CPUs and no GPU: 4 CPUs or 0.25 GPU a task waited forever."""
    from click.testing import CliRunner

    from minefield.cli import main

    for kw, what in (({"cpus_per_task": 4}, "4 CPUs and 0 GPUs"),
                     ({"gpus_per_task": 0.25}, "1 CPUs and 0.25 GPUs")):
        with pytest.raises(ConfigError, match=f"no Ray node has the {what} a task asks for"):
            RayExecutor(**kw).map(abs, [-1])
    root = tmp_path / "runs"
    res = CliRunner().invoke(main, [
        "--root", str(root), "study", "--name", "g", "--dataset", "blobs", "--widths", "4",
        "--steps", "5", "--vary", "train.seed=0,1", "--directions", "2", "-q", "--executor",
        "ray", "--gpus-per-task", "0.25", "--figures", str(tmp_path / "fig")])
    assert res.exit_code == 1 and "Error: no Ray node has" in res.output, res.output
    assert "Traceback" not in res.output and not root.exists()
    assert ray_ex.map(abs, [-1, 2]) == [1, 2]  # a task that fits still runs


# --- without Ray ----------------------------------------------------------------------------------


def _no_ray_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None  # no Ray\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), CHILD: "1"}


def test_ray_executor_without_ray_is_one_line(tiny, tmp_path):
    env = _no_ray_env(tmp_path)
    cmd = [sys.executable, "-m", "minefield", "--root", str(tmp_path / "runs"), "sweep",
           "--name", "s", "--dataset", "blobs", "--steps", "5", "--betas", "0,0.3",
           "--executor", "ray"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        "Error: the ray executor needs Ray, which is not installed: pip install minefield[ray]"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not os.environ.get(CHILD), reason="checks the Ray-less run only")
def test_child_has_no_ray():
    with pytest.raises(ImportError):
        import ray  # noqa: F401


@pytest.mark.skipif(bool(os.environ.get(CHILD)), reason="this is the Ray-less run")
def test_local_tests_pass_without_ray(tmp_path):
    env = _no_ray_env(tmp_path)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-o", "addopts=", "-k", "not ray", str(REPO / "tests/test_executor.py")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:]
    assert "failed" not in p.stdout and " passed" in p.stdout


def test_a_ray_address_where_nothing_listens_is_one_line_not_a_hang():
    # ray.init retried such an address for ever (and ignored SIGTERM); now a TCP check first
    import socket

    from minefield.executor import _check_reachable
    from minefield.options import ConfigError

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        _check_reachable(f"127.0.0.1:{port}", timeout=2.0)
    with socket.socket() as s:  # something listening passes
        s.bind(("127.0.0.1", 0))
        s.listen()
        _check_reachable(f"ray://127.0.0.1:{s.getsockname()[1]}")
    _check_reachable(None), _check_reachable("auto")  # a new instance, or Ray's discovery
