"""``minefield embed`` as one call: a run's trajectory and bad minima in one t-SNE map.

Saved as ``runs/<name>/embed/embed.json`` (the points, keyed by the embed
config) and ``runs/<name>/embed/map.safetensors`` (the fitted map,
:class:`~minefield.embed.TSNEMap`, as plain tensors), so that later checkpoints
can be placed into the same map (``add=``) instead of re-embedding everything.
A new map is written as ``embed/map.next.safetensors`` and renamed to
``map.safetensors`` only after embed.json: killed at any point, embed.json and the map
that bears its key are both there (a pending map is renamed or dropped when the run
is next embedded, and :func:`load_map` reads it meanwhile).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..embed import EmbedConfig, EmbedResult, TSNEMap, fit_map, weight_matrix
from ..evaluate import evaluate_members, resolve_device
from ..functional import stack
from ..lock import locking
from ..options import ConfigError, EmbedCheckpoints, option
from ..runs import (
    DEFAULT_ROOT,
    Checkpoint,
    Run,
    RunError,
    load_tensors,
    reading,
    save_tensors,
    tensors_sha,
)
from .train import check_model_config, load_run_model, run_config

__all__ = ["EMBED_FILE", "MAP_FILE", "embed_run", "load_embedding", "load_map"]

EMBED_FILE = "embed/embed.json"
MAP_FILE = "embed/map.safetensors"
_MAP_NEXT = "embed/map.next.safetensors"  # a new map, until embed.json bears its key


@locking
def embed_run(run: Run | str | Path, cfg: EmbedConfig | None = None, *,
              root: Path | str = DEFAULT_ROOT, device: str | torch.device = "auto",
              checkpoints: EmbedCheckpoints | str | None = None,
              add: Sequence[str | Path] = (), save: bool = True,
              force: bool = False) -> EmbedResult:
    """Embed a run's trajectory with its bad minima (``search/minima``) in one t-SNE map.

    ``checkpoints="searched"`` embeds the trajectory checkpoints the search
    started from (the paper: every 10th epoch) plus the final iterate;
    ``"all"`` embeds the whole trajectory. Accuracies are recomputed from the
    weights. With ``save`` the result goes to ``runs/<name>/embed/embed.json``
    and the fitted map to ``embed/map.safetensors``, keyed by ``cfg``,
    ``checkpoints``, the search and its minima, and the trajectory files embedded
    (their names, and a hash of the last one's weights): the same key reuses them,
    another refuses without ``force``, so a map made before an interrupted run
    resumed training (or was retrained) is not passed off as the new trajectory's.
    ``cfg=None`` / ``checkpoints=None`` mean the saved map's settings, or the
    defaults (``EmbedConfig()``, ``"searched"``) when there is none.

    ``add`` places more checkpoint files (new bad minima, other checkpoints of
    the same architecture, from any run) into the existing map with openTSNE's
    ``transform`` (:meth:`~minefield.embed.TSNEMap.transform`): the map's points
    do not move, the new ones get kind ``"added"``. A file with several members
    contributes the member the map's trajectory shows. Files already added are
    skipped, so adding is idempotent. Adding needs only ``cfg`` and
    ``checkpoints`` to match the map's: minima searched since the map was made
    can be added to it (a call without ``add`` then refuses: the map no longer
    shows all the run's minima). All added files are read and checked before
    anything is written.

    Raises:
        RunError: no trajectory or no bad minima; an added file missing, corrupt,
            of another architecture or without the member; a saved map of other
            settings (without ``force``) or made before maps were kept.
        ConfigError: an unknown ``checkpoints`` value.

    Example (skipped by doctest: needs a run)::

        >>> res = embed_run("mf-good", EmbedConfig(perplexity=30))  # doctest: +SKIP
        >>> res.coords.shape                                          # doctest: +SKIP
        torch.Size([400, 2])
        >>> new = "runs/mf2/search/minima/start_00000040_r00.safetensors"  # another run's
        >>> res = embed_run("mf-good", add=[new])                    # doctest: +SKIP
        >>> res.kind[-1], res.added[-1]                              # doctest: +SKIP
        ('added', '/home/me/runs/mf2/search/minima/start_00000040_r00.safetensors')
    """
    run = run if isinstance(run, Run) else Run.open(run, root)
    run_config(run)  # a study's folder is refused here, pointing at its stacks
    stored = _stored(run, force)
    if cfg is None:
        cfg = EmbedConfig.from_dict(stored["config"]) if stored else EmbedConfig()
    if checkpoints is None:
        checkpoints = stored["key"]["checkpoints"] if stored else EmbedCheckpoints.SEARCHED
    checkpoints = option(EmbedCheckpoints, checkpoints, "checkpoints")
    traj = run.trajectory()
    if not traj:
        raise RunError(f"run {run.name} has no trajectory checkpoints; train it first")
    minima = sorted(run.file("search", "minima").glob("*.safetensors"))
    if not minima:
        raise RunError(f"run {run.name} has no bad minima; run `minefield search` first")
    dev = resolve_device(device)
    bad_cks = [run.load_checkpoint(p, dev) for p in minima]
    with reading(run.file("search", "minima")):
        starts = [(ck.meta["row"]["start_checkpoint"], int(ck.meta["row"]["start_step"]))
                  for ck in bad_cks]
    if checkpoints is EmbedCheckpoints.SEARCHED:
        wanted = {name for name, _ in starts} | {traj[-1].name}
        traj = [p for p in traj if p.name in wanted]
    # the map depends on the search that made the minima, on which minima there are, and
    # on the trajectory it shows: its files, and the last one's weights (training resumed
    # or redone in place moves "the final iterate")
    key = {"embed": cfg.to_dict(), "checkpoints": checkpoints.value,
           "search": run.read_json("search/config.json") if run.exists("search/config.json")
           else None, "minima": [p.name for p in minima],
           "trajectory": [p.name for p in traj],
           "final": run.fingerprint(traj[-1], named=False)}
    if add and stored and not force and _extends(stored["key"], key):
        key = stored["key"]  # add to the map there, even if the run has minima it lacks
    model, _, _, data, _ = load_run_model(run, traj[-1], dev)
    names = {n: v.shape for n, v in model.named_parameters()}
    member = int(bad_cks[0].meta.get("search", {}).get("member", 0))
    extra = [run.load_checkpoint(_resolve(run, p), dev) for p in add]
    _check_models(run, extra, names)
    extra_rows = [_member_of(ck, names, member) for ck in extra]
    res = tmap = None
    if save:
        run.lock()
        _settle_map(run)
        if run.resume(EMBED_FILE, key, force):
            res = load_embedding(run)
            tmap = load_map(run) if add else None
    if res is None:
        good_cks = [run.load_checkpoint(p, dev) for p in traj]
        _check_models(run, good_cks + bad_cks, names)
        good = stack([{n: ck.params[n][member] for n in names} for ck in good_cks])
        bad = stack([{n: ck.params[n][0] for n in names} for ck in bad_cks])
        both = {n: torch.cat([good[n], bad[n]]) for n in names}
        with torch.no_grad():
            metrics = evaluate_members(model, both, data)
        tmap = fit_map(weight_matrix(both, cfg.kernels_only), cfg)
        res = EmbedResult(tmap.coords, ["trajectory"] * len(good_cks) + ["bad"] * len(bad_cks),
                          [ck.step for ck in good_cks] + [step for _, step in starts],
                          metrics["train_acc"].cpu(), metrics["test_acc"].cpu(),
                          metrics["poison_acc"].cpu(), cfg, run.name)
        if save:  # the old map stays until embed.json is replaced: a kill in between
            tensors, meta = tmap.to_tensors()  # leaves the old pair, or the new one
            save_tensors(run.file(_MAP_NEXT), tensors, {"key": key, **meta})
            run.write_result(EMBED_FILE, key, res.to_dict())
            _settle_map(run)
    new = {}
    for ck, row in zip(extra, extra_rows):  # a file placed before is skipped only if its
        src, sha = _source(run, ck), tensors_sha(row)  # weights are the same ("": older results)
        prior = {h for a, h in zip(res.added, res.added_sha) if a == src}
        if not prior & {sha, ""}:
            new[src] = (_step_of(ck), row, sha)
    if new:
        res = _place(res, tmap, new, model, data, cfg)
        if save:
            run.write_result(EMBED_FILE, key, res.to_dict())
    return res


def _extends(stored: dict, key: dict) -> bool:
    """Whether points may be added to the saved map of ``stored`` for the run as ``key``
    describes it now: the same settings, search and final iterate (its file and weights),
    and every minimum and trajectory checkpoint the map shows still there (the run may
    have more: minima searched since, and with them the checkpoints they started from). A
    search redone with other settings (``--force``) replaced the map's minima, and a
    trajectory that grew or was retrained is another one: adding would mix them."""
    same = json.loads(json.dumps({k: v for k, v in key.items()
                                  if k not in ("minima", "trajectory")}))
    return ({k: stored.get(k) for k in same} == same
            and all(set(stored.get(k, ())) <= set(key[k]) for k in ("minima", "trajectory")))


def _step_of(ck) -> int:
    """A point's step on its trajectory: a bad minimum's is the checkpoint its search
    started from (its own ``step`` counts the search's steps), as for the map's own."""
    if ck.meta.get("kind") == "bad_minimum" and "start_step" in (ck.meta.get("row") or {}):
        return int(ck.meta["row"]["start_step"])
    return ck.step


def load_embedding(run: Run | str | Path, root: Path | str = DEFAULT_ROOT) -> EmbedResult:
    """Read ``runs/<name>/embed/embed.json`` written by :func:`embed_run`."""
    run = run if isinstance(run, Run) else Run.open(run, root)
    if not run.exists(EMBED_FILE):
        raise RunError(f"run {run.name} has no embedding; run `minefield embed` first")
    with reading(run.file(EMBED_FILE)):
        return EmbedResult.from_dict(run.read_json(EMBED_FILE))


def load_map(run: Run | str | Path, root: Path | str = DEFAULT_ROOT) -> TSNEMap:
    """The fitted map of ``runs/<name>/embed/map.safetensors``, checked against embed.json."""
    run = run if isinstance(run, Run) else Run.open(run, root)
    if not run.exists(EMBED_FILE):
        raise RunError(f"run {run.name} has no embedding; run `minefield embed` first")
    path, pending = run.file(MAP_FILE), run.file(_MAP_NEXT)
    if not path.exists() and not pending.exists():
        raise RunError(f"run {run.name} has an embedding but no fitted map (made before maps "
                       "were kept); redo it with --force to add points to it")
    with reading(run.file(EMBED_FILE)):
        want = run.read_json(EMBED_FILE)["key"]
    for p in (pending, path):  # a redo killed before its rename: its map is the pending one
        if p.exists():
            tensors, meta = load_tensors(p)
            with reading(p):
                if meta["key"] == want:
                    return TSNEMap.from_tensors(tensors, meta)
    raise RunError(f"{path} does not belong to {run.file(EMBED_FILE)}; redo the "
                   "embedding with --force")


def _settle_map(run: Run) -> None:
    """Finish or undo a map write (under the run's lock): a pending map that bears
    embed.json's key replaces the old one; one that does not (killed before embed.json
    was written) is dropped, leaving the old pair as it was."""
    pending = run.file(_MAP_NEXT)
    if not pending.exists():
        return
    try:
        meta = load_tensors(pending)[1]
        with reading(run.file(EMBED_FILE)):
            done = run.exists(EMBED_FILE) and meta.get("key") == run.read_json(
                EMBED_FILE)["key"]
    except RunError:
        done = False
    if done:
        os.replace(pending, run.file(MAP_FILE))
    else:
        pending.unlink()


def _stored(run: Run, force: bool = False) -> dict | None:
    """The saved embedding's ``{"key", "config"}``, or None when there is none. One that
    cannot be read is a RunError, or with ``force`` (which redoes it) none: the error
    says "use --force to redo it", and --force must then do so."""
    if not run.exists(EMBED_FILE):
        return None
    try:
        d = run.read_json(EMBED_FILE)
        with reading(run.file(EMBED_FILE)):
            EmbedConfig.from_dict(d["key"]["embed"])
            option(EmbedCheckpoints, d["key"]["checkpoints"], "checkpoints")
            return {"key": d["key"], "config": d["key"]["embed"]}
    except (RunError, ConfigError):
        if force:
            return None
        raise


def _resolve(run: Run, p: str | Path) -> Path:
    """An added file: a path as given (absolute, or relative to the working directory),
    else relative to the run directory. A file in neither place is named as given, with
    both places looked in (:meth:`Run.load_checkpoint` would prefix the run directory a
    second time: ``rt/mf/rt/mf/...``)."""
    p = Path(p)
    if p.is_absolute() or p.exists():
        return p
    inside = run.file(str(p))
    if not inside.exists():
        raise RunError(f"missing checkpoint: {p} (not in the working directory, nor in "
                       f"{run.path})")
    return inside


def _source(run: Run, ck: Checkpoint) -> str:
    """How an added file is named in the result: relative to the run when inside it."""
    path = ck.path.resolve()
    try:
        return str(path.relative_to(run.path.resolve()))
    except ValueError:
        return str(path)


def _check_models(run: Run, cks: list[Checkpoint], names: dict[str, torch.Size]) -> None:
    """Every checkpoint holds the run model's parameters, (M, *shape) each, and one that
    names its model config (a trajectory checkpoint) names the run's: the same shapes
    with another activation are another model, whose accuracies the run's would misstate."""
    own = run_config(run).model
    for ck in cks:
        if any(n not in ck.params or ck.params[n].shape[1:] != shape
               for n, shape in names.items()):
            raise RunError(f"checkpoint {ck.path.name} does not match the model of run "
                           f"{run.name}")
        check_model_config(run.name, own, ck)


def _member_of(ck: Checkpoint, names: dict[str, torch.Size], member: int
               ) -> dict[str, torch.Tensor]:
    """The one model of a single-member file, else member ``member`` of its stack."""
    m = ck.params[next(iter(names))].shape[0]
    if m > 1 and member >= m:
        raise RunError(f"checkpoint {ck.path.name} has {m} members; the map shows member "
                       f"{member}")
    return {n: ck.params[n][member if m > 1 else 0] for n in names}


def _place(res: EmbedResult, tmap: TSNEMap, new: dict[str, tuple[int, dict]], model, data,
           cfg: EmbedConfig) -> EmbedResult:
    """``res`` with the models ``new`` (source -> (step, params, sha)) placed into ``tmap``."""
    params = stack([row for _, row, _ in new.values()])
    with torch.no_grad():
        metrics = evaluate_members(model, params, data)
    coords = tmap.transform(weight_matrix(params, cfg.kernels_only))
    return res.extend(coords, [step for step, _, _ in new.values()],
                      {k: v.cpu() for k, v in metrics.items()}, list(new),
                      [sha for _, _, sha in new.values()])
