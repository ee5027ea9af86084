"""``minefield search`` as one call: bad minima from a run's checkpoints, resumable.

:func:`search_run` runs :func:`~minefield.search.search_minima` on a run
directory. Its key is ``search/config.json`` (the search config, the run and
its final checkpoint); every minimum is written as it finishes to
``search/minima/`` (self-describing safetensors), minima already there are
skipped when resumed, and ``search/search.csv`` and ``search/search.json`` hold
one row per minimum.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, ExperimentConfig
from ..data import Dataset, fresh_points
from ..evaluate import resolve_device
from ..executor import Executor, LocalExecutor
from ..functional import Params, n_members, one, stack
from ..lock import locking
from ..models import build_model
from ..runs import DEFAULT_ROOT, Run, RunError, reading
from ..search import (
    SearchConfig,
    batch_capacity,
    distances,
    poison_set,
    search_minima,
    search_seed,
)
from ..train import effective_beta
from .train import load_run_model, recorded_digest, run_config, task_data

__all__ = ["SEARCH_DIR", "SearchSummary", "search_run", "select_checkpoints", "search_extra",
           "start_beta"]

SEARCH_DIR = "search"


def _step_of(path: Path) -> int:
    match = re.search(r"step_(\d+)", path.name)
    if not match:
        raise RunError(f"cannot read the step of checkpoint {path}")
    return int(match.group(1))


def select_checkpoints(trajectory: Sequence[Path], cfg: SearchConfig) -> list[Path]:
    """The start checkpoints: ``trajectory[start:stop:every]``, or the listed steps."""
    if cfg.checkpoints is None:
        chosen = list(trajectory[cfg.start:cfg.stop:cfg.every])
        if not chosen:
            raise ValueError(f"no checkpoints selected: trajectory has {len(trajectory)}, "
                             f"start={cfg.start} stop={cfg.stop} every={cfg.every}")
        return chosen
    by_step = {_step_of(p): p for p in trajectory}
    missing = [s for s in cfg.checkpoints if s not in by_step]
    if missing:
        raise ValueError(f"no trajectory checkpoint at step(s) {missing}; available steps "
                         f"{min(by_step)}..{max(by_step)}")
    return [by_step[s] for s in dict.fromkeys(cfg.checkpoints)]


def _load_start(run: Run, path: Path, model: nn.Module, member: int, device) -> Params:
    ck = run.load_checkpoint(path, device)
    for k, v in model.named_parameters():
        if k not in ck.params or tuple(ck.params[k].shape[1:]) != tuple(v.shape):
            raise RunError(f"checkpoint {path.name} does not match the model of run {run.name} "
                           f"(parameter {k})")
    if member >= n_members(ck.params):
        raise ValueError(f"member {member} asked for, checkpoint {path.name} has "
                         f"{n_members(ck.params)}")
    return {k: ck.params[k][member] for k, _ in model.named_parameters()}


@dataclass
class SearchSummary:
    """Everything ``search/search.json`` holds: one row per bad minimum, aggregates, timing."""

    rows: list[dict[str, Any]]
    stats: dict[str, float]
    path: Path
    new: int
    seconds: float


def search_extra(exp: ExperimentConfig, cfg: SearchConfig, data: Dataset
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fresh poison points the searches of a run of ``exp`` (its ``data``) add (None:
    none).

    They are drawn with the search's seed; the swiss roll's own points are drawn by the
    same generator with the data seed (1237 by default), so a search seeded with it would
    draw the training and test sets themselves, true labels and all, and train on being
    wrong on them: the test set in the objective. Such a seed is refused (ConfigError)."""
    n = cfg.n_extra(exp.data.name)
    if not n:
        return None
    x, y = fresh_points(exp.data, n, cfg.seed)
    for split in ("train", "test"):
        own = data.split(split)[0].to(x)
        if len(own) and bool((x[:, None] == own[None]).flatten(2).all(-1).any()):
            raise ConfigError(f"search seed {cfg.seed} draws {data.name}'s own {split} points "
                              "as fresh poison points (the dataset was drawn with that seed); "
                              "choose another --seed")
    return x, y


def start_beta(cfg: SearchConfig, exp: ExperimentConfig, data: Dataset) -> float:
    """The poison factor every search of a run of ``exp`` starts from: ``cfg.beta``, or
    when None the poison rows' share of the batch (fresh points included), as
    :func:`~minefield.search.search_minima` resolves it."""
    extra = search_extra(exp, cfg, data)
    return effective_beta(cfg.beta, poison_set(data, cfg, extra)[0], cfg.train)


