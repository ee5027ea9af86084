"""Reliability: bad input is refused in one line, before anything is written.

``CASES`` is one generated table of bad inputs: command-line values out of
range, hostile files (``/dev/zero``, garbage, truncated or key-missing
checkpoints, state files and CIFAR batches), runs addressed by path, a full or
read-only disk. Each case runs the real CLI on a copy of a trained run and must
exit non-zero with exactly one ``Error:`` line matching its pattern, no
traceback, and every file under ``--root`` unchanged (the ``.lock`` bookkeeping
file excepted). Then: the write lock across two real processes, umask, leftover
temporary files. (Searches independent of how they are batched, and killed
at every boundary, are tests/test_search_isolation.py.)

``PYTHONPATH=. python tests/test_reliability.py`` runs the table and prints the
counts (bad inputs tried, clean errors, tracebacks, accepted-when-invalid,
files changed by failing commands).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from click.testing import CliRunner

from minefield.cli import main
from minefield.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from minefield.data import load_dataset
from minefield.lock import RunLocked, acquire, holder, is_held, release
from minefield.models import build_model
from minefield.runs import Run, RunError, read_limited, save_tensors
from minefield.search import SearchConfig
from minefield.stages import search_run, train_run
from minefield.train import init_stack
from minefield.validate import check_training_memory

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--name", "fresh", "--dataset", "blobs", "--widths", "8,8", "--steps", "20",
         "--device", "cpu", "-q"]


def _good_config(name: str = "good") -> ExperimentConfig:
    return ExperimentConfig(name=name, data=DataConfig("blobs", n_train=40, n_test=40,
                                                       n_poison=40),
                            model=ModelConfig(widths=(8, 8)),
                            train=TrainConfig(steps=60, lr=0.05, log_every=20,
                                              checkpoint_every=20), device="cpu")


# --- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """``args`` (``{root}``, ``{good}``, ``{files}`` are filled in), the expected error."""

    id: str
    args: tuple[str, ...]
    error: str  # regex the one Error: line must match
    code: int = 1
    setup: str | None = None  # a key of SETUPS: a hostile file planted before the command
    patch: str | None = None  # a key of PATCHES: a failing disk


def _cases() -> list[Case]:
    out: list[Case] = []

    def bad_opt(cmd, opt, values, error, code=2):
        for v in values:
            out.append(Case(f"{cmd[0]}-{opt}={v!r}", (*cmd, opt, v), error, code))

    # training values: click ranges (exit 2) and config checks (exit 1)
    for opt, vals, err in [
        ("--clip", ["-1", "0", "nan", "inf"], r"train\.clip_norm must be a finite number > 0"),
        ("--l2", ["-1", "nan", "inf"], r"train\.l2 must be a finite number >= 0"),
        ("--lr", ["nan", "0", "-1", "inf"], r"train\.lr must be"),
        ("--momentum", ["nan", "1.5", "-0.1"], r"train\.momentum must be"),
        ("--gamma", ["0", "nan", "-2"], r"train\.gamma must be a finite number > 0"),
        ("--widths", ["0", "-3", "8,0"], r"model\.widths must be integers >= 1"),
        ("--milestones", ["5,2"], r"train\.milestones must be increasing"),
        ("--milestones", ["-1"], r"train\.milestones must be step counts >= 0"),
        ("--beta", ["2", "nan", "-0.1", "1"], r"beta must be in \[0, 1\)|a number in \[0, 1\)"),
    ]:
        bad_opt(TRAIN, opt, vals, err, code=2 if opt == "--beta" else 1)
    bad_opt(TRAIN, "--widths", ["", "abc", "1.5"], r"expected integers like")
    bad_opt(TRAIN, "--widths", ["100000000"], r"needs about [\d.]+ GB, more than", code=1)
    bad_opt(TRAIN, "--members", ["1000000"], r"needs about [\d.]+ GB, more than", code=1)
    bad_opt(TRAIN, "--widths", ["100000,100000"], r"10,000,\d+,\d+ parameters, more than",
            code=1)
    for opt in ("--steps", "--n-poison"):
        bad_opt(TRAIN, opt, ["-1"], r"Invalid value for '--(steps|n-poison)'")
    for opt in ("--batch-size", "--log-every", "--checkpoint-every", "--members"):
        bad_opt(TRAIN, opt, ["0"], rf"Invalid value for '{opt}'")
    bad_opt(TRAIN, "--dataset", ["nope"], r"Invalid value for '--dataset'")
    bad_opt(TRAIN, "--device", ["tpu"], r"Invalid value for '--device'")
    for name, err in [("", "it is empty"), ("a\nb", "control character"),
                      ("x" * 300, "300 characters"), ("../outside", "not a path"),
                      ("a/b", "not a path"), (".hidden", "starts with a dot"),
                      (" x", "space")]:
        out.append(Case(f"train-name={name[:12]!r}", (*TRAIN[:1], "--name", name, *TRAIN[3:]),
                        rf"invalid run name .*{err}"))
    out.append(Case("train-different-config", ("train", "--name", "good", "--dataset", "spiral",
                                               "-q"), r"exists with a different config"))
    # --config files
    for key, err in [("devzero", r"is not a regular file"), ("missing", r"config file not found"),
                     ("garbage", r"is not valid JSON"), ("list", r"expected an object"),
                     ("widths-4", r"model\.widths must be integers >= 1"),
                     ("unknown", r"unknown key\(s\) foo"), ("huge", r"bytes, more than"),
                     ("lr-string", r"train\.lr: expected a number"),
                     ("name-int", r"name: expected a string"), ("dir", r"is a directory"),
                     ("lr-nan", r"train\.lr must be a finite number > 0")]:
        out.append(Case(f"config-{key}", ("train", "--config", f"{{files}}/cfg-{key}", "-q"),
                        err, 2 if key == "dir" else 1, setup="configs"))
    # CIFAR-10 batches
    for key, err in [("empty", r"it is empty"), ("truncated", r"not a CIFAR-10 python batch"),
                     ("text", r"not a CIFAR-10 python batch"),
                     ("nokey", r"not a CIFAR-10 python batch \(KeyError"),
                     ("list", r"not a CIFAR-10 python batch"),
                     ("labels", r"want one integer in 0\.\.9 per image"),
                     ("code", r"refusing to load builtins\.print")]:
        out.append(Case(f"cifar-{key}", ("train", "--name", "c", "--dataset", "cifar10",
                                         "--data-dir", f"{{files}}/cifar-{key}", "-q"),
                        err, setup="cifar"))
    # runs addressed by path, or missing
    for cmd in ("search", "basin", "landscape", "evaluate", "embed"):
        for target, err in [("../outside/victim", "not a path"), ("{root}/good", "not a path"),
                            ("nope", "no such run: nope")]:
            out.append(Case(f"{cmd}-run={target}", (cmd, target), err))
    # search values
    S = ("search", "good", "--steps", "20", "-q")
    for opt, vals, err, code in [
        ("--lr", ["nan", "0"], r"train\.lr must be (a finite number )?> 0", 1),
        ("--clip", ["-1", "nan"], r"train\.clip_norm must be a finite number > 0", 1),
        ("--memory-mb", ["0", "nan"], r"search\.memory_mb must be", 1),
        ("--gamma", ["nan"], r"train\.gamma must be", 1),
        ("--checkpoints", ["999"], r"no trajectory checkpoint at step", 1),
        ("--checkpoints", ["5,x"], r"expected integers like", 2),
        ("--member", ["5"], r"member 5 asked for, run good has 1", 1),
        ("--beta", ["1", "nan"], r"beta must be in \[0, 1\)|a number in", 2),
        ("--milestones", ["5,2"], r"train\.milestones must be increasing", 1),
        ("--jitter", ["nan", "inf"], r"search\.jitter must be a finite number >= 0", 1),
        ("--target-train", ["nan"], r"search\.target_train must be in \[0, 1\]", 1),
        ("--repeats", ["2"], r"repeats > 1 needs jitter > 0", 1),
        ("--poison-cap", ["2"], r"must be in \[0, 1\]", 2),
        ("--beta-max", ["1"], r"Invalid value for '--beta-max'", 2),
        ("--steps", ["0"], r"Invalid value for '--steps'", 2),
        ("--stop", ["0"], r"no checkpoints selected", 1),
    ]:
        bad_opt(S, opt, vals, err, code)
    # basin and landscape values
    B = ("basin", "good", "--directions", "2", "--rollouts", "0")
    for opt, vals, err in [("--cutoff", ["-1", "nan", "0"], r"cutoff must be a positive number"),
                           ("--r-max", ["0", "inf"], r"r_max must be positive"),
                           ("--rtol", ["2", "nan"], r"rtol must be in \(0, 1\)")]:
        bad_opt(B, opt, vals, err, code=1)
    bad_opt(B, "--tag", ["../x"], r"Invalid value for '--tag'|tag", code=2)
    L = ("landscape", "good", "--points", "3")
    bad_opt(L, "--span", ["nan,1", "1,1", "2,1", "-inf,1", "abc", "1"],
            r"--span needs (two finite numbers|2 numbers)")
    bad_opt(L, "--points", ["1000000"], r"--points is per axis: at most 10000")
    bad_opt(L, "--other", ["../x"], r"not a path", code=1)
    bad_opt(L, "--splits", ["", ","], r"--splits needs train, test and/or poison")
    bad_opt(L, "--splits", ["val"], r"unknown split 'val'", code=1)
    bad_opt(B, "--memory-mb", ["nan"], r"memory_mb must be a positive number", code=1)
    bad_opt(TRAIN, "--data-seed", ["-5", "4294967296"],  # click's range since a84a593
            r"Invalid value for '--data-seed': .* is not in the range 0<=x<=4294967295")
    bad_opt(L, "--member", ["3"], r"has no member 3")
    out.append(Case("embed-no-minima", ("embed", "good"), r"has no bad minima"))
    bad_opt(("embed", "good"), "--perplexity", ["nan", "-1"], r"embed\.perplexity must be",
            code=1)
    bad_opt(("sweep", "--name", "s", "--dataset", "blobs", "-q"), "--betas", ["2", "nan"],
            r"poison factors must be in \[0, 1\)", code=1)
    bad_opt(("sweep", "--name", "s", "--dataset", "blobs", "-q"), "--betas", ["", ","],
            r"a sweep needs at least one beta and one seed", code=1)  # was: the 8 defaults
    bad_opt(("sweep", "--name", "s", "--dataset", "blobs", "-q"), "--beta-range", ["", "1,2"],
            r"--beta-range needs lo,hi,n")
    # n = 2.7 trained 2 factors; nan leaked "cannot convert float NaN to integer"
    bad_opt(("sweep", "--name", "s", "--dataset", "blobs", "-q"), "--beta-range",
            ["0.001,0.1,2.7", "0.001,0.1,nan", "0.001,0.1,0", "0.001,0.1,inf"],
            r"Invalid value for '--beta-range': n \(the number of factors\) must be an "
            r"integer >= 1, got (2\.7|nan|0|inf)$")
    # hostile files given as checkpoints
    for cmd in (("evaluate", "good"), ("basin", "good", "--directions", "2"),
                ("landscape", "good", "--points", "3")):
        for key, err in [("devzero", r"not a regular file"), ("text", r"corrupt checkpoint"),
                         ("missing", r"missing checkpoint"), ("empty", r"corrupt checkpoint")]:
            if cmd[0] in ("landscape", "evaluate"):  # a file inside the run they measure
                err = r"no checkpoint .* inside run good"
            out.append(Case(f"{cmd[0]}-checkpoint-{key}",
                            (*cmd, "--checkpoint", f"{{files}}/ck-{key}"), err,
                            setup="checkpoints"))
    # a damaged run resumed with its own config
    resume = ("train", "--config", "{root}/good/config.json", "-q")
    for key, err in [("state-garbage", r"corrupt checkpoint .*state\.safetensors"),
                     ("state-empty", r"corrupt checkpoint .*state\.safetensors"),
                     ("state-no-opt", r"cannot resume this run"),
                     ("state-no-step", r"cannot resume this run \(KeyError"),
                     ("state-shape", r"cannot resume this run"),
                     ("trajectory-deleted", r"trajectory checkpoint of step 60 is missing"),
                     ("metrics-garbage", r"corrupt metrics line 1"),
                     ("state-devzero", r"not a regular file")]:
        out.append(Case(f"resume-{key}", resume, err, setup=key))
    # saved results that are not what minefield wrote
    corrupt = r"is corrupt or not what minefield wrote"
    for key, cmd in [("basin-list", ("basin", "good", "--directions", "2", "--rollouts", "0")),
                     ("basin-list", ("plot", "basin", "good", "--out", "{files}/fig")),
                     ("basin-members-int", ("plot", "basin", "good", "--out", "{files}/fig")),
                     ("landscape-no-settings", ("landscape", "good", "--points", "3")),
                     ("landscape-no-settings", ("plot", "landscape", "good", "--out",
                                                "{files}/fig")),
                     ("minimum-no-row", ("embed", "good"))]:
        out.append(Case(f"{key}-{cmd[0]}-{cmd[1]}", cmd, corrupt, setup=key))
    # a failing disk: full, read-only
    for patch, err in [("enospc", r"no space left on the device"),
                       ("eacces", r"permission denied")]:
        out.append(Case(f"train-{patch}", TRAIN, err, patch=patch))
        out.append(Case(f"basin-{patch}", (*B, "--tag", "t"), err, patch=patch))
        out.append(Case(f"search-{patch}", S, err, patch=patch))
    return out


CASES = _cases()


def _write_configs(files: Path, root: Path) -> None:
    good = json.loads((root / "good" / "config.json").read_text())
    texts = {"garbage": "{not json", "list": "[1, 2]",
             "widths-4": json.dumps({"model": {"widths": [-4]}}),
             "unknown": json.dumps({"foo": 1}), "huge": "{" + " " * (2 * 2**20) + "}",
             "lr-string": json.dumps({"train": {"lr": "fast"}}), "name-int": '{"name": 5}',
             "lr-nan": json.dumps(good | {"name": "x", "train": good["train"] | {"lr": 12345}}
                                  ).replace("12345", "NaN")}
    for k, t in texts.items():
        (files / f"cfg-{k}").write_text(t)
    (files / "cfg-devzero").symlink_to("/dev/zero")
    (files / "cfg-dir").mkdir()


def _write_cifar(files: Path, _root: Path) -> None:
    import numpy as np

    ok = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    bad = {"empty": b"", "truncated": pickle.dumps(ok)[:50], "text": b"hello world\n",
           "nokey": pickle.dumps({b"labels": [0]}), "list": pickle.dumps([1, 2]),
           "labels": pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 99]}),
           # print("pwned") as raw pickle opcodes (GLOBAL builtins.print, call): written
           # by hand because Ray, once another test imports it, replaces builtins.print
           "code": b"cbuiltins\nprint\n(S'pwned'\ntR."}
    for k, blob in bad.items():
        d = files / f"cifar-{k}"
        d.mkdir()
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (d / name).write_bytes(pickle.dumps(ok))
        (d / "data_batch_1").write_bytes(blob)


def _write_checkpoints(files: Path, _root: Path) -> None:
    (files / "ck-devzero").symlink_to("/dev/zero")
    (files / "ck-text").write_text("not a checkpoint")
    (files / "ck-empty").write_bytes(b"")


def _damage(key: str):
    def setup(_files: Path, root: Path) -> None:
        run = root / "good"
        state = run / "state.safetensors"
        if key == "state-garbage":
            state.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + b"x" * 40)
        elif key == "state-empty":
            state.write_bytes(b"")
        elif key == "state-devzero":
            state.unlink()
            state.symlink_to("/dev/zero")
        elif key in ("state-no-opt", "state-no-step", "state-shape"):
            from minefield.runs import load_tensors

            tensors, meta = load_tensors(state)
            if key == "state-no-opt":
                tensors = {k: v for k, v in tensors.items() if not k.startswith("opt.")}
            elif key == "state-no-step":
                meta.pop("step")
            else:
                k = next(k for k in tensors if k.startswith("param."))
                tensors[k] = torch.zeros(3)
            save_tensors(state, tensors, meta)
        elif key == "trajectory-deleted":
            shutil.rmtree(run / "trajectory")
        elif key == "metrics-garbage":
            (run / "metrics.jsonl").write_text("{oops\n")
        elif key.startswith("basin-"):
            (run / "basin").mkdir()
            text = "[1]" if key == "basin-list" else '{"members": [1]}'
            (run / "basin" / "default.json").write_text(text)
        elif key == "landscape-no-settings":
            save_tensors(run / "landscape" / "default.safetensors", {"ts": torch.zeros(3)}, {})
        elif key == "minimum-no-row":
            ck = Run(run).load_checkpoint(run / "trajectory" / "step_00000020.safetensors")
            save_tensors(run / "search" / "minima" / "start_00000020_r00.safetensors",
                         {f"param.{k}": v for k, v in ck.params.items()}, {"kind": "x"})
    return setup


SETUPS = {"configs": _write_configs, "cifar": _write_cifar, "checkpoints": _write_checkpoints,
          **{k: _damage(k) for k in ("state-garbage", "state-empty", "state-no-opt",
                                     "state-no-step", "state-shape", "trajectory-deleted",
                                     "metrics-garbage", "state-devzero", "basin-list",
                                     "basin-members-int", "landscape-no-settings",
                                     "minimum-no-row")}}


def _failing_mkstemp(err: int):
    def fail(*_a, **_k):
        raise OSError(err, os.strerror(err), "some/file")
    return fail


PATCHES = {"enospc": errno.ENOSPC, "eacces": errno.EACCES}


def tree_hash(root: Path) -> str:
    """sha256 over every path and file under ``root`` (``.lock`` files excepted)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.name == ".lock":
            continue
        h.update(str(p.relative_to(root)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def make_base(root: Path) -> None:
    train_run(_good_config(), root, progress=False)


def run_case(case: Case, base: Path, work: Path) -> dict[str, Any]:
    """Run ``case`` on a copy of ``base``; what happened, as the counts need it."""
    import re

    root, files = work / "runs", work / "files"
    shutil.copytree(base, root, symlinks=True)
    files.mkdir()
    if case.setup:
        SETUPS[case.setup](files, root)
    before = tree_hash(root)
    args = [a.format(root=root, files=files, good=root / "good") for a in case.args]
    env = {"MINEFIELD_THREADS": "1"}
    if case.patch:
        with mock.patch("minefield.files.tempfile.mkstemp",
                        _failing_mkstemp(PATCHES[case.patch])):
            res = CliRunner().invoke(main, ["--root", str(root), *args], env=env)
    else:
        res = CliRunner().invoke(main, ["--root", str(root), *args], env=env)
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    traceback = (res.exception is not None and not isinstance(res.exception, SystemExit)) or (
        "Traceback" in res.output or "unexpected error" in res.output)
    return {"case": case, "exit": res.exit_code, "output": res.output, "lines": lines,
            "traceback": traceback, "accepted": res.exit_code == 0,
            "changed": tree_hash(root) != before,
            "clean": (res.exit_code == case.code and len(lines) == 1
                      and re.search(case.error, lines[0]) is not None)}


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    # tiny problems: a second thread only waits for the first on a loaded machine
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base") / "runs"
    make_base(root)
    return root


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, base, tmp_path):
    got = run_case(case, base, tmp_path)
    assert not got["traceback"], got["output"]
    assert not got["accepted"], got["output"]
    assert not got["changed"], f"files changed by a failing command: {got['output']}"
    assert got["clean"], f"exit {got['exit']} (want {case.code}): {got['output']!r}"


def test_the_table_covers_every_issue_case():
    ids = " ".join(c.id for c in CASES)
    for needle in ("--clip='-1'", "--l2='-1'", "--widths='0'", "--widths=''", "name=''",
                   "--span='nan,1'", "--span='1,1'", "name='a\\nb'", "--widths='-3'",
                   "config-widths-4", "cifar-empty", "cifar-truncated", "cifar-text",
                   "cifar-nokey", "state-no-opt", "state-no-step", "trajectory-deleted",
                   "train-eacces", "train-enospc", "--widths='100000000'", "config-devzero",
                   "checkpoint-devzero", "--lr='nan'", "basin-run=../outside/victim"):
        assert needle in ids, needle


# --- the same checks from Python --------------------------------------------------------------

NAN = float("nan")
PY_CASES = [
    (TrainConfig, {"lr": NAN}, r"train\.lr must be a finite number > 0"),
    (TrainConfig, {"clip_norm": -1.0}, r"train\.clip_norm must be a finite number > 0"),
    (TrainConfig, {"l2": -1.0}, r"train\.l2 must be a finite number >= 0"),
    (TrainConfig, {"momentum": 1.0}, r"train\.momentum must be in \[0, 1\)"),
    (TrainConfig, {"milestones": (-5,)}, r"train\.milestones must be step counts >= 0"),
    (ModelConfig, {"widths": (0,)}, r"model\.widths must be integers >= 1"),
    (ExperimentConfig, {"name": "a\nb"}, r"invalid run name .*control character"),
    (ExperimentConfig, {"name": ""}, r"invalid run name '': it is empty"),
    (ExperimentConfig, {"device": "tpu"}, r"device must be auto, cpu or cuda"),
    (SearchConfig.make, {"lr": NAN}, r"train\.lr must be a finite number > 0"),
    (DataConfig, {"seed": -1}, r"data\.seed must be in \[0, 2\*\*32\)"),
    (SearchConfig, {"checkpoints": ()}, r"search\.checkpoints lists no step"),
    (SearchConfig, {"stop": -1}, r"search\.stop must be an integer >= 0"),
    (SearchConfig.make, {"batch_size": 0}, r"train\.batch_size must be >= 1"),
]


@pytest.mark.parametrize("cls,kw,match", PY_CASES, ids=[m[:30] for _, _, m in PY_CASES])
def test_configs_refuse_bad_values_in_python(cls, kw, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kw)


def test_a_landscape_needs_a_split():
    from minefield.landscape import slice_1d

    data = load_dataset(DataConfig("blobs", n_train=40, n_test=40, n_poison=40))
    model = build_model(ModelConfig(widths=(8, 8)), data.input_shape, data.n_classes).double()
    p = {k: v.double() for k, v in init_stack(model, "glorot_uniform", [0]).items()}
    with pytest.raises(ValueError, match="no split given"):
        slice_1d(model, p, p, torch.zeros(2), data, ())


def test_model_size_is_refused_before_allocation():
    with pytest.raises(ConfigError, match=r"has 10,000,\d+,\d+ parameters, more than the"):
        check_training_memory(ModelConfig(widths=(100_000, 100_000)), (2,), 2, 1, 10)
    with pytest.raises(ConfigError, match=r"needs about 0\.0 GB, more than the 0\.0 GB"):
        check_training_memory(ModelConfig(widths=(8,)), (2,), 2, 1, 10, limit=10)
    assert check_training_memory(ModelConfig(widths=(8,)), (2,), 2, 2, 10) == \
        2 * (6 * 33 + 3 * 17 * 10) * 4


@pytest.mark.parametrize("err,size", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                  "allocate memory: you tried to allocate 36800000000 bytes. Error code 12"),
     " (tried to allocate 36.8 GB)"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has ..."),
     " (tried to allocate 20.00 GiB)"),
    (MemoryError(), "")])
