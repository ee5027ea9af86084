"""The configuration of :mod:`minefield.connectivity`: how two minima are connected."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .config import ConfigError, Optimizer, TrainConfig, _Config

__all__ = ["CURVE_TRAIN", "ConnectConfig"]

#: Training of the control points: Adam 0.01, 1000 full-batch steps (swiss-roll scale).
CURVE_TRAIN = TrainConfig(optimizer=Optimizer.ADAM, lr=0.01, steps=1000, log_every=1000,
                          checkpoint_every=1000)


@dataclass(frozen=True)
class ConnectConfig(_Config):
    """How two minima are connected: ``n_points`` values of ``t`` in [0, 1] (both ends
    included) to evaluate, and ``train``, the training of the control points (its
    ``seed``, with each pair's endpoints, draws the ``t`` of each step; alone, the
    minibatches; no SAM, ``fit_first`` or poison). ``isolate``: each curve on kernels
    shaped for one model, so its numbers do not depend on the other curves of the stack
    (``False``: one batched pass for all curves, faster on many cores, equal up to
    rounding)."""

    n_points: int = 41
    train: TrainConfig = field(default_factory=lambda: CURVE_TRAIN)
    memory_mb: float = 256.0
    isolate: bool = True
    _section: ClassVar[str] = "connect"

    def _validate(self):
        if isinstance(self.n_points, bool) or not isinstance(self.n_points, int) \
                or self.n_points < 2:
            raise ConfigError(f"connect.n_points must be an integer >= 2, got {self.n_points}")
        if self.n_points > 10_000:  # a plot's resolution; 1e8 points took 23 GB to refuse
            raise ConfigError(f"connect.n_points (--points): at most 10000, got {self.n_points}")
        if not self.memory_mb > 0:
            raise ConfigError(f"connect.memory_mb must be > 0, got {self.memory_mb}")
        t = self.train  # a curve trains on the plain loss of all training points
        off = [k for k in ("fit_first", "poison_batch_size") if getattr(t, k) is not None]
        off += ["sam"] * (t.sam != "none")  # (rho and sam_m need sam: TrainConfig)
        if off:
            raise ConfigError(f"connect.train: {', '.join(off)} do not apply to curve training")

    def ts(self) -> torch.Tensor:
        return torch.linspace(0, 1, self.n_points, dtype=torch.float64)
