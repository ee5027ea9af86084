"""The training step without per-step Python overhead on CUDA, when it pays.

A small stacked model (the bad-minimum search: 200 MLPs of 2k parameters) is
launch-bound on a GPU: each step is a few hundred tiny kernels, and Python
dispatch dominates. ``torch.compile(mode="reduce-overhead")`` fuses the objective
(forward and, through AOT autograd, backward) and replays it as a CUDA graph,
at a one-time compile cost of seconds to a minute.

:class:`CompiledObjective` decides by measurement, per :func:`minefield.train.fit`
call: a fit of fewer than ``MIN_STEPS`` steps never compiles (a compile costs
seconds to a minute, more than such a fit can win back); otherwise the first
``probe`` steps run eagerly and are timed, the next ``probe`` run compiled (the
first of them pays the compile, measured as its excess over the others), and
the faster of the two runs the rest. Before the first compilation of an objective in a
process, the eager probe bounds what compiling could save (all of the eager time of the
``horizon`` steps left: the fit's own, or more when the caller will train the same
objective on, as the search's segments do); below :data:`COMPILE_S` the fit stays eager.
The timings are kept in ``.report``. The optimizer update
stays eager (``foreach`` kernels). Modes: ``off`` (the default on a CPU, where
the step is compute-bound), ``on`` (always compiled, e.g. for tests with a
debugging ``backend``) and ``auto`` (measured; off on a CPU).

Compiled and eager steps compute the same function; they agree to rounding
(tests/test_compiled.py on the CPU with ``backend="aot_eager"``, tests/test_gpu.py
with inductor on CUDA). Rounding is all, but the poisoned search amplifies it to O(1):
under ``auto`` which kernels a fit runs depends on measured times and on what the
process compiled before (and the probe's compiled steps are part of the trajectory
either way), so on CUDA a rerun or a resumed search agrees with the uninterrupted one
only to that amplified rounding, not bit for bit. On a CPU ``auto`` is off and
resumes are bit-identical; ``fit(..., compile_mode="off")`` gives the same on CUDA.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .step import Objective

__all__ = ["COMPILE_MODES", "MIN_STEPS", "COMPILE_S", "CompiledObjective", "compiled_objective",
           "sync"]

COMPILE_MODES = ("off", "on", "auto")
MIN_STEPS = 500  # "auto" compiles only fits at least this long
# What "auto" assumes a first compilation costs: one graph of a small MLP's objective
# took about 16 s on a 2-core CPU (inductor; Fig. 1 small scale, 2026-12-01); Triton's on
# a GPU is of that order. Measured per process once paid (``report["compile_s"]``).
COMPILE_S = 15.0
_PAID: set = set()  # (objective code, device type, module id) compiled in this process


def compiled_objective(objective: Objective, backend: str = "inductor",
                       mode: str | None = "reduce-overhead") -> Objective:
    """``objective`` under ``torch.compile`` with dynamic shapes from the first call: one
    graph for every stack size and batch size (but size 1, which dynamo specialises). A
    search compacts its stack as members finish (static shapes recompiled at every
    compaction, until dynamo's recompile limit sent the rest eager), and an epoch may end
    in a smaller batch; automatic dynamic shapes compiled each static first, then once
    more generic: Fig. 1 at small scale on the CPU compiled 4 graphs in 46 s that way,
    2 in 33 s this way, with the same minima."""
    if backend != "inductor":
        mode = None  # modes are inductor's
    return torch.compile(objective, backend=backend, mode=mode, dynamic=True)


class CompiledObjective:
    """An objective that runs eagerly or compiled, chosen by timing (see module doc).

    ``record(seconds)`` is called by the driver after each step with its synced time.
    """

    def __init__(self, objective: Objective, mode: str, device: torch.device, steps: int,
                 probe: int = 5, backend: str = "inductor", horizon: int | None = None,
                 scope: object = None):
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; choose from "
                             f"{', '.join(COMPILE_MODES)}")
        if mode == "auto" and (torch.device(device).type != "cuda" or steps < MIN_STEPS):
            mode = "off"
        self.eager, self.mode, self.steps, self.probe = objective, mode, steps, probe
        self.compiled = compiled_objective(objective, backend) if mode != "off" else None
        self.use_compiled = mode == "on"
        self.times: dict[str, list[float]] = {"eager": [], "compiled": []}
        self.report: dict[str, Any] = {"mode": mode, "decision": mode}
        self.device = torch.device(device)
        self.horizon = steps if horizon is None else max(steps, horizon)
        # what a compiled graph is specialised to: the objective's code, the device and the
        # module it is called with (``scope``; dynamo guards a module argument by identity)
        self.key = (getattr(objective, "__code__", id(objective)), self.device.type, id(scope))

    @property
    def timing(self) -> bool:
        """Whether the driver should time (and so synchronise) the current step."""
        return self.mode == "auto" and self.report["decision"] == "auto"

    def __call__(self, *args):
        return (self.compiled if self.use_compiled else self.eager)(*args)

    def record(self, seconds: float) -> None:
        if not self.timing:
            return
        which = "compiled" if self.use_compiled else "eager"
        self.times[which].append(seconds)
        if which == "eager" and len(self.times["eager"]) >= self.probe:
            if self._cannot_pay():
                return
            self.use_compiled = True
        elif which == "compiled" and len(self.times["compiled"]) >= self.probe:
            _PAID.add(self.key)
            self._decide()

    def _cannot_pay(self) -> bool:
        """Before a first compilation in this process: even a compiled step costing
        nothing saves at most the eager time of the steps left; below :data:`COMPILE_S`
        the compilation cannot pay, and the fit stays eager (reported)."""
        if self.key in _PAID:
            return False
        eager = _median(self.times["eager"])
        bound = eager * (self.horizon - self.probe)
        if bound >= COMPILE_S:
            return False
        self.report.update(decision="eager", eager_ms=1e3 * eager, saving_bound_s=bound,
                           compile_s_assumed=COMPILE_S)
        return True

    def _decide(self) -> None:
        eager = _median(self.times["eager"])
        comp = _median(self.times["compiled"][1:])
        compile_s = self.times["compiled"][0] - comp  # already paid: only the step times decide
        left = max(0, self.steps - 2 * self.probe)
        keep = comp < eager
        self.use_compiled = keep
        self.report.update(decision="compiled" if keep else "eager", eager_ms=1e3 * eager,
                           compiled_ms=1e3 * comp, compile_s=compile_s, steps_left=left)


def _median(times: list[float]) -> float:
    """The upper median (an actual step's time)."""
    return sorted(times)[len(times) // 2]


def sync(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
