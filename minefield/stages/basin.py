"""``minefield basin`` as one call: every member's basin, saved in ``basin/<tag>.json``.

One layout, whoever writes it (the CLI, :mod:`minefield.reproduce`, a script)::

    {"key": {"volume": VolumeConfig, "checkpoint": ..., "rollouts": K},
     "members": [BasinResult.to_dict(), ...],     # one per member of the run
     "rollouts": [Rollouts.to_dict() or None, ...]}

and ``minefield plot basin RUN --tag TAG`` reads it. The key is the resume
rule (:meth:`minefield.runs.Run.resume`): the same settings reuse the saved
result, others refuse without ``force``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..basin import BasinResult, Rollouts, VolumeConfig, basin_members, rollouts
from ..evaluate import resolve_device
from ..functional import one
from ..lock import locking
from ..netvolume import adam_curvature, basin_volume
from ..runs import DEFAULT_ROOT, Run, RunError, load_tensors, reading
from .train import load_run_model

__all__ = ["BasinRun", "basin_run", "load_basin", "check_tag"]

_TAG = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_tag(tag: str) -> str:
    """A result name inside a run: letters, digits, ``_``, ``.``, ``-``; else ValueError."""
    if not _TAG.match(tag):
        raise ValueError(f"tag {tag!r} may hold only letters, digits, '_', '.', '-'")
    return tag


@dataclass
class BasinRun:
    """The basins of every member of a run, their rollouts, and where they are saved."""

    members: list[BasinResult]
    rollouts: list[Rollouts | None]
    path: Path
    reused: bool = False


@locking
def basin_run(run: Run | str | Path, cfg: VolumeConfig = VolumeConfig(), *,
              tag: str = "default", checkpoint: str | None = None, n_rollouts: int = 20,
              root: Path | str = DEFAULT_ROOT, device: str | torch.device = "auto",
              force: bool = False, adam: bool = False) -> BasinRun:
    """Basin radius and volume of every member of ``run`` at ``checkpoint`` (default: last).

    ``adam=True`` preconditions the estimator (``cfg.preconditioner`` must be
    ``given``) by the run's Adam second moments from ``state.safetensors``
    (:func:`minefield.netvolume.adam_curvature`).

    ``n_rollouts`` directions (the first ones the radii use) also store the loss
    along ``t`` in ``[-r_max/2, r_max/2]`` (101 points) for ``plot basin``.

    Example (skipped by doctest: needs a run)::

        >>> b = basin_run("good", VolumeConfig(n_directions=1000))  # doctest: +SKIP
        >>> b.members[0].log10_volume, b.members[0].n_at_r_max      # doctest: +SKIP
    """
    check_tag(tag)
    run = run if isinstance(run, Run) else Run.open(run, root)
    rel = f"basin/{tag}.json"
    key = {"volume": cfg.to_dict(), "checkpoint": checkpoint, "rollouts": n_rollouts}
    if adam:
        key["curvature"] = "adam"
        if not run.exists("state.safetensors"):
            raise RunError(f"{run.path} has no optimizer state (state.safetensors) for the "
                           "adam preconditioner")
    run.lock()
    if run.resume(rel, key, force):
        return load_basin(run, tag, reused=True)
    model, params, buffers, data, _ = load_run_model(run, checkpoint, resolve_device(device))
    if adam:
        state, _ = load_tensors(run.file("state.safetensors"))
        results = [basin_volume(model, one(params, i), data, cfg, one(buffers or None, i),
                                curvature=adam_curvature(state, list(params), i))
                   for i in range(next(iter(params.values())).shape[0])]
    else:
        results = basin_members(model, params, data, cfg, buffers or None)
    ts = torch.linspace(-cfg.r_max / 2, cfg.r_max / 2, 101, dtype=torch.float64)
    ros = [rollouts(model, one(params, i), data, n_rollouts, ts, cfg.directions,
                    one(buffers or None, i), cfg.memory_mb, res.cutoff)
           if n_rollouts else None for i, res in enumerate(results)]
    path = run.write_result(rel, key, {"members": [r.to_dict() for r in results],
                                       "rollouts": [r.to_dict() if r else None for r in ros]})
    return BasinRun(results, ros, path)


def load_basin(run: Run | str | Path, tag: str = "default", root: Path | str = DEFAULT_ROOT,
               reused: bool = False) -> BasinRun:
    """A saved ``basin/<tag>.json`` (see :func:`basin_run`)."""
    check_tag(tag)
    run = run if isinstance(run, Run) else Run.open(run, root)
    rel = f"basin/{tag}.json"
    if not run.exists(rel):
        raise RunError(f"no basin result {run.file(rel)}; run 'minefield basin {run.name}' "
                       "first")
    saved = run.read_json(rel)
    with reading(run.file(rel)):
        members = [BasinResult.from_dict(m) for m in saved["members"]]
        ros = [Rollouts.from_dict(r) if r else None
               for r in saved.get("rollouts") or [None] * len(members)]
        if len(ros) != len(members):
            raise ValueError(f"{len(ros)} rollouts for {len(members)} members")
    return BasinRun(members, ros, run.file(rel), reused)
