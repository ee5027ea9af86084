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

Every write is atomic (temporary file in the same folder, fsync, ``os.replace``):
a kill at any moment leaves either the old file or the new one, never a torn
one. Checkpoints are safetensors files whose metadata holds the experiment
config, step, seed and metrics as JSON, so a point of a trajectory can be
rebuilt without the command line that made it, and loading never unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["Run", "RunError", "Checkpoint", "atomic_write", "write_json", "read_json",
           "save_tensors", "load_tensors", "DEFAULT_ROOT"]

DEFAULT_ROOT = Path("runs")
FORMAT = "minefield/1"


class RunError(RuntimeError):
    """A run directory that is missing, corrupt, or would be overwritten."""


def atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunError(f"missing file: {path}") from None
    except json.JSONDecodeError as e:
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
        raw = path.read_bytes()
        tensors = st_load(raw)
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        meta = json.loads(header.get("__metadata__", {}).get("minefield", "{}"))
    except FileNotFoundError:
        raise RunError(f"missing checkpoint: {path}") from None
    except (SafetensorError, ValueError, json.JSONDecodeError, RuntimeError) as e:
        raise RunError(f"corrupt checkpoint {path}: {e}") from None
    return {k: v.to(device) for k, v in tensors.items()}, meta


def _stored_key(path: Path, folder: bool) -> Any:
    if folder:
        return read_json(path / "config.json") if (path / "config.json").exists() else None
    if path.suffix == ".safetensors":
        return load_tensors(path)[1].get("key")
    return read_json(path).get("key")


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
        which deletes the old run first.
        """
        if not name or "/" in name or name.startswith("."):
            raise RunError(f"invalid run name {name!r}")
        path = Path(root) / name
        cfg_path = path / "config.json"
        if path.exists() and force:
            shutil.rmtree(path)
        elif cfg_path.exists():
            old = read_json(cfg_path)
            if old != json.loads(json.dumps(config)):
                raise RunError(f"run {path} exists with a different config; "
                               "use --force to overwrite it or choose another --name")
            return cls(path)
        elif path.exists() and any(path.iterdir()):
            raise RunError(f"{path} exists and is not a minefield run; use --force or "
                           "another --name")
        path.mkdir(parents=True, exist_ok=True)
        write_json(cfg_path, config)
        return cls(path)

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

    @property
    def config(self) -> dict[str, Any]:
        return read_json(self.path / "config.json")

    # --- generic files ---------------------------------------------------------------
    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def write_json(self, rel: str, obj: Any) -> Path:
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
        partial result). A different key: :class:`RunError`, unless ``force``,
        which deletes the old result and returns False. A folder gets its key
        written here (``rel/config.json``); a file stores it when written
        (:meth:`write_result`, or ``key`` in safetensors metadata).
        """
        path = self.file(rel)
        folder = path.suffix not in (".json", ".safetensors")
        if path.exists():
            if force:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            else:
                old = _stored_key(path, folder)
                if old != json.loads(json.dumps(key)):
                    what = "other settings" if old is not None else "no key (an older minefield)"
                    raise RunError(f"{path} holds results for {what}; use --force to redo "
                                   "them")
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
        atomic_write(p, buf.getvalue().encode())
        return p

    # --- metrics ---------------------------------------------------------------------
    def write_metrics(self, rows: Iterable[dict[str, Any]]) -> None:
        """Replace metrics.jsonl (atomically) with ``rows``."""
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(self.file("metrics.jsonl"), text.encode())

    def metrics(self) -> list[dict[str, Any]]:
        p = self.file("metrics.jsonl")
        if not p.exists():
            return []
        rows = []
        for i, line in enumerate(p.read_text().splitlines()):
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