def search_task(spec: dict[str, Any]) -> dict[str, Any]:
    """One stack of searches (pure: nothing read from or written to a run): the rows and
    the minima ``(1, ...)`` of the starts ``spec["work"]``, seeds from their identity."""
    dev = resolve_device(spec["device"])
    exp, cfg = spec["experiment"], spec["search"]
    data = task_data(exp, spec.get("data_digest"))
    model = build_model(exp.model, data.input_shape, data.n_classes)
    data = data.to(dev)
    starts = {k: v.to(dev) for k, v in spec["starts"].items()}
    final = {k: v.to(dev) for k, v in spec["final"].items()}
    seeds = [search_seed(cfg.seed, s, r) for _, s, r in spec["work"]]
    res = search_minima(model, starts, data, cfg, seeds, extra=spec["extra"],
                        progress=spec["progress"])
    d_start = distances(res.params, starts, isolated=cfg.isolate)
    d_final = distances(res.params, final, isolated=cfg.isolate)
    rows = [{"start_checkpoint": name, "start_step": s, "repeat": r, "seed": seeds[i],
             "steps": int(res.steps[i]), "beta": float(res.betas[i]),
             "attempt": int(res.attempts[i]),
             **{k: float(v[i]) for k, v in res.metrics.items()},
             "dist_start_l2": float(d_start["l2"][i]),
             "dist_start_filter": float(d_start["filter"][i]),
             "dist_final_l2": float(d_final["l2"][i]),
             "dist_final_filter": float(d_final["filter"][i])}
            for i, (name, s, r) in enumerate(spec["work"])]
    minima = [{k: v.cpu() for k, v in one(res.params, i).items()} for i in range(len(rows))]
    return {"rows": rows, "minima": minima}


def _stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    if not rows:
        return {"n": 0}
    col = {k: [r[k] for r in rows] for k in ("train_acc", "test_acc", "poison_acc")}
    return {"n": len(rows), "train_acc_min": min(col["train_acc"]),
            "train_acc_median": statistics.median(col["train_acc"]),
            "test_acc_max": max(col["test_acc"]), "test_acc_median":
            statistics.median(col["test_acc"]), "poison_acc_max": max(col["poison_acc"]),
            "steps_median": statistics.median(r["steps"] for r in rows)}


