"""Minibatches: a pure function of ``(seed, step)``, so a resumed run draws the same.

An epoch is a permutation of the training set seeded by ``(seed, epoch)``; step
``k`` of the epoch takes its ``k``-th slice. The poison set is drawn the same
way from ``seed + 1``, so a member's batches depend on the seed and the step only.

Example::

    >>> batch_indices(10, 4, seed=0, step=0, device="cpu").tolist() == (
    ...     batch_indices(10, 4, seed=0, step=0, device="cpu").tolist())
    True
    >>> batch_indices(10, 10, seed=0, step=0, device="cpu") is None  # the full set
    True
"""

from __future__ import annotations

import math

import torch

from .data import Dataset
from .step import Batch

__all__ = ["batch_indices", "minibatch"]


def batch_indices(n: int, bs: int, seed: int, step: int, device) -> torch.Tensor | None:
    """Indices of step ``step``'s ``bs`` of ``n`` points (None: all of them, ``bs >= n``)."""
    if bs >= n:
        return None
    per_epoch = math.ceil(n / bs)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)[k * bs:(k + 1) * bs].to(device)


def minibatch(data: Dataset, seed: int, step: int, bs: int, bs_p: int,
           poison_weight: torch.Tensor | None) -> Batch:
    """Step ``step``'s minibatch: a pure function of ``(seed, step)``; ``bs_p=0``: no poison."""
    dev = data.y_train.device
    it = batch_indices(len(data.y_train), bs, seed, step, dev)
    xb = data.x_train if it is None else data.x_train[it]
    yb = data.y_train if it is None else data.y_train[it]
    if not bs_p:
        return Batch(xb, yb)
    ip = batch_indices(len(data.y_poison), bs_p, seed + 1, step, dev)
    xp = data.x_poison if ip is None else data.x_poison[ip]
    yp = data.y_poison if ip is None else data.y_poison[ip]
    wp = None if poison_weight is None else (poison_weight if ip is None else poison_weight[ip])
    return Batch(torch.cat([xb, xp]), yb, yp, wp)
