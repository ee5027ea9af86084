import json

import pytest
import torch

from minefield.runs import Run, RunError, atomic_write, load_tensors, save_tensors


def test_create_resume_and_refuse_overwrite(tmp_path):
    r = Run.create("a", {"x": 1}, tmp_path)
    (r.path / "keep.txt").write_text("data")
    assert Run.create("a", {"x": 1}, tmp_path).path == r.path  # same config: resume
    with pytest.raises(RunError, match="different config; use --force"):
        Run.create("a", {"x": 2}, tmp_path)
    assert (r.path / "keep.txt").read_text() == "data"  # nothing lost
    Run.create("a", {"x": 2}, tmp_path, force=True)
    assert not (r.path / "keep.txt").exists()


def test_refuses_foreign_folder_and_bad_names(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("mine")
    with pytest.raises(RunError, match="not a minefield run"):
        Run.create("b", {}, tmp_path)
    with pytest.raises(RunError, match="invalid run name"):
        Run.create("../evil", {}, tmp_path)


def test_open_errors(tmp_path):
    with pytest.raises(RunError, match="no such run"):
        Run.open("missing", tmp_path)
    (tmp_path / "c").mkdir()
    with pytest.raises(RunError, match="not a minefield run"):
        Run.open(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text("{broken")
    with pytest.raises(RunError, match="corrupt JSON"):
        Run.open(tmp_path / "c")


def test_checkpoint_roundtrip_is_self_describing(tmp_path):
    r = Run.create("d", {"x": 1}, tmp_path)
    p = {"w": torch.randn(2, 3, 4)}
    r.save_checkpoint("trajectory/step_00000001.safetensors", p, {}, {"step": 1, "seed": 5})
    ck = r.load_checkpoint(r.trajectory()[0])
    assert torch.equal(ck.params["w"], p["w"]) and ck.meta["seed"] == 5 and ck.step == 1


def test_corrupt_checkpoint_is_reported(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(RunError, match="corrupt checkpoint"):
        load_tensors(f)
    with pytest.raises(RunError, match="missing checkpoint"):
        load_tensors(tmp_path / "none.safetensors")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write(target, b'{"v": 1}')

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b'{"v": 2}')
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp files left


def test_metrics_and_csv(tmp_path):
    r = Run.create("e", {}, tmp_path)
    r.write_metrics([{"step": 0, "a": 1.0}, {"step": 1, "a": float("nan")}])
    rows = r.metrics()
    assert rows[0]["a"] == 1.0 and rows[1]["a"] != rows[1]["a"]
    (r.path / "metrics.jsonl").write_text('{"step": 0}\n{oops\n')
    with pytest.raises(RunError, match="corrupt metrics line 2"):
        r.metrics()
    save_tensors(r.file("t.safetensors"), {"a": torch.ones(2)}, {"k": [1, 2]})
    t, meta = load_tensors(r.file("t.safetensors"))
    assert meta == {"k": [1, 2]} and t["a"].sum() == 2


@pytest.mark.parametrize("rel", ["basin/t.json", "landscape/t.safetensors", "search"])
def test_one_resume_rule_for_every_stage_result(tmp_path, rel):
    run = Run.create("r", {}, tmp_path)
    key = {"volume": {"n": 3}}
    assert run.resume(rel, key) is False  # nothing yet
    if rel.endswith(".json"):
        run.write_result(rel, key, {"members": [1]})
    elif rel.endswith(".safetensors"):
        save_tensors(run.file(rel), {"x": torch.ones(2)}, {"key": key})
    else:
        assert run.read_json("search/config.json") == key  # a folder's key is written at once
        (run.file(rel) / "minimum.txt").write_text("done")
    assert run.resume(rel, key) is True  # same key: reuse / resume
    with pytest.raises(RunError, match="holds results for other settings; use --force"):
        run.resume(rel, {"volume": {"n": 4}})
    assert run.file(rel).exists()  # nothing lost on refusal
    assert run.resume(rel, {"volume": {"n": 4}}, force=True) is False
    if rel.endswith((".json", ".safetensors")):  # kept until the new result replaces it
        assert run.file(rel).exists() and run.resume(rel, key) is True
    else:  # a folder of task results is deleted: its files would be reused
        assert run.read_json("search/config.json") == {"volume": {"n": 4}}
        assert not (run.file(rel) / "minimum.txt").exists()


def test_resume_refuses_results_without_a_key(tmp_path):
    run = Run.create("r", {}, tmp_path)
    run.write_json("basin/old.json", {"radii": [1.0]})  # the layout before keys
    with pytest.raises(RunError, match="is corrupt or not what minefield wrote"):
        run.resume("basin/old.json", {"a": 1})


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    # safetensors writes its metadata keys in a random hash-map order; 16 saves of one
    # checkpoint must still be one file, which safetensors itself reads back
    from safetensors.torch import load_file
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.float64)}
    files = set()
    for i in range(16):
        save_tensors(tmp_path / f"c{i}.safetensors", tensors, {"step": 3, "betas": [0.5]})
        files.add((tmp_path / f"c{i}.safetensors").read_bytes())
    assert len(files) == 1
    got, meta = load_tensors(tmp_path / "c0.safetensors")
    assert meta == {"step": 3, "betas": [0.5]}
    for k, v in load_file(tmp_path / "c0.safetensors").items():
        assert torch.equal(v, tensors[k]) and torch.equal(got[k], tensors[k])


