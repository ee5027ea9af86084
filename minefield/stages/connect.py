"""``minefield connect`` as one call: line and Bezier curve between two runs' minima.

:func:`connect_run` connects a checkpoint (and member) of run A to one of run B,
or to every bad minimum of run B's search (``minima=True``; all curves one
stack). Both runs must be of one architecture and dataset, checked before
anything is written. Results live in run A: ``connect/<tag>.safetensors`` (the
trained control points, written first, so an interrupted command resumes at the
evaluation) and ``connect/<tag>.json`` (``{"key", "ts", "line", "curve",
"pairs"}``), keyed by the connect config and the endpoints: the same key
reuses them, another needs ``force``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError
from ..connectivity import ConnectConfig, ConnectResult, connect
from ..evaluate import resolve_device
from ..functional import Params, n_members, stack
from ..lock import locking
from ..runs import DEFAULT_ROOT, Run, RunError, reading
from .basin import check_tag, read_tagged
from .search import SEARCH_DIR
from .train import load_run_model, run_config

__all__ = ["ConnectRun", "connect_run", "load_connect", "check_endpoints"]


@dataclass
class ConnectRun:
    result: ConnectResult
    pairs: list[dict]
    path: Path
    reused: bool = False


def check_endpoints(run_a: Run, run_b: Run, what: str = "connect") -> None:
    """ConfigError unless the runs share model and data (the same parameter space, the
    same training and test points). The poison set is not compared: connect never
    uses it, so a good run and a poisoned run of the same data connect (Fig. 3's pair);
    nor is the initialisation scheme, no part of the trained model;
    :func:`connect_run` then checks that their training and test tensors are equal.
    ``what`` names the command in the message (``landscape --other`` checks too: run b's
    weights in run a's architecture, e.g. its activation, would not be model b)."""
    ca, cb = (run_config(r) for r in (run_a, run_b))  # a study's folder is refused here
    for part in ("model", "data"):
        da, db = getattr(ca, part).to_dict(), getattr(cb, part).to_dict()
        # fields left out of config.json at their default are missing from one side only
        diff = [k for k in {**da, **db} if da.get(k) != db.get(k)
                and (part, k) not in (("data", "n_poison"), ("model", "init"))]
        if diff:
            k = diff[0]
            va, vb = (d.get(k, "the default") for d in (da, db))
            raise ConfigError(f"runs {run_a.name} and {run_b.name} have a different {part} "
                              f"({part}.{k}: {va} vs {vb}); {what} needs one "
                              "architecture and dataset")


def _same_points(da, db, names: str) -> None:
    for s in ("train", "test"):
        xa, ya = da.split(s)
        xb, yb = db.split(s)
        if xa.shape != xb.shape or not (torch.equal(xa, xb) and torch.equal(ya, yb)):
            raise ConfigError(f"runs {names} have different {s} points; connect needs one "
                              "dataset")


def _abs(run: Run, rel: str) -> Path:
    return run.file(rel)


def _minima(run: Run) -> list[str]:
    d = run.file(SEARCH_DIR, "minima")
    found = sorted(d.glob("*.safetensors")) if d.is_dir() else []
    if not found:
        raise RunError(f"run {run.name} has no bad minima ({d}); run 'minefield search "
                       f"{run.name}' first")
    return [str(p.relative_to(run.path)) for p in found]


def _member(params: Params, i: int, run: Run) -> Params:
    if not 0 <= i < n_members(params):
        raise ConfigError(f"run {run.name} has {n_members(params)} members, no member {i}")
    return {k: v[i:i + 1] for k, v in params.items()}


@locking
def connect_run(run_a: Run | str | Path, run_b: Run | str | Path,
                cfg: ConnectConfig = ConnectConfig(), *, checkpoint_a: str | None = None,
                checkpoint_b: str | None = None, member_a: int = 0, member_b: int = 0,
                minima: bool = False, tag: str = "default", root: Path | str = DEFAULT_ROOT,
                device: str | torch.device = "auto", force: bool = False) -> ConnectRun:
    """Connect run A's model to run B's (or to each of B's bad minima); saved in run A.

    Checkpoints are paths inside the run (default: the last trajectory
    checkpoint); ``minima=True`` takes every ``search/minima/*.safetensors`` of
    run B as an endpoint, and ignores ``checkpoint_b``/``member_b``.

    Example (skipped by doctest: needs two runs)::

        >>> c = connect_run("good", "good", minima=True)           # doctest: +SKIP
        >>> c.result.curve["train_max_loss"], c.result.line["train_max_loss"]  # doctest: +SKIP

    Raises:
        ConfigError: runs of different architectures or data, a member out of range.
        RunError: a missing run, checkpoint or search; a different saved result.
    """
    check_tag(tag)
    run_a = run_a if isinstance(run_a, Run) else Run.open(run_a, root)
    run_b = run_b if isinstance(run_b, Run) else Run.open(run_b, root)
    check_endpoints(run_a, run_b)
    checkpoint_a = run_a.checkpoint(checkpoint_a)
    ends_b = _minima(run_b) if minima else [run_b.checkpoint(checkpoint_b)]
    dev = resolve_device(device)
    model, pa, _, data, _ = load_run_model(run_a, _abs(run_a, checkpoint_a), dev)
    a = _member(pa, member_a, run_a)
    bs = []
    for i, ck in enumerate(ends_b):
        _, pb, _, data_b, _ = load_run_model(run_b, _abs(run_b, ck), dev)
        if i == 0:  # one run b, one dataset
            _same_points(data, data_b, f"{run_a.name} and {run_b.name}")
        bs.append(_member(pb, 0 if minima else member_b, run_b))
    b = stack([{k: v[0] for k, v in p.items()} for p in bs])
    pairs = [{"a": [run_a.name, checkpoint_a, member_a],
              "b": [run_b.name, ck, 0 if minima else member_b]} for ck in ends_b]
    key = {"connect": cfg.to_dict(), "pairs": pairs,  # both ends by content (fingerprint)
           "a_end": run_a.fingerprint(checkpoint_a, named=False),
           "b_ends": [run_b.fingerprint(ck) for ck in ends_b]}
    rel, ctl = f"connect/{tag}.json", f"connect/{tag}.safetensors"
    run_a.lock()
    if run_a.resume(rel, key, force):
        return load_connect(run_a, tag, reused=True)
    control = None
    if run_a.exists(ctl) and not force:
        with reading(run_a.file(ctl)):
            saved = run_a.load_checkpoint(run_a.file(ctl), dev)
        names = dict(model.named_parameters())  # the control points: parameters only
        if saved.meta.get("key") == json.loads(json.dumps(key)) and all(
                k in saved.params and saved.params[k].shape[1:] == v.shape
                for k, v in names.items()):
            control = {k: saved.params[k] for k in names}
    # trained control points are saved before the evaluation: a killed command resumes there
    res = connect(model, a, b, data, cfg, control,
                  on_control=lambda c: run_a.save_checkpoint(ctl, c, {}, {"key": key}))
    path = run_a.write_result(rel, key, {**res.to_dict(), "pairs": pairs})
    return ConnectRun(res, pairs, path)


def load_connect(run: Run | str | Path, tag: str = "default", root: Path | str = DEFAULT_ROOT,
                 reused: bool = False) -> ConnectRun:
    """A saved ``connect/<tag>.json`` (see :func:`connect_run`)."""
    run, rel, saved = read_tagged(run, root, "connect", tag, lambda r: "minefield connect")
    with reading(run.file(rel)):
        res = ConnectResult.from_dict(saved)
        pairs = list(saved["pairs"])
        _check_shapes(res, len(pairs))
    return ConnectRun(res, pairs, run.file(rel), reused)


_PER_T = ("loss", "acc")  # (P, T) per split; the barriers (P,)
_BARRIERS = ("max_loss", "loss_barrier", "t_barrier", "acc_barrier")


def _check_shapes(res: ConnectResult, p: int) -> None:
    """ValueError (a corrupt file, in :func:`~minefield.files.reading`) unless the line and
    the curve each hold every value: ``(P, T)`` along the path, ``(P,)`` per barrier."""
    t = len(res.ts)
    for part in (res.line, res.curve):
        for split in ("train", "test"):
            for k in (*_PER_T, *_BARRIERS):
                v = part[f"{split}_{k}"]
                if tuple(v.shape) != ((p, t) if k in _PER_T else (p,)):
                    raise ValueError(f"{split}_{k} has shape {tuple(v.shape)} for {p} pairs "
                                     f"and {t} values of t")
