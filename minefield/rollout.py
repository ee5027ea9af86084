"""Rollouts (Huang et al. 2019, Fig. 5): the train loss along random directions.

The loss at signed distances ``t`` along the same directions the basin radii
use (:func:`minefield.basin.basin_radii`), one batched evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .data import Dataset, train_xy
from .directions import DirectionSpec, check_units, random_directions
from .engine import evaluate_points
from .stacked import Params, check_single, member

__all__ = ["Rollouts", "rollouts"]


@dataclass
class Rollouts:
    """Train loss along K random directions at signed distances ``ts`` (Fig. 5)."""

    ts: torch.Tensor  # (T,)
    loss: torch.Tensor  # (K, T)
    acc: torch.Tensor  # (K, T)
    cutoff: float = float("nan")
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ts": self.ts.tolist(), "loss": self.loss.tolist(), "acc": self.acc.tolist(),
                "cutoff": self.cutoff, "config": self.config}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rollouts:
        t = torch.tensor  # ragged lists raise ValueError here
        ts, loss, acc = (t(d[k], dtype=torch.float64) for k in ("ts", "loss", "acc"))
        if ts.dim() != 1 or loss.dim() != 2 or loss.shape[1] != len(ts) or acc.shape != loss.shape:
            raise ValueError(f"rollouts of shapes ts {tuple(ts.shape)}, loss "
                             f"{tuple(loss.shape)}, acc {tuple(acc.shape)}: expected (T,), "
                             "(K, T), (K, T)")
        return cls(ts, loss, acc, float(d["cutoff"]), d.get("config", {}))


def rollouts(model: nn.Module, params: Params, data: Dataset | tuple[torch.Tensor, ...],
             n_directions: int = 20, ts: torch.Tensor | None = None,
             spec: DirectionSpec = DirectionSpec(), buffers: Params | None = None,
             memory_mb: float | None = None, cutoff: float = float("nan")) -> Rollouts:
    """Loss along the first ``n_directions`` directions of ``spec`` (the same ones
    :func:`basin_radii` uses), at signed distances ``ts`` (default linspace(-0.5, 0.5, 101)).
    Refused, as there, where a ``filter`` / ``layer`` unit is exactly 0
    (:func:`~minefield.directions.check_units`): no direction would move it."""
    x, y = train_xy(data)
    centre = check_single(params, "the model (use basin_members for a stack)")
    ts = torch.linspace(-0.5, 0.5, 101, dtype=torch.float64) if ts is None else ts.double()
    check_units(member(centre, 0), spec.kind, spec.bias)  # a zero filter: a flat, false curve
    d = random_directions(member(centre, 0), n_directions, spec.kind, spec.bias,
                          spec.generator())
    loss, acc = evaluate_points(model, centre, d, ts.expand(n_directions, -1), x, y, buffers,
                                memory_mb)
    # a result on the CPU (plots, JSON), as BasinResult's radii, whatever device ran it
    return Rollouts(ts.cpu(), loss.cpu(), acc.cpu(), cutoff, {"n_directions": n_directions,
                                            "directions": spec.to_dict()})
