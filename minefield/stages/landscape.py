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

from ..directions import random_directions
from ..evaluate import resolve_device
from ..functional import member, n_members, one
from ..landscape import (
    LandscapeConfig,
    Slice,
    Surface,
    line_direction,
    plane_directions,
    slice_1d,
    surface,
)
from ..lock import locking
from ..runs import DEFAULT_ROOT, Run, RunError, load_tensors, reading, save_tensors
from .basin import check_tag
from .train import load_run_model

__all__ = ["landscape_run", "load_landscape"]


def _path(run: Run, tag: str) -> Path:
    return run.file(f"landscape/{check_tag(tag)}.safetensors")


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
        cfg = LandscapeConfig.from_dict(meta["key"])
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
                  log: Callable[[str], None] | None = None) -> Slice | Surface:
    """The landscape ``cfg`` around member ``cfg.member`` of ``run``, saved (and resumed).

    ``log`` hears whether a saved result is reused or resumed.

    Example (skipped by doctest: needs runs)::

        >>> s = landscape_run("good", LandscapeConfig(other="bad"))  # doctest: +SKIP
        >>> s.values["train_loss"][s.ts == 1.0]                      # doctest: +SKIP
    """
    run = run if isinstance(run, Run) else Run.open(run, root)
    path = _path(run, tag)
    key = cfg.to_dict()
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
    bufs = one(buffers or None, cfg.member)
    ts, spec = cfg.grid(), cfg.directions
    if cfg.dim == 1:
        if cfg.other:
            _, p2, _, _, _ = load_run_model(Run.open_named(cfg.other, run.path.parent), None,
                                            dev)
            if cfg.member >= n_members(p2):
                raise ValueError(f"run {cfg.other} has no member {cfg.member}")
            d = line_direction(centre, one(p2, cfg.member))
        else:
            d = random_directions(member(centre, 0), 1, spec.kind, spec.bias, spec.generator())
        res = slice_1d(model, centre, d, ts, data, cfg.splits, bufs, memory_mb, key)
    else:
        res = surface(model, centre, plane_directions(member(centre, 0), spec), ts, ts, data,
                      cfg.splits, bufs, memory_mb, partial=partial,
                      on_block=lambda s: _save(path, s, key), block_rows=block_rows,
                      config=key)
    _save(path, res, key)
    return res
