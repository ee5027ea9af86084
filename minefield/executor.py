"""Independent tasks, run in this process or on a Ray cluster, their results kept in a run.

A multi-task stage (a sweep's blocks of models, a basin's blocks of directions)
is a mapping ``{task_id: spec}`` and one *pure, top-level* task function
``fn(spec) -> result``: it reads nothing from and writes nothing to the run
directory, so it runs the same in any process on any machine, and its numbers
depend only on the spec (seeds come from the task's identity, never from the
order tasks run in). An executor maps ``fn`` over the specs:

``local`` (default)
    in this process, one after another; Ray is never imported.
``ray``
    as Ray tasks that each ask for ``cpus_per_task`` CPUs and ``gpus_per_task``
    GPUs (fractions allowed: ``0.25`` packs four tasks on a GPU). ``address``:
    ``None`` starts a Ray instance on this machine (or joins ``RAY_ADDRESS``),
    ``"auto"`` joins the cluster this machine belongs to, ``"HOST:PORT"`` a
    given one. Ray is an optional extra: ``pip install minefield[ray]``. An
    instance started here runs its workers at niceness 0 (Ray's default, 15,
    starves them on a shared machine); on a cluster, start the nodes with
    ``RAY_worker_niceness=0 ray start ...`` for the same.

:func:`run_tasks` is the driver's loop: results already in the
:class:`TaskStore` are loaded, only the missing tasks are submitted, and each
result is written (atomically, by the driver, as it arrives) before the next
one is awaited. A killed worker (Ray retries its task ``max_retries`` times), a
failed task or a killed driver therefore loses at most the tasks in flight,
and the same call again redoes exactly those; no task is done twice once
stored. Worker nodes need minefield installed and, for file datasets, the
data; they need no shared file system, since only the driver writes.

Torch's CPU kernels can round differently with a different number of threads:
a Ray task runs with ``max(1, int(cpus_per_task))`` threads, so batched numbers
are bit-identical to the local executor when the driver uses as many. Stages of
isolated members (``train.isolate``) run single-threaded wherever they run,
and then no split, executor or thread count changes a number.

Example::

    >>> ex = make_executor("local")
    >>> ex.map(abs, [-1, 2, -3])
    [1, 2, 3]
    >>> task_seed("sweep", 0.3, 1) == task_seed("sweep", 0.3, 1)
    True
    >>> make_executor("dask")
    Traceback (most recent call last):
    ...
    minefield.options.ConfigError: executor: 'dask' is not one of local, ray
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .options import ConfigError, ExecutorKind, option
from .runs import Run, RunError, load_tensors, save_tensors

__all__ = ["Executor", "ExecutorKind", "LocalExecutor", "RayExecutor", "make_executor",
           "TaskFailed", "TaskStore", "run_tasks", "task_seed", "torch_threads", "RAY_MISSING"]

#: Ray's setting of its workers' niceness (default 15); an instance started here uses 0
WORKER_NICENESS = "RAY_worker_niceness"
RAY_MISSING = "the ray executor needs Ray, which is not installed: pip install minefield[ray]"

OnResult = Callable[[int, Any], None]


class TaskFailed(RuntimeError):
    """Some tasks failed; the results of the others were delivered (and stored)."""


def task_seed(*identity: Any) -> int:
    """A 63-bit seed from a task's identity (its stage, grid point, block...), the same in
    every process and on every machine (unlike ``hash``, which Python salts per process)."""
    digest = hashlib.sha256(repr(identity).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads (``None``: unchanged), then
    restore the count. Tasks of isolated members run with 1, so their numbers do
    not depend on the machine's cores or ``cpus_per_task``."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Executor:
    """Maps a top-level function over specs: ``map(fn, specs) -> [fn(s) for s in specs]``."""

    def map(self, fn: Callable[[Any], Any], specs: Sequence[Any],
            on_result: OnResult | None = None) -> list[Any]:
        """``[fn(s) for s in specs]`` in spec order; ``on_result(i, result)`` hears each
        result as it arrives (in any order), before the next one is awaited.

        Raises:
            TaskFailed: one or more tasks raised (or their worker died past its
                retries); every other result was still delivered to ``on_result``.
        """
        raise NotImplementedError

    def check(self) -> None:
        """Refuse (ConfigError), before anything is written, tasks that could never run."""

    def close(self) -> None:
        """Release what the executor started (a Ray instance it started itself)."""


def _failure(i: int, e: BaseException) -> str:
    """One line naming a failed task and its error's last line."""
    return (f"task {i}: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}")


