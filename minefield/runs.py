"""Run directories: the one place that reads and writes files.

Layout of ``runs/<name>/``::

    config.json                 the experiment config (written when the run starts)
    metrics.jsonl               one JSON object per logged step and member
    state.safetensors           latest full training state, for resuming
    trajectory/step_XXXXXXXX.safetensors   self-describing checkpoints
    <stage>/...                 results of later stages (search, basin, embed, ...)

Every write is atomic (temporary file in the same folder, fsync, ``os.replace``):
a kill at any moment leaves either the old file or the new one, never a torn
one. Checkpoints are safetensors files whose metadata holds the experiment
config, step, seed and metrics as JSON, so a point of a trajectory can be
rebuilt without the command line that made it, and loading never unpickles.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["Run", "RunError", "Checkpoint", "atomic_write", "write_json", "read_json",
           "save_tensors", "load_tensors", "DEFAULT_ROOT", "check_name", "read_limited",
           "reading"]

DEFAULT_ROOT = Path("runs")
FORMAT = "minefield/1"
#: Longest run name accepted (a folder name; room is left for suffixes and temp files).
MAX_NAME = 100
#: Largest JSON file (config, results) read; larger ones are refused, not read.
MAX_JSON_BYTES = 256 * 2**20
#: Largest checkpoint read.
MAX_CHECKPOINT_BYTES = 64 * 2**30
_TMP = re.compile(r"^\..+\.tmp$")


class RunError(RuntimeError):
    """A run directory that is missing, corrupt, or would be overwritten."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def read_limited(path: Path | str, limit: int, what: str = "file") -> bytes:
    """The bytes of regular file ``path``, refusing devices, FIFOs and files over ``limit``."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise RunError(f"{what} {path} is not a regular file")
        if st.st_size > limit:
            raise RunError(f"{what} {path} has {st.st_size} bytes, more than the "
                           f"{limit} accepted")
        with open(path, "rb") as f:
            data = f.read(st.st_size + 1)  # a file growing while read: caught below
    except FileNotFoundError:
        raise RunError(f"missing {what}: {path}") from None
    except IsADirectoryError:
        raise RunError(f"{what} {path} is a directory") from None
    if len(data) > limit:
        raise RunError(f"{what} {path} grew past {limit} bytes while being read")
    return data


@contextlib.contextmanager
def reading(path: Path | str) -> Iterator[None]:
    """Report a file whose contents do not have the expected shape as one RunError.

    Wrap the code that interprets a saved result (``d["members"]``, ``meta["row"]``):
    a hand-edited, truncated or foreign file gives ``RunError: ... is corrupt``
    instead of a KeyError deep inside.

    Example::

        >>> saved = [1, 2]  # a list where an object was expected
        >>> with reading("runs/x/basin/default.json"):  # doctest: +ELLIPSIS
        ...     saved["members"]
        Traceback (most recent call last):
        minefield.runs.RunError: runs/x/basin/default.json is corrupt or not ... to redo it
    """
    try:
        yield
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise RunError(f"{path} is corrupt or not what minefield wrote ({type(e).__name__}: "
                       f"{str(e)[:80]}); use --force to redo it") from None


def atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    new_dirs = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except BaseException:
        for d in new_dirs:  # a failed write leaves no empty folders behind
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    try:
        # mkstemp makes 0600 files; results are meant to be shared as the umask says
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_limited(path, MAX_JSON_BYTES, "file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"corrupt JSON in {path}: {e}") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors plus JSON metadata as one safetensors file, atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, st_save(flat, metadata={"minefield": json.dumps(meta), "format": FORMAT}))


def load_tensors(path: Path, device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors` (no unpickling)."""
    path = Path(path)
    try:
        raw = read_limited(path, MAX_CHECKPOINT_BYTES, "checkpoint")
        tensors = st_load(raw)
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        meta = json.loads(header.get("__metadata__", {}).get("minefield", "{}"))
    except RunError:
        raise
    except (SafetensorError, ValueError, json.JSONDecodeError, RuntimeError, TypeError,
            AttributeError) as e:
        raise RunError(f"corrupt checkpoint {path}: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise RunError(f"corrupt checkpoint {path}: its metadata is not an object")
    return {k: v.to(device) for k, v in tensors.items()}, meta


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
        p = Path(rel_or_path)
        p = p if p.is_absolute() or p.exists() else self.file(str(rel_or_path))
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


_LOCK_FILE = ".lock"


def _bookkeeping(name: str) -> bool:
    """The lock file and leftover temporary files: not part of a run's contents."""
    return name == _LOCK_FILE or bool(_TMP.match(name))


def _clean_tmp(path: Path) -> None:
    """Remove ``.*.tmp`` files left by writes that were killed before ``os.replace``."""
    if not path.is_dir():
        return
    for p in path.rglob(".*.tmp"):
        if p.is_file() and _TMP.match(p.name):
            p.unlink(missing_ok=True)
