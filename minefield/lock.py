"""One writer per run: an exclusive advisory lock on a run directory.

Every command that writes a run holds ``runs/<name>/.lock`` with
``fcntl.flock(LOCK_EX | LOCK_NB)``. The holder records its pid, start time and
command line in the file, so a second writer is refused with one line naming
it. The kernel releases a ``flock`` when its process dies, so a lock left by a
killed process is never in the way (its stale pid is simply overwritten); a lock
whose recorded pid no longer runs but is still held belongs to a child process
that inherited the descriptor, and the message says so.

Locks are re-entrant within one process (``train_run`` followed by
``search_run`` on the same run in one script takes it once). A lock taken inside
:func:`scoped` (every library function that writes a run is wrapped in it) is
released when that call returns; one taken outside any scope (a CLI command
writing directly) is held until the process exits or :func:`release` is called.

Reading a run never takes the lock: plots and listings work while a run trains.

Example::

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> with scoped():
    ...     acquire(d)
    ...     holder(d)["pid"] == os.getpid()
    True
    >>> is_held(d)
    False
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .runs import RunError

__all__ = ["LOCK_FILE", "RunLocked", "acquire", "release", "is_held", "holder", "scoped",
           "locking"]

LOCK_FILE = ".lock"
_F = TypeVar("_F", bound=Callable[..., Any])


class RunLocked(RunError):
    """Another process is writing this run."""


# realpath of the run directory -> [open file, count]
_held: dict[str, list[Any]] = {}
_mutex = threading.RLock()
_scopes = threading.local()


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(path: Path | str) -> dict[str, Any] | None:
    """What the lock file of run directory ``path`` records (``pid``, ``since``, ``cmd``)."""
    try:
        text = (Path(path) / LOCK_FILE).read_text()[:4096]
        info = json.loads(text)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _refusal(path: Path) -> RunLocked:
    info = holder(path) or {}
    pid = info.get("pid")
    since = info.get("since")
    cmd = str(info.get("cmd", ""))[:120]
    who = f"pid {pid}" if pid else "another process"
    if isinstance(pid, int) and not _alive(pid):
        who += " (no longer running; a child process of it still holds the lock)"
    when = f" since {time.strftime('%H:%M:%S', time.localtime(since))}" if isinstance(
        since, int | float) else ""
    what = f" ({cmd})" if cmd else ""
    return RunLocked(f"run {path.name} is being written by {who}{when}{what}; wait for it "
                     "to finish or stop it")


def _command() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("__main__.py", "minefield"):
        argv[0] = "minefield"
    return " ".join(argv)[:500]


def _open_lock(path: Path):
    """The run's lock file, opened without following a symbolic link: ``.lock`` in a
    copied or unpacked run pointing at another file had that file truncated and
    overwritten by every writer (a dangling link created its target)."""
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError:
        if (path / LOCK_FILE).is_symlink():
            raise RunError(f"run {path.name}: its lock file {path / LOCK_FILE} is a symbolic "
                           "link; remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunError(f"run {path.name}: its lock file {path / LOCK_FILE} is not a regular "
                       "file; remove it")
    return os.fdopen(fd, "r+")


def acquire(path: Path | str) -> None:
    """Take the write lock of run directory ``path`` (created if missing), or raise.

    Raises:
        RunLocked: another process holds it; the message names the holder.
    """
    path = Path(path)
    key = _key(path)
    with _mutex:
        if key in _held:
            _held[key][1] += 1
        else:
            path.mkdir(parents=True, exist_ok=True)
            f = _open_lock(path)
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise _refusal(path) from None
            except OSError:
                f.close()
                raise
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "since": int(time.time()),
                                "cmd": _command()}) + "\n")
            f.flush()
            _held[key] = [f, 1]
        stack = getattr(_scopes, "stack", None)
        if stack:
            stack[-1].append(key)


def release(path: Path | str) -> None:
    """Give back one hold of the lock on ``path``; the last one unlocks it."""
    key = _key(path)
    with _mutex:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _held[key]
            f = entry[0]
            with contextlib.suppress(OSError):
                f.seek(0)
                f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()


def is_held(path: Path | str) -> bool:
    """Whether this process holds the lock of ``path``."""
    return _key(path) in _held


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """Release, on exit, every lock acquired inside the block."""
    stack = getattr(_scopes, "stack", None)
    if stack is None:
        stack = _scopes.stack = []
    stack.append([])
    try:
        yield
    finally:
        for key in stack.pop():
            release(key)


def locking(fn: _F) -> _F:
    """Decorator: locks ``fn`` takes on runs are released when it returns."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with scoped():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
