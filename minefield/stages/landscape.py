"""``minefield landscape`` as one call: a slice or surface saved in ``landscape/<tag>``.

``landscape/<tag>.safetensors`` holds the coordinates (``ts``, or ``xs``/``ys``
and the ``done`` rows of a surface), the metrics (NaN where not computed) and,
in its metadata, the key: the :class:`~minefield.landscape.LandscapeConfig`. The
same key reuses a finished result and resumes an interrupted surface block by
block; another key refuses without ``force``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..config import ConfigError, ExperimentConfig
from ..directions import random_directions
from ..evaluate import resolve_device
from ..executor import Executor
from ..functional import member, n_members, one
from ..landscape import (
    LandscapeConfig,
    Slice,
    Surface,
    check_finite,
    check_splits,
    line_1d,
    plane_directions,
    slice_1d,
    surface,
)
from ..lock import locking
from ..models import build_model
from ..runs import DEFAULT_ROOT, Run, RunError, load_tensors, reading, save_tensors
from .basin import check_tag
from .connect import check_endpoints
from .train import load_run_model, recorded_digest, run_config, task_data

__all__ = ["landscape_run", "load_landscape"]


def _path(run: Run, tag: str) -> Path:
    return run.file(f"landscape/{check_tag(tag)}.safetensors")


def _surface_tasks(executor: Executor, run: Run, cfg: LandscapeConfig, centre, bufs,
                   memory_mb: float, block_rows: int, partial: Surface | None,
                   save: Callable[[Surface], None], device: str, key: dict) -> Surface:
    """A surface whose blocks of rows are tasks of ``executor``, merged as they arrive;
    its ``config`` is the result's key, as without an executor."""
    ts = cfg.grid()
    dirs = plane_directions(member(centre, 0), cfg.directions)
    keys = [f"{s}_{m}" for s in cfg.splits for m in ("loss", "acc")]
    nan = torch.full((len(ts), len(ts)), float("nan"), dtype=torch.float64)
    res = partial or Surface(ts, ts, {k: nan.clone() for k in keys},
                             torch.zeros(len(ts), dtype=torch.bool), dict(key))
    todo = (~res.done).nonzero().flatten().tolist()
    blocks = [torch.tensor(todo[b:b + block_rows]) for b in range(0, len(todo), block_rows)]
    exp = ExperimentConfig.from_dict(run.config)
    shared = {"experiment": exp, "centre": {k: v.cpu() for k, v in centre.items()},
              "directions": {k: v.cpu() for k, v in dirs.items()},
              "buffers": {k: v.cpu() for k, v in bufs.items()} if bufs else None,
              "ys": ts, "splits": cfg.splits, "memory_mb": memory_mb, "device": device,
              "data_digest": recorded_digest(run, exp)}  # one read, every block the same
    specs = [{**shared, "xs": ts[rows]} for rows in blocks]

    def keep(i: int, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            res.values[k][blocks[i]] = v
        res.done[blocks[i]] = True
        save(res)

    executor.map(surface_task, specs, keep)
    return res


def surface_task(spec: dict) -> dict[str, torch.Tensor]:
    """Rows ``spec["xs"]`` of a surface (pure: nothing read from or written to a run)."""
    dev = resolve_device(spec["device"])
    exp = spec["experiment"]
    data = task_data(exp, spec.get("data_digest"))
    model = build_model(exp.model, data.input_shape, data.n_classes)
    data = data.to(dev)
    to = {k: v.to(dev) for k, v in spec["centre"].items()}
    dirs = {k: v.to(dev) for k, v in spec["directions"].items()}
    bufs = {k: v.to(dev) for k, v in spec["buffers"].items()} if spec["buffers"] else None
    res = surface(model, to, dirs, spec["xs"], spec["ys"], data, spec["splits"], bufs,
                  spec["memory_mb"], block_rows=len(spec["xs"]))
    return res.values


def load_landscape(run: Run | str | Path, tag: str = "default", root: Path | str = DEFAULT_ROOT
                   ) -> tuple[Slice | Surface, LandscapeConfig]:
    """A saved landscape and the config that made it."""
    run = run if isinstance(run, Run) else Run.open(run, root)
    path = _path(run, tag)
    if not path.exists():
        raise RunError(f"no landscape {path}; run 'minefield landscape {run.name}' first")
    tensors, meta = load_tensors(path)
    values = {k[7:]: v for k, v in tensors.items() if k.startswith("values.")}
    with reading(path):
        cfg = LandscapeConfig.from_dict({k: v for k, v in meta["key"].items()
                                         if k not in ("other_end", "centre")})
        if "ts" in tensors:
            return Slice(tensors["ts"], values, meta["key"]), cfg
        return Surface(tensors["xs"], tensors["ys"], values, tensors["done"].bool(),
                       meta["key"]), cfg


def _save(path: Path, res: Slice | Surface, key: dict) -> None:
    tensors = {f"values.{k}": v for k, v in res.values.items()}
    if isinstance(res, Slice):
        tensors["ts"] = res.ts
    else:
        tensors.update(xs=res.xs.clone(), ys=res.ys.clone(), done=res.done.to(torch.uint8))
    save_tensors(path, tensors, {"key": key})


@locking
def landscape_run(run: Run | str | Path, cfg: LandscapeConfig = LandscapeConfig(), *,
                  tag: str = "default", root: Path | str = DEFAULT_ROOT,
                  device: str | torch.device = "auto", memory_mb: float | None = None,
                  block_rows: int = 4, force: bool = False,
                  log: Callable[[str], None] | None = None,
                  executor: Executor | None = None) -> Slice | Surface:
    """The landscape ``cfg`` around member ``cfg.member`` of ``run``, saved (and resumed).

    ``log`` hears whether a saved result is reused or resumed. With an
    ``executor`` (:mod:`minefield.executor`), each block of ``block_rows`` rows
    of a surface is a task; the driver saves the surface as blocks arrive, so an
    interrupted one resumes with the missing rows only.

    Example (skipped by doctest: needs runs)::

        >>> s = landscape_run("good", LandscapeConfig(other="bad"))  # doctest: +SKIP
        >>> s.values["train_loss"][s.ts == 1.0]                      # doctest: +SKIP
    """
    run = run if isinstance(run, Run) else Run.open(run, root)
    path = _path(run, tag)
    key = cfg.to_dict()
    run_config(run)  # a study's folder is refused here, pointing at its stacks
    # the centre by content, "the last checkpoint" too: it moves when training resumes
    key["centre"] = run.fingerprint(run.checkpoint(cfg.checkpoint), named=False)
    if cfg.dim == 1 and cfg.other:  # the other end by content: a retrained run is another
        other = Run.open_named(cfg.other, run.path.parent)
        check_endpoints(run, other, "landscape --other")  # t = 1 must be model b itself
        if not other.trajectory():
            raise RunError(f"run {other.path} has no trajectory checkpoints (was it trained?)")
        key["other_end"] = other.fingerprint(other.trajectory()[-1])
        if key["other_end"].rsplit(":", 1)[1] == key["centre"].rsplit(":", 1)[1]:
            raise ConfigError(f"--other {cfg.other} holds the same weights as the centre: "
                              "the line between them has length 0")
    partial = None
    run.lock()
    if run.resume(str(path.relative_to(run.path)), key, force):
        res, _ = load_landscape(run, tag)
        if isinstance(res, Slice) or res.complete:
            if log:
                log(f"(reusing {path})")
            return res
        partial = res
        if log:
            log(f"resuming {path}: {int(res.done.sum())}/{len(res.done)} rows done")
    dev = resolve_device(device)
    model, params, buffers, data, _ = load_run_model(run, cfg.checkpoint, dev)
    if cfg.member >= n_members(params):
        raise ValueError(f"run {run.name} has no member {cfg.member}")
    centre = one(params, cfg.member)
    check_finite(centre, f"member {cfg.member} of run {run.name}")  # before any task
    check_splits(data, cfg.splits)
    bufs = one(buffers or None, cfg.member)
    ts, spec = cfg.grid(), cfg.directions
    if cfg.dim == 1:
        if cfg.other:
            if buffers:
                raise ConfigError(f"run {run.name}'s model has BatchNorm: a line to another "
                                  "run would use this run's running statistics at every "
                                  "point, the other end included; use `minefield connect`, "
                                  "which recomputes them at each point")
            _, p2, _, _, _ = load_run_model(Run.open_named(cfg.other, run.path.parent), None,
                                            dev)
            if cfg.member >= n_members(p2):
                raise ValueError(f"run {cfg.other} has no member {cfg.member}")
            check_finite(one(p2, cfg.member), f"member {cfg.member} of run {cfg.other}")
            res = line_1d(model, centre, one(p2, cfg.member), ts, data, cfg.splits, bufs,
                          memory_mb, key)  # t = 1 is model b bit for bit
        else:
            d = random_directions(member(centre, 0), 1, spec.kind, spec.bias, spec.generator())
            res = slice_1d(model, centre, d, ts, data, cfg.splits, bufs, memory_mb, key)
    elif executor is None:
        res = surface(model, centre, plane_directions(member(centre, 0), spec), ts, ts, data,
                      cfg.splits, bufs, memory_mb, partial=partial,
                      on_block=lambda s: _save(path, s, key), block_rows=block_rows,
                      config=key)
    else:
        res = _surface_tasks(executor, run, cfg, centre, bufs, memory_mb, block_rows, partial,
                             lambda s: _save(path, s, key), str(device), key)
    _save(path, res, key)
    return res