@locking
def search_run(run: Run | str | Path, cfg: SearchConfig = SearchConfig(), *,
               root: Path | str = DEFAULT_ROOT, device: str | torch.device = "auto",
               force: bool = False, progress: bool = False,
               on_batch: Callable[[int, int], None] | None = None,
               executor: Executor | None = None) -> SearchSummary:
    """Search bad minima from checkpoints of ``run``; resumable, results in ``run/search/``.

    Minima already saved by an interrupted search with the same config are kept
    and not redone; a different config raises :class:`RunError` unless ``force``
    (which deletes the old search). With ``cfg.isolate`` (the default) only the
    missing minima are trained, and ``max_batch`` / ``memory_mb`` may differ from
    the interrupted command's: they cannot change a minimum. ``on_batch(done,
    total)`` reports progress.

    Each stack of searches (a chunk of the work list) is one task of ``executor``
    (:mod:`minefield.executor`; default: this process), whose minima the driver
    writes as the task finishes; the chunks do not depend on the executor, so
    local and Ray searches give the same minima.

    Example (skipped by doctest: minutes; needs a run)::

        >>> s = search_run("mf-good", SearchConfig(every=10), device="cpu")  # doctest: +SKIP
        >>> s.stats["test_acc_max"], s.stats["train_acc_median"]           # doctest: +SKIP
    """
    t0 = time.perf_counter()
    run = run if isinstance(run, Run) else Run.open(run, root)
    run_config(run)  # a study's folder is refused here, pointing at its stacks
    traj = run.trajectory()
    if not traj:
        raise RunError(f"run {run.name} has no trajectory checkpoints; train it first")
    dev = resolve_device(device)
    run.lock()
    model, final_params, _, data, run_cfg = load_run_model(run, traj[-1], dev)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError(f"run {run.name}'s model has BatchNorm: the search does not carry "
                          "running statistics from its starts to its minima yet, so their "
                          "accuracies (and stopping rules) would be wrong; search a model "
                          "without BatchNorm")
    n_extra = cfg.n_extra(run_cfg.data.name)
    extra = search_extra(run_cfg, cfg, data)
    if cfg.member >= n_members(final_params):
        raise ValueError(f"member {cfg.member} asked for, run {run.name} has "
                         f"{n_members(final_params)}")
    final = one(final_params, cfg.member)
    chosen = select_checkpoints(traj, cfg)
    # every start is read and checked, and the stacks sized, before anything is written:
    # a corrupt or mismatched start must not cost a --force redo the minima already there
    loaded = {p: _load_start(run, p, model, cfg.member, "cpu") for p in chosen}
    trained_on = poison_set(data, cfg, extra)[0]
    if len(trained_on.y_poison) == 0 and (cfg.beta is None or cfg.beta > 0):
        # refused here, before anything is written: in a task it failed each stack with
        # "run the same command again", which only failed again
        raise ConfigError(f"a search's poison factor > 0 (or 'concat') needs a poison set, "
                          f"and run {run.name}'s data has none (n_poison = 0)")
    cap = batch_capacity(model, trained_on, cfg)
    key = cfg.to_dict()
    if cfg.isolate:  # grouping cannot change isolated minima: resume with any --max-batch
        del key["max_batch"], key["memory_mb"]
    record = {"search": key, "run": run.name, "final_checkpoint": traj[-1].name,
              "extra_poison": n_extra}
    # minima already there are kept, not redone; a different config refuses once the
    # old one has saved a minimum (before that there is nothing to lose)
    started = any(run.file(SEARCH_DIR, "minima").glob("*.safetensors"))
    run.resume(SEARCH_DIR, record, force or not started)
    work = [(p, _step_of(p), r) for p in chosen for r in range(cfg.repeats)]

    def rel(step: int, rep: int) -> str:
        return f"{SEARCH_DIR}/minima/start_{step:08d}_r{rep:02d}.safetensors"

    todo = [w for w in work if not run.exists(rel(w[1], w[2]))]
    # Isolated members (cfg.isolate, the default) do not depend on their stack, so
    # only the missing minima are trained, in stacks of any size. Batched ones round
    # differently in different stacks, and this chaotic objective amplifies it: their
    # stacks are fixed chunks of the whole work list, and a chunk with a minimum
    # missing is redone whole, as it would have run without the kill.
    listed = todo if cfg.isolate else work
    chunks = [listed[b:b + cap] for b in range(0, len(listed), cap)]
    todo_chunks = [c for c in chunks if not all(run.exists(rel(s, r)) for _, s, r in c)]
    specs = [{"experiment": run_cfg, "search": cfg, "device": str(device), "extra": extra,
              "data_digest": recorded_digest(run, run_cfg),
              "final": {k: v.cpu() for k, v in final.items()}, "progress": progress,
              "starts": stack([loaded[p] for p, _, _ in chunk]),
              "work": [(p.name, s, r) for p, s, r in chunk]} for chunk in todo_chunks]
    finished = [len(work) - sum(len(c) for c in todo_chunks)]

    def keep(i: int, out: dict[str, Any]) -> None:
        for row, minimum in zip(out["rows"], out["minima"]):
            path = rel(row["start_step"], row["repeat"])
            if not run.exists(path):
                run.save_checkpoint(path, minimum, {}, {"kind": "bad_minimum",
                                                        "step": row["steps"], "row": row,
                                                        "search": cfg.to_dict(),
                                                        "run": run.name,  # its model: embed
                                                        "config": {"model": run_cfg.model
                                                                   .to_dict()}})
        finished[0] += len(out["rows"])
        if on_batch:
            on_batch(finished[0], len(work))

    (executor or LocalExecutor()).map(search_task, specs, keep)
    with reading(run.file(SEARCH_DIR, "minima")):
        rows = [dict(run.load_checkpoint(rel(s, r)).meta["row"]) for _, s, r in work]
    stats = _stats(rows)
    seconds = time.perf_counter() - t0
    run.write_csv(f"{SEARCH_DIR}/search.csv", rows)
    run.write_json(f"{SEARCH_DIR}/search.json",
                   {**record, "stats": stats, "rows": rows, "new": len(todo),
                    "seconds": seconds, "batch": cap, "device": str(dev)})
    return SearchSummary(rows, stats, run.file(SEARCH_DIR), len(todo), seconds)
