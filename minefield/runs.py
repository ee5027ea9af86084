"""Run directories: the one place that reads and writes files.

Layout of ``runs/<name>/``::

    config.json                 the experiment config (written when the run starts)
    metrics.jsonl               one JSON object per logged step and member
    state.safetensors           latest full training state, for resuming
    trajectory/step_XXXXXXXX.safetensors   self-describing checkpoints
    <stage>/...                 results of later stages (search, basin, embed, ...)

Every stage result obeys one resume rule, :meth:`Run.resume`: its *key* (the
stage config that made it) is stored with it (``key`` in a JSON result, ``key``
in a safetensors result's metadata, ``config.json`` in a result folder); asking
again with the same key reuses (or resumes) it, a different key raises
:class:`RunError` unless ``force``, which deletes the old result first.

Every write is atomic and every read size-limited (:mod:`minefield.files`, whose
functions are re-exported here). Checkpoints are safetensors files whose
metadata holds the experiment config, step, seed and metrics as JSON, so a point
of a trajectory can be rebuilt without the command line that made it, and
loading never unpickles.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .files import (  # noqa: F401 - re-exported: the run layer's file functions
    FORMAT,
    MAX_CHECKPOINT_BYTES,
    MAX_JSON_BYTES,
    RunError,
    atomic_write,
    load_tensors,
    read_json,
    read_limited,
    reading,
    save_tensors,
    tensors_sha,
    write_json,
)

__all__ = ["Run", "RunError", "Checkpoint", "atomic_write", "write_json", "read_json",
           "save_tensors", "load_tensors", "DEFAULT_ROOT", "check_name", "read_limited",
           "reading"]

DEFAULT_ROOT = Path("runs")
#: Longest run name accepted (a folder name; room is left for suffixes and temp files).
MAX_NAME = 100
_TMP = re.compile(r"^\..+\.tmp$")


def check_name(name: Any, what: str = "run name") -> str:
    """``name`` if it can be a folder under the runs root, else a one-line RunError.

    A name is 1 to :data:`MAX_NAME` characters, with no path separator, no control
    character (newline, tab, NUL) and no leading dot or space.

    Example::

        >>> check_name("mf-good")
        'mf-good'
        >>> check_name("../outside")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        minefield.runs.RunError: invalid run name '../outside': a name is a folder under...
    """
    why = None
    if not isinstance(name, str) or not name:
        why = "it is empty"
    elif len(name) > MAX_NAME:
        why = f"it has {len(name)} characters, at most {MAX_NAME} are allowed"
    elif "/" in name or "\\" in name:
        why = "a name is a folder under --root, not a path"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        why = "it contains a control character (newline, tab, ...)"
    elif name[0] in ". " or name[-1] == " ":
        why = "it starts with a dot or starts/ends with a space"
    if why:
        shown = repr(name)[:60] + ("..." if len(repr(name)) > 60 else "")
        raise RunError(f"invalid {what} {shown}: {why}")
    return name


def _stored_key(path: Path, folder: bool) -> Any:
    if folder:
        return read_json(path / "config.json")
    if path.suffix == ".safetensors":
        return load_tensors(path)[1]["key"]
    return read_json(path)["key"]


@dataclass(frozen=True)
class Checkpoint:
    """One saved point: stacked parameters ``(M, ...)``, buffers and metadata."""

    path: Path
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


class Run:
    """A run directory. ``Run.create`` starts or resumes one; ``Run.open`` reads one."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # --- lifecycle -------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, config: dict[str, Any], root: Path | str = DEFAULT_ROOT,
               force: bool = False) -> Run:
        """Start ``root/name``; an existing run with the same config is resumed.

        A different existing config raises :class:`RunError` unless ``force``,
        which deletes the old run first. The run's write lock is taken before
        anything is looked at or changed (see :mod:`minefield.lock`); another
        writer raises :class:`~minefield.lock.RunLocked`.
        """
        check_name(name)
        path = Path(root) / name
        cfg_path = path / "config.json"
        if not force and cfg_path.exists() and read_json(cfg_path) != json.loads(
                json.dumps(config)):
            # refused before the lock, so a refused command leaves no trace
            raise RunError(f"run {path} exists with a different config; "
                           "use --force to overwrite it or choose another --name")
        if (not force and not cfg_path.exists() and path.is_dir()
                and any(not _bookkeeping(p.name) for p in path.iterdir())):
            raise RunError(f"{path} exists and is not a minefield run; use --force or "
                           "another --name")
        run = cls(path)
        created = not path.exists()
        run.lock()
        if force and path.exists():
            for p in path.iterdir():
                if p.name != _LOCK_FILE:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif cfg_path.exists():
            if read_json(cfg_path) != json.loads(json.dumps(config)):
                raise RunError(f"run {path} exists with a different config; "
                               "use --force to overwrite it or choose another --name")
            return run
        try:
            write_json(cfg_path, config)
        except BaseException:
            if created:  # leave no empty run folder behind a failed start
                from . import lock

                lock.release(path)
                shutil.rmtree(path, ignore_errors=True)
            raise
        return run

    @classmethod
    def open(cls, path: Path | str, root: Path | str = DEFAULT_ROOT) -> Run:
        """Open an existing run by path or by name under ``root``."""
        p = Path(path)
        if not (p / "config.json").exists() and (Path(root) / p / "config.json").exists():
            p = Path(root) / p
        if not p.is_dir():
            raise RunError(f"no such run: {path}")
        if not (p / "config.json").exists():
            raise RunError(f"{p} is not a minefield run (no config.json)")
        run = cls(p)
        run.config  # noqa: B018 - validate JSON early
        return run

    @classmethod
    def open_named(cls, name: str, root: Path | str = DEFAULT_ROOT) -> Run:
        """Open the run called ``name`` under ``root``; paths (``../x``, ``/tmp/x``) are refused."""
        check_name(name)
        if not (Path(root) / name).is_dir():
            raise RunError(f"no such run: {name}")
        return cls.open(Path(root) / name, root)

    # --- the write lock ---------------------------------------------------------------
    def lock(self) -> Run:
        """Take this run's write lock (re-entrant; see :mod:`minefield.lock`).

        The first time this process takes it, leftover ``.*.tmp`` files of
        writes killed half-way are removed.
        """
        from . import lock

        if not lock.is_held(self.path):
            lock.acquire(self.path)
            _clean_tmp(self.path)
        else:
            lock.acquire(self.path)
        return self

    def _writing(self) -> None:
        from . import lock

        if not lock.is_held(self.path):
            self.lock()

    @property
    def config(self) -> dict[str, Any]:
        return read_json(self.path / "config.json")

    # --- generic files ---------------------------------------------------------------
    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def write_json(self, rel: str, obj: Any) -> Path:
        self._writing()
        p = self.file(rel)
        write_json(p, obj)
        return p

    def read_json(self, rel: str) -> Any:
        return read_json(self.file(rel))

    # --- stage results ---------------------------------------------------------------
    def resume(self, rel: str, key: dict[str, Any], force: bool = False) -> bool:
        """The resume rule of every stage: True when ``rel`` holds results made with ``key``.

        ``rel`` is a ``.json`` or ``.safetensors`` file, or a folder (any other
        name). Nothing there: False. The same key: True (reuse it, or resume a
        partial result). A different key: :class:`RunError`, unless ``force``, which
        returns False: a file stays until the new result replaces it (atomically: a
        redo refused or interrupted had left no result at all), a folder of task
        results is deleted (its files would be reused). A folder gets its key
        written here (``rel/config.json``); a file stores it when written
        (:meth:`write_result`, or ``key`` in safetensors metadata).
        """
        path = self.file(rel)
        folder = path.suffix not in (".json", ".safetensors")
        if folder and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()  # left empty by a write killed before its key was in place
        if path.exists():
            if force and not folder:
                return False
            if force:
                shutil.rmtree(path)
            else:
                with reading(path):  # a file without its key is not what minefield wrote
                    old = _stored_key(path, folder)
                if old != json.loads(json.dumps(key)):
                    raise RunError(f"{path} holds results for other settings; use --force to "
                                   "redo them")
                return True
        if folder:
            self.write_json(f"{rel}/config.json", key)
        return False

    def write_result(self, rel: str, key: dict[str, Any], body: dict[str, Any]) -> Path:
        """Write a JSON stage result ``{"key": key, **body}`` (see :meth:`resume`)."""
        return self.write_json(rel, {"key": key, **body})

    def exists(self, rel: str) -> bool:
        return self.file(rel).exists()

    def write_csv(self, rel: str, rows: list[dict[str, Any]]) -> Path:
        import csv
        import io

        buf = io.StringIO()
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            w = csv.DictWriter(buf, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        p = self.file(rel)
        self._writing()
        atomic_write(p, buf.getvalue().encode())
        return p

    # --- metrics ---------------------------------------------------------------------
    def write_metrics(self, rows: Iterable[dict[str, Any]]) -> None:
        """Replace metrics.jsonl (atomically) with ``rows``."""
        text = "".join(json.dumps(r) + "\n" for r in rows)
        self._writing()
        atomic_write(self.file("metrics.jsonl"), text.encode())

    def metrics(self) -> list[dict[str, Any]]:
        p = self.file("metrics.jsonl")
        if not p.exists():
            return []
        rows = []
        try:
            text = read_limited(p, MAX_CHECKPOINT_BYTES, "metrics file").decode()
        except UnicodeDecodeError:
            raise RunError(f"corrupt metrics file {p}") from None
        for i, line in enumerate(text.splitlines()):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise RunError(f"corrupt metrics line {i + 1} in {p}") from None
        return rows

    # --- checkpoints -----------------------------------------------------------------
    def save_checkpoint(self, rel: str, params, buffers, meta: dict[str, Any]) -> Path:
        tensors = {f"param.{k}": v for k, v in params.items()}
        tensors.update({f"buffer.{k}": v for k, v in (buffers or {}).items()})
        p = self.file(rel)
        self._writing()
        save_tensors(p, tensors, meta)
        return p

    def load_checkpoint(self, rel_or_path: str | Path, device="cpu") -> Checkpoint:
        p = Path(rel_or_path)  # the run's own file first, whatever the working directory
        if (not p.is_absolute() and (self.path / p).exists()) or not (
                p.is_absolute() or p.exists()):
            p = self.file(str(rel_or_path))
        tensors, meta = load_tensors(p, device)
        params = {k[6:]: v for k, v in tensors.items() if k.startswith("param.")}
        buffers = {k[7:]: v for k, v in tensors.items() if k.startswith("buffer.")}
        if not params:
            raise RunError(f"{p} holds no parameters")
        return Checkpoint(p, params, buffers, meta)

    def trajectory(self) -> list[Path]:
        """Trajectory checkpoint files in step order."""
        d = self.file("trajectory")
        return sorted(d.glob("step_*.safetensors")) if d.is_dir() else []

    def checkpoint(self, rel: str | None, inside: bool = True) -> str:
        """The checkpoint a command measures: ``rel``, or the run's last trajectory
        checkpoint now (relative to the run). ``inside``: ``rel`` must be a file inside the
        run (no absolute paths, no ``..``), as results about another run's file would
        not notice when that run is retrained."""
        if rel is None:
            traj = self.trajectory()
            if not traj:
                raise RunError(f"run {self.path} has no trajectory checkpoints (was it "
                               "trained?)")
            return str(traj[-1].relative_to(self.path))
        p = Path(rel)
        if inside and (p.is_absolute() or ".." in p.parts or not self.file(rel).is_file()):
            raise RunError(f"no checkpoint {rel!r} inside run {self.name} (give a path "
                           "relative to the run, e.g. trajectory/step_00001000.safetensors)")
        return rel

    def fingerprint(self, rel: str | Path, named: bool = True) -> str:
        """``"<run>/<rel>:<sha256 of its tensors, 16 hex>"``: names a checkpoint of this run
        in another run's result key, so that retraining this run (same file name, other
        weights) makes that result stale instead of silently reused. ``named=False``
        leaves out the run's name (``"<rel>:<sha>"``): the key of a result about the run's
        own checkpoint, which stays valid when the run's folder is copied or renamed."""
        ck = self.load_checkpoint(rel)  # found as load_checkpoint finds it
        path = Path(ck.path)
        sha = tensors_sha({**ck.params, **{f"buffer.{b}": t for b, t in ck.buffers.items()}})
        if path.resolve().is_relative_to(self.path.resolve()):
            inside = path.resolve().relative_to(self.path.resolve())
            where = f"{self.name}/{inside}" if named else str(inside)
        else:  # a checkpoint file outside the run (``--checkpoint /x.safetensors``)
            where = str(path.resolve())
        return f"{where}:{sha}"


_LOCK_FILE = ".lock"


def _bookkeeping(name: str) -> bool:
    """The lock file and leftover temporary files: not part of a run's contents."""
    return name == _LOCK_FILE or bool(_TMP.match(name))


def _clean_tmp(path: Path, top: bool = True) -> None:
    """Remove ``.*.tmp`` files left by writes that were killed before ``os.replace``:
    in ``path`` and its folders, but not in a folder that is a run of its own (a study's
    stacks), whose lock another process may hold while it writes. Such a run is told by
    its lock file, which :meth:`Run.create` makes before anything else there; not by a
    ``config.json``, which every result folder also has (its key: ``search/``,
    ``basin/<tag>.tasks/``, ``tasks/``), so their leftovers (a killed minimum's
    checkpoint, as large as the model) had stayed for good."""
    if not path.is_dir() or (not top and (path / _LOCK_FILE).exists()):
        return
    for p in path.iterdir():
        if p.is_dir() and not p.is_symlink():
            _clean_tmp(p, False)
        elif p.is_file() and _TMP.match(p.name):
            p.unlink(missing_ok=True)
