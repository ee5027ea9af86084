"""``minefield train`` as one call: a run directory trained (and resumed) by :func:`fit`.

:func:`train_run` builds data and model from an
:class:`~minefield.config.ExperimentConfig`, starts or resumes ``runs/<name>/``
(the run's ``config.json`` is its key: a different config refuses without
``force``), and writes ``metrics.jsonl``, the checkpointed ``trajectory/`` (metadata
``metrics``: the rows logged at the step, one per member; ``[]`` between log steps),
the optimizer ``state.safetensors`` and ``summary.json``. :func:`load_run_model`
rebuilds any checkpoint of a run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    Optimizer,
    PoisonObjective,
    TrainConfig,
)
from ..data import DataError, Dataset, load_dataset
from ..evaluate import evaluate_members, resolve_device
from ..functional import Params
from ..lock import locking
from ..models import build_model
from ..runs import DEFAULT_ROOT, Checkpoint, Run, RunError, load_tensors, reading, save_tensors
from ..train import FitResult, effective_beta, fit, fitted, init_stack, make_optimizer
from ..validate import check_training_memory

__all__ = ["TrainResult", "train_run", "load_run_model", "match_model", "member_seeds",
           "run_config", "check_buildable"]


@dataclass
class TrainResult:
    run: Run | None
    params: Params
    buffers: Params
    metrics: dict[str, list[float]]
    model: nn.Module
    data: Dataset
    diverged_at: list[int | None] | None = None  # per member: the step its loss became NaN


def _opt_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def _opt_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def member_seeds(cfg: ExperimentConfig) -> list[int]:
    """Member i's init seed ``train.seed + i``; each must stay below 2**32 (torch keeps the
    low 32 bits, so 2**32 would be seed 0's model again)."""
    seeds = [cfg.train.seed + i for i in range(cfg.train.members)]
    if seeds[-1] >= 2**32:
        raise ConfigError(f"train.seed {cfg.train.seed} + member {cfg.train.members - 1} = "
                          f"{seeds[-1]} is outside [0, 2**32); lower train.seed")
    return seeds


DATA_FILE = "data.json"  # the digest of the data files a run was trained on


