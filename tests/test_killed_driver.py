"""A killed driver: ``minefield sweep`` split into tasks, SIGKILLed mid-run, run again.

The driver stores each task's result as it arrives; killing the process (SIGKILL:
no handler, no cleanup, its lock released by the kernel) must lose at most the
task in flight. The rerun must leave every stored task untouched (same file, same
modification time: not redone), run only the missing ones, and end with the
table of a run that was never interrupted, byte for byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_TASKS = 6


def _sweep(root: Path, tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "minefield", "--threads", "1", "--root", str(root), "sweep",
            "--name", "s", "--dataset", "blobs", "--n-train", "40", "--n-test", "40",
            "--n-poison", "40", "--widths", "8,8", "--lr", "0.05", "--steps", "400",
            "--log-every", "100", "--checkpoint-every", "100", "--betas", "0,0.1,0.3",
            "--seeds", "0,1", "--directions", "4", "--isolate", "--models-per-task", "1",
            "--device", "cpu", "-q", "--figures", str(tmp_path / "figures")]


def _stored(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (root / "s" / "tasks").glob("*.safetensors")}


def test_a_killed_driver_loses_nothing_and_duplicates_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    root = tmp_path / "killed"
    driver = subprocess.Popen(_sweep(root, tmp_path), env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not _stored(root) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    driver.kill()  # SIGKILL, as soon as the first task is stored
    driver.wait()
    assert driver.returncode == -9
    before = _stored(root)
    assert 1 <= len(before) < N_TASKS, before  # killed mid-run, some tasks missing
    assert not (root / "s" / "sweep.json").exists()
    again = subprocess.run(_sweep(root, tmp_path), env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    after = _stored(root)
    assert len(after) == N_TASKS
    assert {k: after[k] for k in before} == before  # stored tasks were not redone
    fresh = subprocess.run(_sweep(tmp_path / "fresh", tmp_path), env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    for f in ("sweep.json", "sweep.csv", "summary.json"):
        assert (root / "s" / f).read_bytes() == (tmp_path / "fresh" / "s" / f).read_bytes(), f
