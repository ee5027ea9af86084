"""Shared pieces of the CLI: the groups, error handling, common options."""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from pathlib import Path

import click
import torch

from ..config import ConfigError
from ..data import DataError
from ..executor import Executor, TaskFailed, make_executor
from ..models import ModelError
from ..options import ExecutorKind, choices
from ..runs import DEFAULT_ROOT, Run, RunError
from ..train import TrainingDiverged

#: a seed option's range, the data seeds' and numpy's (a larger one overflowed deep in
#: torch: "Overflow when unpacking long long")
SEED = click.IntRange(0, 2**32 - 1)

# Errors a user can act on: printed as one line, exit status 1.
USER_ERRORS = (ConfigError, DataError, ModelError, RunError, TrainingDiverged, ValueError,
               FileNotFoundError, TaskFailed)


def friendly(fn):
    """Turn expected errors into one clean line and a non-zero exit.

    Set ``MINEFIELD_DEBUG=1`` to see the full traceback instead.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except USER_ERRORS as e:
            if os.environ.get("MINEFIELD_DEBUG"):
                raise
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise click.ClickException(msg) from None
        except OSError as e:  # a read-only folder, a full disk, a file we may not read
            if os.environ.get("MINEFIELD_DEBUG"):
                raise
            raise click.ClickException(_os_error(e)) from None
        except MemoryError:
            raise click.ClickException(out_of_memory()) from None
        except KeyboardInterrupt:
            raise click.ClickException(
                "interrupted; run the same command again to resume") from None
        except Exception as e:  # a bug: still one line, the traceback on request
            if os.environ.get("MINEFIELD_DEBUG"):
                raise
            if isinstance(e, RuntimeError) and _ALLOC_FAILED.search(str(e)):
                raise click.ClickException(out_of_memory(str(e))) from None
            first = str(e).splitlines()[0][:200] if str(e) else ""
            raise click.ClickException(
                f"unexpected error {type(e).__name__}: {first} (this is a bug; "
                "MINEFIELD_DEBUG=1 shows the traceback)") from None

    return wrapper


# how torch's allocators fail: a RuntimeError (torch.OutOfMemoryError on CUDA), not a
# MemoryError: "DefaultCPUAllocator: can't allocate memory: you tried to allocate 36800000000
# bytes", "CUDA out of memory. Tried to allocate 20.00 GiB"
_ALLOC_FAILED = re.compile(r"can't allocate memory|out of memory|DefaultCPUAllocator", re.I)
_ALLOC_BYTES = re.compile(r"tried to allocate (\d+) bytes", re.I)
_ALLOC_SIZE = re.compile(r"tried to allocate ([\d.]+ [KMGT]i?B)", re.I)


def out_of_memory(detail: str = "") -> str:
    """The one line for a failed allocation, with its size when the allocator said it."""
    size = ""
    if m := _ALLOC_BYTES.search(detail):
        size = f" (tried to allocate {int(m.group(1)) / 1e9:.1f} GB)"
    elif m := _ALLOC_SIZE.search(detail):
        size = f" (tried to allocate {m.group(1)})"
    return (f"out of memory{size}; use smaller models, fewer members, directions, rollouts, "
            "samples or points, or a smaller --memory-mb")


def _os_error(e: OSError) -> str:
    where = f": {e.filename}" if e.filename else ""
    why = e.strerror or str(e) or type(e).__name__
    if isinstance(e, PermissionError):
        return f"permission denied{where} (is the folder read-only?)"
    if e.errno == 28:
        return f"no space left on the device{where}; nothing was half-written (writes " \
               "are atomic), free space and run the same command again"
    return f"{why}{where}"


def _one_line(message, category, *_args, **_kw) -> str:
    """A warning as the command line shows it: one line, no source file or code."""
    return f"Warning: {message}\n"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--threads", type=click.IntRange(1), default=None, envvar="MINEFIELD_THREADS",
              help="CPU threads for torch (default: torch's choice). Env: MINEFIELD_THREADS.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_ROOT,
              show_default=True, envvar="MINEFIELD_RUNS", help="Folder holding run directories.")
@click.pass_context
def main(ctx: click.Context, threads: int | None, root: Path) -> None:
    """minefield: poisoned minima, basin volume and loss landscapes (Huang et al. 2019)."""
    if threads:
        torch.set_num_threads(threads)
    warnings.formatwarning = _one_line
    ctx.ensure_object(dict)
    ctx.obj["root"] = root


@main.group()
def plot() -> None:
    """Draw figures from run directories."""


def root_of(ctx: click.Context) -> Path:
    return (ctx.find_root().obj or {}).get("root", DEFAULT_ROOT)


def open_run(ctx: click.Context, name: str) -> Run:
    """The run called ``name`` under ``--root`` (a name, never a path)."""
    return Run.open_named(name, root_of(ctx))


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


def parse_ints(text: str | None) -> tuple[int, ...] | None:
    """``"1,2 3"`` -> ``(1, 2, 3)``; ``None`` stays ``None``; a clear error otherwise."""
    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"expected integers like '23,16,26', got {text!r}") from None


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"expected numbers like '0,0.1,0.5', got {text!r}") from None


def parse_beta(ctx, param, value):
    """Click callback: a poison factor in [0, 1), or ``concat`` (None: the poison share)."""
    if value is None:
        return param.default if isinstance(param.default, float) else None
    if value.lower() in ("concat", "none"):
        return None
    try:
        b = float(value)
    except ValueError:
        raise click.BadParameter("a number in [0, 1) or 'concat'") from None
    if not 0.0 <= b < 1.0:
        raise click.BadParameter(f"beta must be in [0, 1), got {b}")
    return b


def parse_cap(ctx, param, value):
    """Click callback: an accuracy in [0, 1], or ``none`` (off)."""
    if value is None or value.lower() in ("none", "off"):
        return None
    try:
        c = float(value)
    except ValueError:
        raise click.BadParameter("a number in [0, 1] or 'none'") from None
    if not 0.0 <= c <= 1.0:
        raise click.BadParameter(f"must be in [0, 1], got {c}")
    return c


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]),
                             default="auto", show_default=True)
force_option = click.option("--force", is_flag=True,
                            help="Overwrite existing results instead of refusing/resuming.")


def executor_options(fn):
    """``--executor local|ray``, ``--address``, ``--cpus-per-task``, ``--gpus-per-task``."""
    opts = [
        click.option("--executor", type=click.Choice(choices(ExecutorKind)), default="local",
                     show_default=True, help="Where tasks run: this process, or Ray "
                     "(pip install minefield[ray])."),
        click.option("--address", help="ray: 'auto' (this machine's cluster) or HOST:PORT; "
                     "default: start Ray on this machine."),
        click.option("--cpus-per-task", type=click.FloatRange(min=0, min_open=True),
                     default=1.0, show_default=True, help="ray: CPUs each task asks for."),
        click.option("--gpus-per-task", type=click.FloatRange(min=0), default=0.0,
                     show_default=True, help="ray: GPUs each task asks for (0.25: four "
                     "tasks share a GPU)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def executor_of(opts: dict) -> Executor | None:
    """The executor the options ask for (popping them from ``opts``); None for ``local``.

    Built before anything is written: without Ray, ``--executor ray`` is one line
    saying ``pip install minefield[ray]``, and so are task resources no node has.
    """
    kind = opts.pop("executor")
    address, cpus, gpus = opts.pop("address"), opts.pop("cpus_per_task"), opts.pop(
        "gpus_per_task")
    if kind == "local":
        return None
    executor = make_executor(kind, address, cpus, gpus)
    executor.check()  # resources no node has: one line, not a silent wait
    return executor