@locking
def train_run(cfg: ExperimentConfig, root: Path | str = DEFAULT_ROOT, force: bool = False,
              progress: bool = True, betas: Sequence[float] | None = None,
              seeds: Sequence[int] | None = None, save: bool = True,
              lrs: Sequence[float] | None = None, l2s: Sequence[float] | None = None,
              rhos: Sequence[float] | None = None) -> TrainResult:
    """Train ``cfg`` into ``root/cfg.name`` (resuming if it was interrupted).

    ``betas`` gives each member its own poison factor (a sweep; ``None`` in it:
    the concatenation weight, see :func:`~minefield.train.effective_beta`); by
    default all members use ``cfg.poison.beta``. ``seeds`` gives each member its init seed
    (default ``cfg.train.seed + i``); equal seeds give identical inits.
    ``lrs``, ``l2s``, ``rhos`` give each member its own learning rate, L2
    coefficient and SAM radius (default: the config's, for all; see
    :func:`~minefield.train.fit`); they are recorded in the checkpoints' metadata
    and ``summary.json``. With ``save=False`` nothing is written.
    A member whose loss diverges is frozen and the others train on
    (:func:`~minefield.train.fit`): ``diverged_at`` says where, its metrics are NaN
    (``metrics.jsonl`` rows ``"diverged": true``, ``summary.json``); when every member
    diverges, :class:`~minefield.train.TrainingDiverged` is raised.
    """
    dev = resolve_device(cfg.device)
    data, model, betas = _build(cfg, betas)
    files = files_digest(cfg, data)
    data = data.to(dev)
    m = cfg.train.members
    l2s = [cfg.train.l2] * m if l2s is None else [float(v) for v in l2s]
    if len(l2s) != m:
        raise ValueError(f"{len(l2s)} l2 coefficients for {m} members")
    seeds = list(seeds) if seeds is not None else member_seeds(cfg)
    if len(seeds) != m:
        raise ValueError(f"{len(seeds)} seeds for {m} members")
    per_member = {k: [float(x) for x in v] for k, v in
                  (("lrs", lrs), ("l2s", l2s), ("rhos", rhos)) if v is not None}
    for k, v in per_member.items():
        if len(v) != m:
            raise ValueError(f"{len(v)} {k} for {m} members")
    params = {k: v.to(dev) for k, v in init_stack(model, cfg.model.init, seeds).items()}
    cfg_dict = cfg.to_dict()
    run = Run.create(cfg.name, cfg_dict, root, force) if save else None
    if run is not None:
        check_data_files(run, cfg, files, record=True)
    start, opt_state, buffers, logged, old_rows, resumed_div = 0, None, None, [], [], None
    if run is not None and run.exists("state.safetensors"):
        tensors, meta = load_tensors(run.file("state.safetensors"), dev)
        try:
            start = int(meta["step"])
            if {k: meta.get(k) for k in ("lrs", "l2s", "rhos")} != {
                    k: per_member.get(k) for k in ("lrs", "l2s", "rhos")}:
                raise ValueError("it was trained with other per-member lrs, l2s or rhos")
            if (meta.get("betas") != list(map(float, betas))
                    or meta.get("seeds") != list(map(int, seeds))):
                raise ValueError("it was trained with other per-member betas or seeds")
            # safetensors sorts its keys: restore the model's order (the optimizer's too)
            params = {k: _same_shape(tensors[f"param.{k}"], v) for k, v in params.items()}
            buffers = {k: tensors[f"buffer.{k}"] for k, _ in model.named_buffers()} or None
            opt_state = _opt_from_tensors(tensors, meta)
            resumed_div = _div_list(meta.get("diverged_at"), m)
            _check_opt_state(opt_state, cfg.train, list(params.values()), start)
            logged = run.metrics()  # read once: the rows kept, and who diverged
            old_rows = [r for r in logged if r["step"] < start]
            if start > 0 and not run.exists(f"trajectory/step_{start:08d}.safetensors"):
                raise ValueError(f"the trajectory checkpoint of step {start} is missing")
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise RunError(f"{run.file('state.safetensors')} cannot resume this run "
                           f"({type(e).__name__}: {str(e)[:80]}); delete it to restart "
                           "from the beginning, or use --force") from None
    rows = list(old_rows)
    base_meta = {"config": cfg_dict, "seeds": seeds, "betas": list(map(float, betas)),
                 "members": m, **per_member}

    def on_log(step, new_rows):
        nonlocal rows
        if run is None:
            return
        rows = [r for r in rows if r["step"] != step] + new_rows
        run.write_metrics(rows)

    def on_checkpoint(step, p, b, opt, diverged_at):
        if run is None:
            return
        logged_here = [dict(r) for r in rows if r["step"] == step]  # every member's row
        # who diverged so far: a member frozen here between log steps has no row saying so
        meta = {**base_meta, "step": step, "diverged_at": diverged_at}
        run.save_checkpoint(f"trajectory/step_{step:08d}.safetensors", p, b,
                            {**meta, "metrics": logged_here})
        ot, om = _opt_to_tensors(opt)
        state = {f"param.{k}": v for k, v in p.items()}
        state.update({f"buffer.{k}": v for k, v in b.items()})
        state.update(ot)
        save_tensors(run.file("state.safetensors"), state, {**meta, **om})

    # members that diverged up to the step resumed from: as its checkpoint recorded them
    # (or, for a checkpoint written before it did, as the rows logged up to it say)
    div = resumed_div or _diverged_at(logged if start > 0 else [], start, m)
    if start >= cfg.train.steps and run is not None and run.trajectory():
        p, b = match_model(model, run.load_checkpoint(run.trajectory()[-1], dev))
        res = FitResult(p, b, start, [], [None] * m, diverged_at=div)
    else:
        res = fit(model, params, data, cfg.train, torch.tensor(betas, dtype=torch.float64),
                  flip=cfg.poison.objective is PoisonObjective.FLIP, buffers=buffers,
                  start_step=start, opt_state=opt_state, on_log=on_log,
                  on_checkpoint=on_checkpoint, progress=progress, desc=cfg.name,
                  lrs=lrs, l2s=l2s, rhos=rhos, isolated=cfg.train.isolate, diverged_at=div)
    final = evaluate_members(model, res.params, data, res.buffers,
                             isolated=cfg.train.isolate)
    metrics = {k: [math.nan if d is not None else x for x, d in zip(v.tolist(),
                                                                     res.diverged_at)]
               for k, v in final.items()}
    some = any(d is not None for d in res.diverged_at)
    if run is not None:
        run.write_json("summary.json", {"step": res.step, "seeds": seeds,
                                        "betas": list(map(float, betas)), **per_member,
                                        **metrics,
                                        **({"diverged_at": res.diverged_at} if some else {})})
    return TrainResult(run, res.params, res.buffers, metrics, model, data, res.diverged_at)


def _div_list(saved, m: int) -> list[int | None] | None:
    """A checkpoint's ``diverged_at`` (``None``: not recorded); ValueError if malformed."""
    if saved is None:
        return None
    if not isinstance(saved, list) or len(saved) != m:
        raise ValueError(f"diverged_at {str(saved)[:40]} is not one entry per member")
    return [None if d is None else int(d) for d in saved]


