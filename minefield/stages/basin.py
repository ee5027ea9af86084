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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..basin import (
    BasinResult,
    Rollouts,
    VolumeConfig,
    basin_members,
    direction_radii,
    radii_result,
    rollouts,
)
from ..config import ConfigError, ExperimentConfig
from ..evaluate import resolve_device
from ..executor import Executor, TaskStore, run_tasks
from ..functional import n_members, one
from ..lock import locking
from ..models import build_model
from ..netvolume import (
    CoolingBlocks,
    adam_curvature,
    basin_volume,
    cooling_blocks,
    merge_cooling_blocks,
)
from ..options import CurvatureKind, Estimator
from ..runs import DEFAULT_ROOT, Run, RunError, load_tensors, reading
from .train import load_run_model, recorded_digest, run_config, task_data

__all__ = ["BasinRun", "basin_run", "load_basin", "check_tag"]

_TAG = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_tag(tag: str) -> str:
    """A result name inside a run: letters, digits, ``_``, ``.``, ``-``; else ValueError."""
    if not _TAG.match(tag):
        raise ValueError(f"tag {tag!r} may hold only letters, digits, '_', '.', '-'")
    return tag


def read_tagged(run: Run | str | Path, root: Path | str, kind: str, tag: str,
                command: Callable[[Run], str]) -> tuple[Run, str, Any]:
    """The run, the path and the JSON of its saved ``<kind>/<tag>.json``; a missing
    result raises :class:`RunError` naming ``command(run)``, the command that makes it."""
    check_tag(tag)
    run = run if isinstance(run, Run) else Run.open(run, root)
    rel = f"{kind}/{tag}.json"
    if not run.exists(rel):
        raise RunError(f"no {kind} result {run.file(rel)}; run '{command(run)}' first")
    return run, rel, run.read_json(rel)


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
              force: bool = False, adam: bool = False, executor: Executor | None = None,
              directions_per_task: int | None = None) -> BasinRun:
    """Basin radius and volume of every member of ``run`` at ``checkpoint`` (default: last).

    ``adam=True`` preconditions the estimator (``cfg.preconditioner`` must be
    ``given``) by the run's Adam second moments from ``state.safetensors``
    (:func:`minefield.netvolume.adam_curvature`).

    ``n_rollouts`` directions (the first ones the radii use) also store the loss
    along ``t`` in ``[-r_max/2, r_max/2]`` (101 points) for ``plot basin``.

    With an ``executor`` (:mod:`minefield.executor`) or ``directions_per_task``,
    the work is split into tasks: one per member, for the ``naive`` estimator one
    per block of ``directions_per_task`` directions of a member, for ``mcmc`` one
    per block of chains (``cfg.mcmc_blocks``, :mod:`minefield.cooling_blocks`).
    Finished tasks are kept in ``basin/<tag>.tasks/`` and a rerun redoes only the
    missing ones; the merged result is the same, number for number, as the
    unsplit one (a radius depends on its own direction only, a block of chains on
    its index only), so the key ignores the split.

    Example (skipped by doctest: needs a run)::

        >>> b = basin_run("good", VolumeConfig(n_directions=1000))  # doctest: +SKIP
        >>> b.members[0].log10_volume, b.members[0].n_at_r_max      # doctest: +SKIP
    """
    check_tag(tag)
    run = run if isinstance(run, Run) else Run.open(run, root)
    rel = f"basin/{tag}.json"
    key = {"volume": cfg.to_dict(), "checkpoint": checkpoint, "rollouts": n_rollouts}
    run_config(run)  # a study's folder is refused here, pointing at its stacks
    # the centre by content, "the last checkpoint" too: it moves when training resumes
    key["centre"] = run.fingerprint(run.checkpoint(checkpoint, inside=False), named=False)
    if adam:
        if cfg.preconditioner is not CurvatureKind.GIVEN:
            raise ConfigError(f"adam=True is a 'given' preconditioner: the volume config has "
                              f"preconditioner '{cfg.preconditioner.value}' (estimator "
                              f"'{cfg.estimator.value}')")
        key["curvature"] = "adam"
        if not run.exists("state.safetensors"):
            raise RunError(f"{run.path} has no optimizer state (state.safetensors) for the "
                           "adam preconditioner")
    run.lock()
    if run.resume(rel, key, force):
        return load_basin(run, tag, reused=True)
    if executor is not None or directions_per_task is not None:
        results, ros = _basin_tasks(run, tag, cfg, key, checkpoint, n_rollouts, device, adam,
                                    executor, directions_per_task, force)
        path = run.write_result(rel, key, {"members": [r.to_dict() for r in results],
                                           "rollouts": [r.to_dict() if r else None
                                                        for r in ros]})
        return BasinRun(results, ros, path)
    model, params, buffers, data, exp = load_run_model(run, checkpoint, resolve_device(device))
    if adam:
        state, _ = load_tensors(run.file("state.safetensors"))
        b = _adam_batch(exp, data)
        results = [basin_volume(model, one(params, i), data, cfg, one(buffers or None, i),
                                curvature=adam_curvature(state, list(params), i, b))
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


def _adam_batch(exp, data) -> int:
    """The batch size ``B`` that scales Adam's second moments in :func:`adam_curvature`:
    the training points per step (all of them when the batch is larger or unset)."""
    n = len(data.y_train)
    return min(exp.train.batch_size or n, n)


def _basin_tasks(run: Run, tag: str, cfg: VolumeConfig, key: dict, checkpoint: str | None,
                 n_rollouts: int, device, adam: bool, executor: Executor | None,
                 per_task: int | None, force: bool
                 ) -> tuple[list[BasinResult], list[Rollouts | None]]:
    """:func:`basin_run`'s work as tasks (members x direction blocks), run and merged."""
    from ..executor import LocalExecutor

    naive = cfg.estimator is Estimator.NAIVE and not adam
    if per_task is not None and (per_task < 1 or not naive):
        raise ConfigError("directions_per_task must be >= 1, and applies to the naive "
                          "estimator only (the others run one task per member)")
    _, params, buffers, data, exp = load_run_model(run, checkpoint, "cpu")
    state = load_tensors(run.file("state.safetensors"))[0] if adam else None
    batch = _adam_batch(exp, data)
    k = cfg.n_directions
    step = per_task or k
    chains = cfg.estimator is Estimator.MCMC and cfg.mcmc_blocks > 1
    blocks = ([(a, min(a + step, k)) for a in range(0, k, step)] if naive else
              list(range(cfg.mcmc_blocks)) if chains else [None])
    specs, digest = {}, recorded_digest(run, exp)  # the files every task must read
    for i in range(n_members(params)):
        for j, block in enumerate(blocks):
            tid = f"m{i:04d}" + (f"-d{block[0]:07d}-{block[1]:07d}" if naive else
                                 f"-b{block:04d}" if chains else "")
            specs[tid] = {"experiment": exp, "params": one(params, i),
                          "buffers": one(buffers or None, i), "volume": cfg,
                          "data_digest": digest,
                          "block": block if naive else None,
                          "mcmc_block": block if chains else None,
                          "rollouts": n_rollouts if j == 0 else 0, "device": str(device),
                          "curvature": adam_curvature(state, list(params), i, batch) if adam
                          else None}
    store = TaskStore(run, f"basin/{tag}.tasks", key, force)
    out = run_tasks(executor or LocalExecutor(), basin_task, specs, store)
    results, ros = [], []
    for i in range(n_members(params)):
        parts = [out[t] for t in specs if t.startswith(f"m{i:04d}")]
        ros.append(Rollouts.from_dict(parts[0]["rollouts"]) if parts[0].get("rollouts")
                   else None)
        if chains:  # the blocks of chains of one estimate, merged in block order
            results.append(merge_cooling_blocks(
                [CoolingBlocks.from_dict(p["blocks"]) for p in parts], cfg))
            continue
        if not naive:
            results.append(BasinResult.from_dict(parts[0]["result"]))
            continue
        half = [len(p["radii"]) // 2 for p in parts]
        radii = torch.cat([p["radii"][:h] for p, h in zip(parts, half)]
                          + [p["radii"][h:] for p, h in zip(parts, half)])
        evals = sum(p["evals"] for p in parts) - (len(parts) - 1)  # the centre once
        results.append(radii_result(radii, parts[0]["n"], parts[0]["centre_loss"],
                                    parts[0]["cutoff"], evals, cfg,
                                    moved=sum(p.get("moved", 0) for p in parts)))
    return results, ros


def basin_task(spec: dict) -> dict:
    """One basin task (pure: nothing read from or written to a run): the radii of a
    block of directions of one member (naive estimator), or the whole estimate of
    one member (the others), plus its rollouts when asked for."""
    dev = resolve_device(spec["device"])
    exp: ExperimentConfig = spec["experiment"]
    data = task_data(exp, spec.get("data_digest"))
    model = build_model(exp.model, data.input_shape, data.n_classes)
    data = data.to(dev)
    params = {k: v.to(dev) for k, v in spec["params"].items()}
    bufs = {k: v.to(dev) for k, v in spec["buffers"].items()} if spec["buffers"] else None
    cfg: VolumeConfig = spec["volume"]
    out: dict = {}
    if spec.get("mcmc_block") is not None:
        run = cooling_blocks(model, params, data, cfg, bufs, curvature=spec["curvature"],
                             blocks=[spec["mcmc_block"]])
        out["blocks"], cut = run.to_dict(), run.cutoff
    elif spec["block"] is not None:
        r, evals, centre_loss, cut, n, moved = direction_radii(model, params, data, cfg, bufs,
                                                               block=spec["block"])
        out.update(radii=r, evals=evals, centre_loss=centre_loss, cutoff=cut, n=n, moved=moved)
    else:
        curv = spec["curvature"]
        res = basin_volume(model, params, data, cfg, bufs, curvature=curv) if curv \
            else basin_members(model, params, data, cfg, bufs)[0]
        out["result"], cut = res.to_dict(), res.cutoff
    if spec["rollouts"]:
        ts = torch.linspace(-cfg.r_max / 2, cfg.r_max / 2, 101, dtype=torch.float64)
        out["rollouts"] = rollouts(model, params, data, spec["rollouts"], ts, cfg.directions,
                                   bufs, cfg.memory_mb, cut).to_dict()
    return out


def load_basin(run: Run | str | Path, tag: str = "default", root: Path | str = DEFAULT_ROOT,
               reused: bool = False) -> BasinRun:
    """A saved ``basin/<tag>.json`` (see :func:`basin_run`)."""
    run, rel, saved = read_tagged(run, root, "basin", tag,
                                  lambda r: f"minefield basin {r.name}")
    with reading(run.file(rel)):
        members = [BasinResult.from_dict(m) for m in saved["members"]]
        ros = [Rollouts.from_dict(r) if r else None
               for r in saved.get("rollouts") or [None] * len(members)]
        if len(ros) != len(members):
            raise ValueError(f"{len(ros)} rollouts for {len(members)} members")
    return BasinRun(members, ros, run.file(rel), reused)