def test_a_failed_allocation_is_the_out_of_memory_line(err, size):
    # regression: basin --directions 100000000 (and --rollouts, sharpness --samples,
    # connect --points) said "unexpected error RuntimeError: ... (this is a bug; ...)"
    import click

    from minefield.cli._common import friendly

    def boom():
        raise err

    with pytest.raises(click.ClickException) as got:
        friendly(boom)()
    assert got.value.message == (f"out of memory{size}; use smaller models, fewer members, "
                                 "directions, rollouts, samples or points, or a smaller "
                                 "--memory-mb")
    with pytest.raises(click.ClickException, match=r"unexpected error RuntimeError: shape"):
        friendly(lambda: (_ for _ in ()).throw(RuntimeError("shape mismatch")))()


def test_oversize_and_special_files_are_not_read(tmp_path):
    big = tmp_path / "big.json"
    big.write_text("[" + " " * 100 + "]")
    with pytest.raises(RunError, match=r"has 102 bytes, more than the 50 accepted"):
        read_limited(big, 50)
    with pytest.raises(RunError, match=r"is not a regular file"):
        read_limited("/dev/zero", 50)
    with pytest.raises(RunError, match=r"missing file"):
        read_limited(tmp_path / "nope", 50)


# --- listing, steps 0, search config left behind ------------------------------------------