def _diverged_at(rows: list[dict], upto: int, m: int) -> list[int | None]:
    """Per member, the first logged step ``<= upto`` whose row says it diverged."""
    out: list[int | None] = [None] * m
    for r in rows:
        i = r.get("member", 0)
        if r.get("diverged") and r["step"] <= upto and 0 <= i < m and out[i] is None:
            out[i] = int(r["step"])
    return out


def _build(cfg: ExperimentConfig, betas: Sequence[float | None] | None,
           loaded: dict | None = None) -> tuple[Dataset, nn.Module, list[float]]:
    """The data (on the CPU), the model and every member's poison factor of ``cfg``, or
    the one-line error for what they cannot be (DataError, ModelError, ValueError).
    ``loaded``: data sets already read, by their config (read once for many configs)."""
    loaded = {} if loaded is None else loaded
    if cfg.data not in loaded:
        loaded[cfg.data] = load_dataset(cfg.data)
    data = loaded[cfg.data]
    _check_memory(cfg, data)
    model = build_model(cfg.model, data.input_shape, data.n_classes)
    m = cfg.train.members
    if betas is None:
        betas = [cfg.poison.beta] * m
    if len(betas) != m:
        raise ValueError(f"{len(betas)} betas for {m} members")
    if len(data.y_poison) == 0 and any(b is None or b > 0 for b in betas):
        raise ValueError(f"a poison factor > 0 (or 'concat') needs a poison set, and "
                         f"{cfg.data.name} has none here (n_poison = 0): it would train a "
                         f"clean model")
    betas = [effective_beta(b, data, cfg.train) for b in betas]
    fitted(data, cfg.train)  # train.fit_first within the training set
    return data, model, betas


def check_buildable(cfg: ExperimentConfig, betas: Sequence[float | None] | None = None,
                    loaded: dict | None = None) -> None:
    """Refuse, before anything is written, a config :func:`train_run` would refuse only
    after loading its data: an unknown dataset or model, sizes the data cannot give, a
    model that does not take its inputs, a stack too big, poison without poison points.
    ``loaded`` (a dict, filled here) reads each data set once over many calls."""
    _build(cfg, betas, loaded)


