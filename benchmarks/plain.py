"""The plain-PyTorch comparators every benchmark times minefield against.

What a researcher writes in ten minutes, done well: one ``nn.Module``, the data
in large batches, ``torch.no_grad`` for evaluation, parameters overwritten in
place (no ``load_state_dict`` or ``deepcopy`` per point), ``torch.optim`` for
training, and ``torch.autocast`` where minefield's run uses it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from minefield.autotune import timed
from minefield.directions import random_directions

__all__ = ["plain_net", "point_loop", "train_steps", "median_time", "side_by_side",
           "common_args", "setup"]


def common_args(ap: argparse.ArgumentParser, threads: int | None = 2) -> None:
    """``--device``, ``--threads`` and ``--repeats``, shared by every benchmark."""
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=3)


def setup(args) -> torch.device:
    """Apply ``--threads``; print and return the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, device {dev} ({name}), {torch.get_num_threads()} "
          f"CPU threads")
    return dev


def median_time(fn, repeats: int, dev: torch.device | str = "cpu") -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up (the
    library's own timer, :func:`minefield.autotune.timed`)."""
    return timed(fn, repeats, dev)


def side_by_side(fns: dict, repeats: int, dev: torch.device | str = "cpu") -> dict:
    """``{name: (median wall seconds, median CPU seconds of this process, median minor
    page faults)}``, the functions called in turn within each repeat (after one untimed
    warm-up round), so that a load that comes and goes on a shared machine hits all of
    them alike. CPU time (``time.process_time``, all threads) leaves out the time spent
    waiting for a core; a CUDA device is synchronised around each call. Page faults
    (``getrusage``): glibc hands tensors of more than its (adaptive) mmap threshold
    back to the OS when they are freed, so a loop that allocates large activations
    can spend more time faulting fresh pages in than computing."""
    dev = torch.device(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    for fn in fns.values():
        fn()
    wall, cpu, flt = ({k: [] for k in fns} for _ in range(3))
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t, c, f = time.perf_counter(), time.process_time(), faults()
            fn()
            sync()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
            flt[k].append(faults() - f)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k]),
                statistics.median(flt[k])) for k in fns}


def tiled_directions(theta: dict[str, torch.Tensor], k: int, g: torch.Generator,
                     device: torch.device | str = "cpu", base: int = 4096
                     ) -> dict[str, torch.Tensor]:
    """``k`` filter-normalised directions at ``theta`` (one model), on ``device``; past
    ``base`` the first ``base`` repeat (speed is measured, and every point keeps its own
    ``t``): 131k fresh ones take longer to draw on the CPU than the benchmark itself."""
    d = random_directions(theta, min(k, base), "filter", "zero", g)
    return {n: v.to(device).repeat(-(-k // len(v)), *[1] * (v.dim() - 1))[:k]
            for n, v in d.items()}


def plain_net(model: nn.Module, params: dict[str, torch.Tensor],
              buffers: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """An ordinary module holding member 0 of ``params`` (and ``buffers``)."""
    net = copy.deepcopy(model).to(next(iter(params.values())).device)
    net.load_state_dict({k: v[0] for k, v in {**params, **(buffers or {})}.items()},
                        strict=False)
    return net.eval()


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], y.to(logits.dtype))
    return F.cross_entropy(logits, y)


@torch.no_grad()
def point_loop(net: nn.Module, centre: dict[str, torch.Tensor], dirs: dict[str, torch.Tensor],
               ts: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch: int = 4096,
               autocast: torch.dtype | None = None, channels_last: bool = False
               ) -> torch.Tensor:
    """Loss at ``centre + ts[k] d_k`` for every k: write the point into the module's
    parameters in place, run the data in batches of ``batch``. Returns ``(K,)``."""
    params = dict(net.named_parameters())
    dev = x.device
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = (torch.autocast(dev.type, dtype=autocast) if autocast is not None
           else contextlib.nullcontext())
    out = torch.empty(len(ts), dtype=torch.float64, device=dev)
    for k in range(len(ts)):
        for name, p in params.items():
            torch.add(centre[name][0], dirs[name][k], alpha=float(ts[k]), out=p.data)
        total = torch.zeros((), dtype=torch.float64, device=dev)
        with ctx:
            for i in range(0, len(y), batch):
                total += _loss(net(x[i:i + batch]).float(), y[i:i + batch]).double() * len(
                    y[i:i + batch])
        out[k] = total / len(y)
    return out


def train_steps(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 0.1,
                momentum: float = 0.9) -> None:
    """``steps`` SGD steps of the ordinary training loop on one batch."""
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        _loss(net(x), y).backward()
        opt.step()
    net.eval()