def _failed(failed: list[str], n: int, repeats: bool = False) -> TaskFailed:
    """``repeats``: every failure would repeat on a rerun (a seeded run's divergence)."""
    hint = ("rerunning repeats them (same seed, same numbers)" if repeats else
            "run the same command again to redo only those")
    return TaskFailed(f"{len(failed)} of {n} tasks failed ({failed[0]}); {hint}")


class LocalExecutor(Executor):
    """One task after another in this process (no Ray import). A task that raises does
    not stop the others: they still run and are delivered, then :class:`TaskFailed`
    (chained to the first error) says which failed."""

    def __repr__(self) -> str:
        return "LocalExecutor()"

    def map(self, fn, specs, on_result=None):
        out: list[Any] = [None] * len(specs)
        failed: list[str] = []
        first: Exception | None = None
        repeats = True
        for i, spec in enumerate(specs):
            try:
                out[i] = fn(spec)
            except Exception as e:  # noqa: BLE001 - the others still run, as on Ray
                failed.append(_failure(i, e))
                first, repeats = first or e, repeats and getattr(e, "repeats", False)
                continue
            if on_result:
                on_result(i, out[i])
        if failed:
            raise _failed(failed, len(specs), repeats) from first
        return out


def _with_threads(fn: Callable[[Any], Any], spec: Any, threads: int) -> Any:
    torch.set_num_threads(threads)
    return fn(spec)


class RayExecutor(Executor):
    """Tasks as Ray tasks with fractional resources (see the module docstring).

    ``init`` holds extra ``ray.init`` keywords for an instance started here
    (e.g. ``num_cpus=2, include_dashboard=False``); it is not used to join a
    running cluster. Ray is started lazily, on the first :meth:`map`.

    Raises:
        ConfigError: Ray is not installed, or a resource is not a positive number.
    """

    def __init__(self, address: str | None = None, cpus_per_task: float = 1.0,
                 gpus_per_task: float = 0.0, max_retries: int = 2, **init: Any):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError(RAY_MISSING) from None
        if not (cpus_per_task > 0 and math.isfinite(cpus_per_task)):
            raise ConfigError(f"cpus_per_task must be a positive number, got {cpus_per_task}")
        if not (gpus_per_task >= 0 and math.isfinite(gpus_per_task)):
            raise ConfigError(f"gpus_per_task must be >= 0, got {gpus_per_task}")
        if max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {max_retries}")
        self.address, self.cpus, self.gpus = address, float(cpus_per_task), float(gpus_per_task)
        self.max_retries, self.init, self._started = max_retries, init, False
        self._warned = False  # the CLI, a stage and map() each check: warn once

    def __repr__(self) -> str:
        return (f"RayExecutor(address={self.address!r}, cpus_per_task={self.cpus:g}, "
                f"gpus_per_task={self.gpus:g})")

    def _ray(self):
        import ray

        if not ray.is_initialized():
            if self.address is None:  # Ray nices its workers to 15 by default: on a busy
                # machine they then get a fraction of a core each (measured: 2 workers
                # ran 8 tasks 2-2.6x slower than one plain process, at load 14)
                os.environ.setdefault(WORKER_NICENESS, "0")
            _check_reachable(self.address)  # Ray would retry an address for ever
            # resources of a new instance; a running cluster already has its own
            ray.init(address=self.address, log_to_driver=False,
                     **(self.init if self.address is None else {}))
            self._started = True
        return ray

    def check(self) -> None:
        """Start or join Ray and refuse task resources that no node has (tasks that would
        wait forever, silently): ConfigError for an instance of this machine, a warning
        when joining a cluster (which may add nodes)."""
        ray = self._ray()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if any(r.get("CPU", 0) >= self.cpus and r.get("GPU", 0) >= self.gpus for r in nodes):
            return
        cpu = max((r.get("CPU", 0) for r in nodes), default=0)
        gpu = max((r.get("GPU", 0) for r in nodes), default=0)
        msg = (f"no Ray node has the {self.cpus:g} CPUs and {self.gpus:g} GPUs a task asks for "
               f"(--cpus-per-task, --gpus-per-task; the largest node has {cpu:g} CPUs and "
               f"{gpu:g} GPUs): no task could be scheduled")
        if self.address is None and not os.environ.get("RAY_ADDRESS"):
            raise ConfigError(msg)
        if not self._warned:
            self._warned = True
            warnings.warn(f"{msg} until the cluster adds such a node", stacklevel=2)

    def map(self, fn, specs, on_result=None):
        ray = self._ray()
        self.check()
        remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus,
                            max_retries=self.max_retries)(_with_threads)
        threads = max(1, int(self.cpus))
        refs = [remote.remote(fn, spec, threads) for spec in specs]
        index = {ref: i for i, ref in enumerate(refs)}
        out: list[Any] = [None] * len(refs)
        failed: list[str] = []
        repeats = True
        pending = list(refs)
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            try:
                out[index[ref]] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - keep collecting the others' results
                failed.append(_failure(index[ref], e))  # Ray's error subclasses the cause's
                repeats = repeats and getattr(e, "repeats", False)
                continue
            if on_result:
                on_result(index[ref], out[index[ref]])
        if failed:
            raise _failed(failed, len(refs), repeats)
        return out

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """:class:`ConfigError` unless something answers at a ``host:port`` (or
    ``ray://host:port``) address: ``ray.init`` retries an address where no cluster
    listens for ever, warning every 40 s, and ignores SIGTERM meanwhile."""
    if not address or address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port: Ray parses (and refuses) it itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"no Ray cluster answers at {address} ({e}); start one there "
                          "('ray start --head') or give another --address") from None


def make_executor(kind: ExecutorKind | str = "local", address: str | None = None,
                  cpus_per_task: float = 1.0, gpus_per_task: float = 0.0, **init: Any
                  ) -> Executor:
    """The executor named ``kind`` (``local`` or ``ray``); Ray options are ignored locally.

    Raises:
        ConfigError: an unknown kind, or ``ray`` without Ray installed (one line
            saying ``pip install minefield[ray]``).
    """
    if option(ExecutorKind, kind, "executor") is ExecutorKind.LOCAL:
        return LocalExecutor()
    return RayExecutor(address, cpus_per_task, gpus_per_task, **init)


class TaskStore:
    """Finished task results of one stage, ``<folder>/<task_id>.safetensors`` in a run.

    The folder is keyed like every stage result (:meth:`minefield.runs.Run.resume`):
    results made with another ``key`` are refused unless ``force`` (which deletes
    them). A result is a dict: its tensor values are stored as tensors, the rest
    (JSON values) in the file's metadata; each file is written atomically.
    """

    def __init__(self, run: Run, folder: str, key: dict[str, Any], force: bool = False):
        self.run, self.folder = run, folder
        run.resume(folder, key, force)

    def _rel(self, task_id: str) -> str:
        return f"{self.folder}/{task_id}.safetensors"

    def has(self, task_id: str) -> bool:
        return self.run.exists(self._rel(task_id))

    def save(self, task_id: str, result: Mapping[str, Any]) -> Path:
        tensors = {k: v for k, v in result.items() if torch.is_tensor(v)}
        rest = {k: v for k, v in result.items() if not torch.is_tensor(v)}
        self.run._writing()
        path = self.run.file(self._rel(task_id))
        save_tensors(path, tensors, {"task": task_id, "result": rest})
        return path

    def load(self, task_id: str) -> dict[str, Any]:
        path = self.run.file(self._rel(task_id))
        tensors, meta = load_tensors(path)
        if meta.get("task") != task_id or not isinstance(meta.get("result"), dict):
            raise RunError(f"{path} is not the stored result of task {task_id}; use --force")
        return {**meta["result"], **tensors}


def run_tasks(executor: Executor, fn: Callable[[Any], dict[str, Any]],
              specs: Mapping[str, Any], store: TaskStore | None = None) -> dict[str, Any]:
    """``{task_id: fn(spec)}``: stored results loaded, the missing ones run on ``executor``
    and stored as they arrive (see the module docstring). ``store=None`` keeps nothing.

    Raises:
        TaskFailed: some tasks failed; the others are stored, and calling again
            with the same store runs only the failed ones.
    """
    done = {t: store.load(t) for t in specs if store is not None and store.has(t)}
    todo = [t for t in specs if t not in done]

    def keep(i: int, result: dict[str, Any]) -> None:
        if store is not None:
            store.save(todo[i], result)

    results = executor.map(fn, [specs[t] for t in todo], keep)
    if store is not None:  # read back, so a fresh result and a stored one merge alike
        return {t: done[t] if t in done else store.load(t) for t in specs}
    done.update(zip(todo, results))
    return {t: done[t] for t in specs}
