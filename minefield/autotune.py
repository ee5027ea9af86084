"""Engine settings chosen per device and model: memory budgets and measured paths.

The batched engine (:mod:`minefield.engine`) can run the same points in several
ways, and which is fastest depends on the device and the model, not on a
constant tuned on one CPU:

- **memory budget** (:func:`memory_budget_mb`): on CUDA, half the free device
  memory (``torch.cuda.mem_get_info``); on a CPU, 256 MB, so one chunk's
  activations stay near the caches;
- **path** (:func:`choose_path`): ``mlp`` (batched matmuls, plain MLPs only),
  ``vmap`` (all points of a chunk in one call: batched matmuls / grouped
  convolutions) or ``loop`` (one point at a time, each on the whole data batch:
  one ordinary convolution per layer). On CUDA (and on any device with
  ``path="probe"``) a small timing probe runs each candidate on a few points and
  keeps the fastest; the choice is cached per (model shapes, input shape, device,
  dtype), so it is measured once per process. On a CPU ``auto`` is a fixed rule
  taken from ``benchmarks/bench_real.py``'s measurements (plain MLPs ``mlp``, conv
  nets ``loop_cl`` with BatchNorm and ``loop`` without, other nets ``vmap``): a
  probe's choice can flip with the machine's load, and paths agree only to
  rounding, so a probed CPU default would break "same seed, same numbers";
- **arithmetic** (:func:`arithmetic`): float32 (TF32 off on CUDA), or the opt-in bf16
  / tf32;
- **channels_last** for conv nets on the ``loop`` path: probed as a candidate
  of its own (``loop_cl``).

The probe prefers the first candidate unless another is faster by
:data:`MARGIN`, so a choice does not flip on timing noise; the paths agree to
rounding (tested in float64), and a fixed ``path`` gives bit-identical reruns.

Example::

    >>> memory_budget_mb(torch.device("cpu"))
    256.0
    >>> memory_budget_mb(torch.device("cpu"), 64.0)
    64.0
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .options import Precision

__all__ = ["CPU_BUDGET_MB", "CUDA_FREE_SHARE", "MARGIN", "memory_budget_mb", "cache_clamped",
           "choose_path", "pick", "probe_key", "PROBES", "timed", "arithmetic"]

#: the engine's chunk budget on a CPU, in MB
CPU_BUDGET_MB = 256.0
#: share of the free CUDA memory one engine call may fill
CUDA_FREE_SHARE = 0.5
#: a later candidate must be this much faster (time ratio) to replace the first
MARGIN = 1.15

#: probe results: key -> (chosen path, {path: seconds per point})
PROBES: dict[tuple, tuple[str, dict[str, float]]] = {}


def memory_budget_mb(device: torch.device | str, memory_mb: float | None = None) -> float:
    """``memory_mb`` if given, else the device's default budget (MB) for one engine chunk.

    CUDA: ``CUDA_FREE_SHARE`` x the free memory reported by ``torch.cuda.mem_get_info``;
    CPU: :data:`CPU_BUDGET_MB`.
    """
    if memory_mb is not None:
        return float(memory_mb)
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return CUDA_FREE_SHARE * free / 2**20
    return CPU_BUDGET_MB


def cache_clamped(device: torch.device | str) -> bool:
    """Whether the engine's chunks (MLP layers, the looped paths' input batches) are
    clamped to a CPU cache's size (only on CPUs: a GPU's bandwidth does not fall off a
    cliff past a few MB)."""
    return torch.device(device).type == "cpu"


def probe_key(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
              extra: tuple = ()) -> tuple:
    """What a probe's answer depends on: the model's structure (every submodule's
    class: two ``nn.Sequential`` with the same shapes but other activations may not
    share a path) and parameter shapes, the input's shape, the device and dtype (and
    anything in ``extra``, e.g. the BN policy)."""
    shapes = tuple((k, tuple(v.shape[1:])) for k, v in params.items())
    structure = tuple((name, type(mod).__qualname__)  # a reused module at each place
                      for name, mod in model.named_modules(remove_duplicate=False))
    return (structure, shapes, tuple(x.shape[1:]), len(x), str(x.device),
            next(iter(params.values())).dtype, *extra)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int = 3, device: torch.device | str = "cpu"
          ) -> float:
    """Median wall time (s) of ``fn()`` over ``repeats`` runs after one warm-up."""
    device = torch.device(device)
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def choose_path(key: tuple, candidates: Sequence[str],
                run: Callable[[str], Callable[[], object]], per: int = 1,
                device: torch.device | str = "cpu", repeats: int = 3) -> str:
    """The fastest of ``candidates`` by a timing probe, cached under ``key``.

    ``run(path)`` returns a closure that does the probe's work on that path
    (``per`` points). A later candidate wins only if it is :data:`MARGIN` times
    faster than the best earlier one. One candidate: returned unprobed.
    """
    if len(candidates) == 1:
        return candidates[0]
    if key not in PROBES or PROBES[key][0] not in candidates:
        cost = {c: timed(run(c), repeats, device) / per for c in candidates}
        PROBES[key] = (pick(cost), cost)
    return PROBES[key][0]


def pick(cost: dict[str, float]) -> str:
    """The candidate to use given its measured ``cost`` (s), in preference order: a later
    one replaces the best so far only if :data:`MARGIN` times faster.

    >>> pick({"vmap": 1.0, "loop": 0.95}), pick({"vmap": 1.0, "loop": 0.5})
    ('vmap', 'loop')
    """
    names = list(cost)
    best = names[0]
    for c in names[1:]:
        if cost[c] * MARGIN < cost[best]:
            best = c
    return best


@contextlib.contextmanager
def arithmetic(precision: Precision, device: torch.device):
    """The engine's arithmetic for ``precision``: ``bf16`` is autocast; on CUDA ``tf32``
    turns TF32 matmuls and convolutions on and ``float32`` off (cuDNN's default is TF32
    convolutions: 3e-4 off float32), the flags restored after."""
    if precision is Precision.BF16:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    elif device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        tf32 = precision is Precision.TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield
