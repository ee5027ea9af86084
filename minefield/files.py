"""Safe single-file reads and writes, used by the run directories (:mod:`minefield.runs`).

Every write is atomic (temporary file in the same folder, fsync, ``os.replace``):
a kill at any moment leaves either the old file or the new one, never a torn
one. Reads are size-limited and refuse devices and FIFOs. Tensors go to
safetensors files whose metadata holds JSON, so loading never unpickles.
Everything here raises :class:`RunError` (one line) for a file that is missing,
too large or corrupt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["RunError", "atomic_write", "write_json", "read_json", "save_tensors", "load_tensors",
           "read_limited", "reading", "unique_keys", "MAX_JSON_BYTES", "MAX_CHECKPOINT_BYTES"]

FORMAT = "minefield/1"
#: Largest JSON file (config, results) read; larger ones are refused, not read.
MAX_JSON_BYTES = 256 * 2**20
#: Largest checkpoint read.
MAX_CHECKPOINT_BYTES = 64 * 2**30


class RunError(RuntimeError):
    """A run directory that is missing, corrupt, or would be overwritten."""


# its public home (tracebacks, doctests and pickles name it there)
RunError.__module__ = "minefield.runs"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes 0600 files; results are meant to be shared as the umask says
            os.fchmod(fd, 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        # a failed write leaves no empty folders behind (a full disk at fsync had left
        # ``search/`` without its config.json: 'missing file' on every rerun)
        for d in new_dirs:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode())


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for the JSON files people write (configs, grids): ``json``
    keeps the last of a key given twice, silently (``{"lr": 0.5, "steps": 3, "lr": 0.001}``
    trained at 0.001); a key given twice in one object is refused."""
    d = dict(pairs)
    if len(d) < len(pairs):
        seen: set[str] = set()
        twice = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
        raise RunError(f"a JSON object gives the key(s) {', '.join(twice)} twice (which "
                       "value is meant?)")
    return d


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_limited(path, MAX_JSON_BYTES, "file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"corrupt JSON in {path}: {e}") from None


def tensors_sha(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 (16 hex) of named tensors, in name order: a checkpoint's identity by content."""
    h = hashlib.sha256()
    for k, v in sorted(tensors.items()):
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors plus JSON metadata as one safetensors file, atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    raw = st_save(flat, metadata={"minefield": json.dumps(meta), "format": FORMAT})
    atomic_write(path, _canonical(raw))


def _canonical(raw: bytes) -> bytes:
    """``raw`` with its metadata keys in sorted order: safetensors writes them in a hash
    map's random order, so the same tensors and metadata gave different bytes (and
    checksums) from one save to the next. The header is padded with spaces to a
    multiple of 8 bytes, as the format allows; the tensor offsets are relative to the
    data, which is unchanged."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


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
