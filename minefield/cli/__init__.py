"""The ``minefield`` command line: thin click commands over the Python API.

Each command parses options into a config, calls one library function and
saves through :mod:`minefield.runs`. Errors the user can fix (bad input, a
missing or corrupt run, a diverged loss) print one line and exit with status 1
or 2; nothing already in a run directory is overwritten without ``--force``.

Subcommands live in sibling modules (``train``, ``search``, ``basin``, ...),
each registering itself on :data:`main` or :data:`plot`.
"""

from __future__ import annotations

from . import train as _train  # noqa: F401,E402  (registers commands)
from ._common import main, plot  # noqa: F401  (groups)

for _mod in ("search", "basin", "sweep", "reproduce", "sharpness", "connect", "study"):
    try:  # optional command modules register themselves when present
        __import__(f"{__name__}.{_mod}")
    except ModuleNotFoundError as e:  # pragma: no cover - only while developing
        if e.name != f"{__name__}.{_mod}":
            raise

__all__ = ["main", "plot"]