def test_a_relative_checkpoint_is_the_runs_own_whatever_the_working_directory(
        tmp_path, monkeypatch):
    runs = []
    for name, value in (("c1", 1.0), ("c2", 2.0)):
        r = Run.create(name, {"name": name}, tmp_path)
        r.save_checkpoint("trajectory/step_00000005.safetensors",
                          {"w": torch.full((1, 2), value)}, {}, {"step": 5})
        runs.append(r)
    monkeypatch.chdir(tmp_path / "c1")  # where c1's file has the same relative name
    ck = runs[1].load_checkpoint("trajectory/step_00000005.safetensors")
    assert torch.equal(ck.params["w"], torch.full((1, 2), 2.0))


def test_a_renamed_run_reuses_its_own_results(tmp_path):
    # results about a run's own checkpoint are keyed by its path in the run and its
    # weights, not by the folder's name: a copied or renamed run keeps them
    from click.testing import CliRunner

    from minefield.cli import main
    from minefield.stages import train_run
    from tests.conftest import tiny_config
    train_run(tiny_config("a"), tmp_path, progress=False)
    cmds = [["basin", "{}", "--directions", "2", "--rollouts", "0"],
            ["landscape", "{}", "--dim", "1", "--points", "3"],
            ["sharpness", "{}", "--measures", "worst_l2", "--steps", "2", "--restarts", "1"]]
    run = lambda name, c: CliRunner().invoke(  # noqa: E731
        main, ["--root", str(tmp_path), *[a.format(name) for a in c], "--device", "cpu"]
        if c[0] != "sharpness" else ["--root", str(tmp_path), *[a.format(name) for a in c]])
    for c in cmds:
        assert run("a", c).exit_code == 0
    (tmp_path / "a").rename(tmp_path / "b")
    (tmp_path / "b" / ".lock").unlink(missing_ok=True)  # this test process's, left behind
    for c in cmds:
        res = run("b", c)
        assert res.exit_code == 0, res.output
        assert "reusing" in res.output or c[0] == "sharpness", res.output


@pytest.mark.parametrize("dangling", [False, True])
def test_a_lock_file_that_is_a_link_is_refused_not_written_through(tmp_path, dangling):
    # a copied or unpacked run whose .lock points elsewhere: writing the run had
    # truncated (on release) or created that file
    from minefield import lock

    other = tmp_path / "precious.txt"
    if not dangling:
        other.write_text("the user's file\n")
    Run.create("a", {"x": 1}, tmp_path / "runs")
    lock.release(tmp_path / "runs" / "a")
    (tmp_path / "runs" / "a" / ".lock").unlink()
    (tmp_path / "runs" / "a" / ".lock").symlink_to(other)
    with pytest.raises(RunError, match="lock file .* is a symbolic link"):
        Run.create("a", {"x": 1}, tmp_path / "runs")
    assert not lock.is_held(tmp_path / "runs" / "a")
    assert other.exists() != dangling
    if not dangling:
        assert other.read_text() == "the user's file\n"


def test_a_folder_result_whose_key_write_failed_is_not_missing_on_the_rerun(tmp_path,
                                                                            monkeypatch):
    # "no space left ... run the same command again" was followed, after freeing space,
    # by "missing file: .../search/config.json" (the empty folder stayed behind)
    import errno

    from minefield import files

    run = Run.create("a", {"x": 1}, tmp_path)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        run.resume("search", {"k": 1})
    monkeypatch.undo()
    assert not run.exists("search")
    assert run.resume("search", {"k": 1}) is False  # nothing there: start it
    assert run.resume("search", {"k": 1}) is True
    (run.path / "basin" / "t.tasks").mkdir(parents=True)  # a kill at the same point
    assert run.resume("basin/t.tasks", {"k": 2}) is False