def test_runs_lists_an_unreadable_run_and_the_others(base, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(base, root)
    shutil.copytree(root / "good", root / "broken")
    (root / "broken" / "config.json").write_text("[1, 2]")
    res = CliRunner().invoke(main, ["--root", str(root), "runs"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert any(ln.startswith("broken") and "(unreadable: " in ln for ln in lines)
    assert any(ln.startswith("good") and "blobs" in ln for ln in lines)


def test_runs_names_studies_sweeps_and_mixed_stacks(base, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(base / "good", root / "good")
    good = json.loads((root / "good" / "config.json").read_text())
    (root / "st").mkdir()
    (root / "st" / "config.json").write_text(json.dumps({"kind": "study", "base": good}))
    shutil.copytree(root / "good", root / "sw")
    (root / "sw" / "sweep.json").write_text("{}")
    shutil.copytree(root / "good", root / "mx")
    summary = json.loads((root / "mx" / "summary.json").read_text())
    (root / "mx" / "summary.json").write_text(json.dumps({**summary, "betas": [0.0, 0.5]}))
    res = CliRunner().invoke(main, ["--root", str(root), "runs"])
    assert res.exit_code == 0, res.output
    rows = {ln.split()[0]: ln.split() for ln in res.output.splitlines()[1:]}
    assert rows["st"][1:4] == ["blobs", good["model"]["name"], "study"]
    assert rows["sw"][3] == "sweep" and rows["mx"][3] == "mixed"
    assert rows["good"][3] != "mixed"


def test_train_steps_0_saves_the_initialisation_and_resumes(tmp_path):
    args = ["--root", str(tmp_path), "train", "--name", "z", "--dataset", "blobs",
            "--widths", "4", "--steps", "0", "--device", "cpu", "-q"]
    for _ in range(2):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
    assert [p.name for p in Run(tmp_path / "z").trajectory()] == ["step_00000000.safetensors"]


def test_failed_start_leaves_no_config_and_retry_works(tmp_path):
    bad = ["--root", str(tmp_path), "train", "--name", "a13", "--dataset", "blobs",
           "--widths", "4", "--steps", "2", "--device", "cpu", "-q", "--lr", "nan"]
    assert CliRunner().invoke(main, bad).exit_code == 1
    assert not (tmp_path / "a13").exists()
    ok = CliRunner().invoke(main, [*bad[:-1], "0.01"])
    assert ok.exit_code == 0, ok.output


def test_stray_search_config_without_minima_is_replaced(base, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(base, root)
    (root / "good" / "search").mkdir()
    (root / "good" / "search" / "config.json").write_text('{"search": "another"}')
    cfg = SearchConfig.make(checkpoints=(20,), steps=10, milestones=(), adapt_from=0)
    s = search_run("good", cfg, root=root, device="cpu")
    assert s.new == 1


# --- the write lock -------------------------------------------------------------------------


HOLD = ("import sys, time; from minefield.runs import Run; "
        "Run(sys.argv[1]).lock(); print('locked', flush=True); time.sleep(60)")


def _holder(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                         env=env, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_is_refused_naming_the_holder(base, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(base, root)
    holder_proc = _holder(root / "good")
    try:
        before = tree_hash(root)
        env = {**os.environ, "PYTHONPATH": str(REPO), "MINEFIELD_THREADS": "1"}
        cmd = [sys.executable, "-m", "minefield", "--root", str(root), "train", "--config",
               str(root / "good" / "config.json"), "--force", "-q"]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 1
        err = res.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Error: run good is being written by pid "
                                                   f"{holder_proc.pid}"), res.stderr
        assert tree_hash(root) == before  # --force deleted nothing
        # a reader is never blocked
        assert CliRunner().invoke(main, ["--root", str(root), "evaluate", "good"]).exit_code == 0
    finally:
        holder_proc.send_signal(signal.SIGKILL)
        holder_proc.wait()
    # the kernel released the killed holder's lock: the next writer goes ahead
    with pytest.raises(RunError, match="different config"):
        train_run(_good_config().replace(device="auto"), root, progress=False)
    assert train_run(_good_config(), root, progress=False).run.name == "good"


def test_lock_is_reentrant_released_and_a_stale_pid_is_taken_over(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "since": 0, "cmd": "old"}))
    acquire(d)
    acquire(d)  # the same process again: re-entrant
    assert holder(d)["pid"] == os.getpid()
    release(d)
    assert is_held(d)
    release(d)
    assert not is_held(d)


def test_lock_refusal_message(tmp_path):
    d = tmp_path / "r"
    p = _holder(d)
    try:
        with pytest.raises(RunLocked, match=rf"run r is being written by pid {p.pid} since "):
            acquire(d)
        # the recorded pid is gone but the flock is still held (a child inherited it)
        (d / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "since": 0}))
        with pytest.raises(RunLocked, match=r"no longer running; a child process of it"):
            acquire(d)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


def test_library_writers_release_their_lock(base, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(base, root)
    res = train_run(_good_config(), root, progress=False)
    assert not is_held(res.run.path)


# --- files: umask, leftovers ------------------------------------------------------------------


@pytest.mark.parametrize("mask,mode", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_files_honour_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        run = Run.create("u", {"a": 1}, tmp_path)
        run.write_json("x/y.json", {"b": 2})
    finally:
        os.umask(old)
        release(tmp_path / "u")
    for p in (tmp_path / "u" / "config.json", tmp_path / "u" / "x" / "y.json"):
        assert p.stat().st_mode & 0o777 == mode


def test_leftover_temporary_files_are_removed_when_a_run_is_written(base, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(base, root)
    left = [root / "good" / ".metrics.jsonl.abc123.tmp",
            root / "good" / "trajectory" / ".step_00000080.safetensors.x.tmp"]
    for p in left:
        p.write_bytes(b"half")
    Run.open_named("good", root).metrics()  # reading leaves them
    assert all(p.exists() for p in left)
    train_run(_good_config(), root, progress=False)
    assert not any(p.exists() for p in left)


def test_leftover_temporary_files_in_a_result_folder_are_removed(tmp_path):
    """A result folder holds its key in ``config.json`` (``search/``, a basin's
    ``.tasks/``): it was taken for a run of its own, and a minimum's checkpoint killed
    half-way (``search/minima/.start_...safetensors.x.tmp``) was never removed."""
    run = tmp_path / "r"
    (run / "search" / "minima").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "search" / "config.json").write_text('{"search": {}}')
    left = [run / "search" / ".search.csv.ab.tmp",
            run / "search" / "minima" / ".start_00000050_r00.safetensors.cd.tmp"]
    for p in left:
        p.write_bytes(b"half")
    try:
        Run(run).lock()
        assert not any(p.exists() for p in left)
    finally:
        release(run)


def test_locking_a_study_leaves_its_stacks_temporary_files_to_their_own_lock(tmp_path):
    """A stack is a run of its own, which another process may be writing under its own
    lock: taking the study's lock deleted that write's temporary file."""
    study, stack = tmp_path / "S", tmp_path / "S" / "stacks" / "X"
    stack.mkdir(parents=True)
    (study / "config.json").write_text('{"kind": "study"}')
    (stack / "config.json").write_text("{}")
    (stack / ".lock").write_text("")  # made first by every writer of a run (Run.create)
    mine, theirs = study / ".study.json.ab.tmp", stack / ".models.json.cd.tmp"
    for p in (mine, theirs):
        p.write_text("half")
    try:
        Run(study).lock()
        assert not mine.exists() and theirs.exists()
        Run(stack).lock()  # the stack's own lock: its leftovers go
        assert not theirs.exists()
    finally:
        release(study)
        release(stack)


# --- the counts -----------------------------------------------------------------------------


def tally() -> dict[str, int]:
    """Run every case of the table; the counts the issue asks for."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        base_root = Path(d) / "base"
        make_base(base_root)
        results = []
        for i, case in enumerate(CASES):
            results.append(run_case(case, base_root, Path(d) / f"c{i}"))
    for r in results:
        if not r["clean"] or r["traceback"] or r["changed"]:
            print(f"FAIL {r['case'].id}: exit {r['exit']} {r['output'][-300:]!r}")
    return {"bad inputs tried": len(results),
            "clean errors": sum(r["clean"] and not r["traceback"] for r in results),
            "tracebacks": sum(r["traceback"] for r in results),
            "accepted when invalid": sum(r["accepted"] for r in results),
            "files changed by failing commands": sum(r["changed"] for r in results)}


if __name__ == "__main__":
    t0 = time.perf_counter()
    for k, v in tally().items():
        print(f"{k}: {v}")
    print(f"({time.perf_counter() - t0:.0f} s)")