def _same_shape(saved: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if saved.shape != like.shape or saved.dtype != like.dtype:
        raise ValueError(f"saved shape {tuple(saved.shape)}, expected {tuple(like.shape)}")
    return saved


def _check_opt_state(state: dict, cfg: TrainConfig, leaves: list[torch.Tensor],
                     step: int) -> None:
    """Raise ValueError unless ``state`` loads into this run's optimizer."""
    make_optimizer(cfg, [v.detach().clone().requires_grad_(True) for v in leaves]
                   ).load_state_dict(state)
    for idx, st in state["state"].items():
        for k, v in st.items():
            if v.dim() and v.shape != leaves[int(idx)].shape:
                raise ValueError(f"optimizer state {idx}.{k} has shape {tuple(v.shape)}")
    stateless = cfg.optimizer is Optimizer.SGD and cfg.momentum == 0
    if not state["state"] and not stateless and step > 0:
        raise ValueError("the optimizer state is missing")
    if state["state"] and len(state["state"]) != len(leaves):
        raise ValueError(f"optimizer state for {len(state['state'])} of {len(leaves)} tensors")


def _check_memory(cfg: ExperimentConfig, data: Dataset) -> None:
    """Refuse, before anything is allocated or written, a model or stack too big to train."""
    n_t, n_p = len(data.y_train), len(data.y_poison)
    bs = min(cfg.train.batch_size or n_t, n_t)
    bs_p = cfg.train.poison_batch_size or (n_p if bs >= n_t else math.ceil(n_p * bs / n_t))
    check_training_memory(cfg.model, data.input_shape, data.n_classes, cfg.train.members,
                          bs + min(bs_p, n_p), data.x_train.element_size())


def run_config(run: Run) -> ExperimentConfig:
    """The :class:`~minefield.config.ExperimentConfig` of a trained run.

    Raises:
        RunError: ``run`` is a study's folder, whose models are the runs of its
            stacks (``runs/<study>/stacks/<stack>``, usable with ``--root``).
    """
    cfg = run.config
    if isinstance(cfg, dict) and cfg.get("kind") == "study":
        stacks = run.file("stacks")
        names = sorted(p.name for p in stacks.iterdir() if p.is_dir()) if stacks.is_dir() else []
        some = f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
        raise RunError(f"{run.name} is a study, not a trained run: its models are the runs of "
                       f"its stacks in {stacks}{some}; name one as in 'minefield --root {stacks} "
                       f"COMMAND STACK'")
    return ExperimentConfig.from_dict(cfg)


def files_digest(cfg: ExperimentConfig, data: Dataset) -> str | None:
    """The digest of data read from the user's files (``--data-dir``); None for data
    built in (made from the config alone)."""
    return None if cfg.data.data_dir is None else data.digest()


def check_data_files(run: Run, cfg: ExperimentConfig, digest: str | None,
                     record: bool = False) -> None:
    """RunError when the files under ``--data-dir`` are not those ``run`` was trained on
    (``data.json``, the loaded tensors' digest; a replaced file had given another run's
    numbers under this one's name); ``record`` writes it where the run has none."""
    if digest is None:
        return
    if run.exists(DATA_FILE):
        was = recorded_digest(run, cfg)
        if was != digest:
            raise RunError(f"the files under {cfg.data.data_dir} are not those run {run.name} "
                           f"was trained on (data digest {digest[:12]}, recorded "
                           f"{str(was)[:12]}): give it those, or train a new run")
    elif record:
        run.write_json(DATA_FILE, {"digest": digest, "data_dir": cfg.data.data_dir})


def recorded_digest(run: Run, cfg: ExperimentConfig) -> str | None:
    """The data digest ``run`` recorded (``data.json``); None for data built in or a run
    from before digests."""
    if cfg.data.data_dir is None or not run.exists(DATA_FILE):
        return None
    d = run.read_json(DATA_FILE)
    with reading(run.file(DATA_FILE)):  # hand-edited (a list, say): one line
        return d.get("digest")


def task_data(exp: ExperimentConfig, digest: str | None) -> Dataset:
    """A task's data, read where it runs: DataError when those files are not the ones
    the command checked (``digest``): replaced while it ran, or another node's copy."""
    data = load_dataset(exp.data)
    if digest is not None and files_digest(exp, data) != digest:
        raise DataError(f"the files under {exp.data.data_dir} changed while the command "
                        "ran, or this machine's copy differs from the run's data")
    return data


def load_run_model(run: Run | str | Path, checkpoint: str | Path | None = None, device="cpu"):
    """``(model, params, buffers, data, cfg)`` of a run (a path or name too) at its last (or a
    given) checkpoint; RunError when its data files changed since it was trained."""
    cfg = run_config(run := run if isinstance(run, Run) else Run.open(run))
    data = load_dataset(cfg.data)
    check_data_files(run, cfg, files_digest(cfg, data))
    model = build_model(cfg.model, data.input_shape, data.n_classes)
    traj = run.trajectory()
    if checkpoint is None:
        if not traj:
            raise RunError(f"run {run.path} has no trajectory checkpoints (was it trained?)")
        checkpoint = traj[-1]
    ck = run.load_checkpoint(checkpoint, device)
    check_model_config(run.name, cfg.model, ck)
    params, buffers = match_model(model, ck)
    div = [f"{i} (step {d})" for i, d in enumerate(ck.meta.get("diverged_at") or [])
           if d is not None]
    if div:  # summary.json says NaN: measuring them must say what they are
        warnings.warn(f"run {run.name}: member(s) {', '.join(div)} diverged; their numbers "
                      "are those of the last finite weights, frozen before", stacklevel=2)
    return model, params, buffers, data.to(device), cfg


def check_model_config(name: str, own: ModelConfig, ck: Checkpoint) -> None:
    """RunError when ``ck`` names its model config (a trajectory checkpoint) and it is not
    run ``name``'s: the same shapes with another activation are another model, whose
    numbers the run's would misstate (the initialisation scheme is no part of a model)."""
    model = (ck.meta.get("config") or {}).get("model")
    if isinstance(model, dict) and ModelConfig.from_dict(model).replace(init=own.init) != own:
        raise RunError(f"checkpoint {Path(ck.path).name} is of another model than run "
                       f"{name}'s ({model} vs {own.to_dict()})")


def match_model(model: nn.Module, ck: Checkpoint) -> tuple[Params, Params]:
    """A checkpoint's stacked params and buffers in the model's order, or a RunError (a
    missing tensor, another shape or dtype, NaN or infinite weights)."""
    out: list[Params] = [{}, {}]
    for i, (named, saved) in enumerate([(model.named_parameters(), ck.params),
                                        (model.named_buffers(), ck.buffers)]):
        for k, v in named:
            if k not in saved or tuple(saved[k].shape[1:]) != tuple(v.shape):
                raise RunError(f"checkpoint {ck.path} does not match the model "
                               f"({k}: expected shape {tuple(v.shape)})")
            if saved[k].dtype != v.dtype:  # minefield writes the model's own
                raise RunError(f"checkpoint {ck.path} does not match the model ({k}: "
                               f"{saved[k].dtype}, the model's is {v.dtype})")
            out[i][k] = saved[k]
    bad = sorted({i for v in out[0].values()  # a diverged member's are finite (frozen)
                  for i in (~torch.isfinite(v.flatten(1))).any(1).nonzero().flatten().tolist()})
    if bad:
        raise RunError(f"checkpoint {ck.path} holds NaN or infinite weights at member(s) {bad}")
    return out[0], out[1]
