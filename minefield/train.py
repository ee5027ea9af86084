"""Training: one or many models of one architecture, good or poisoned, resumable.

:func:`fit` trains a *stack* of M models at once (see :mod:`minefield.functional`).
Every per-model quantity stays separate: the total loss is the sum of the
members' losses, so each member gets exactly its own gradient; the optimizers
(SGD with momentum, Adam, RMSprop) act elementwise, so one optimizer over the
stacked tensors equals M independent ones; gradient clipping uses each member's
own global norm. A stack of one is ordinary training.

Minibatches are a pure function of ``(seed, step)``, and the optimizer state is
checkpointed, so an interrupted run resumes to bit-identical results on CPU.

:func:`train_run` is the whole ``minefield train`` command as one call: it
builds data and model from an :class:`~minefield.config.ExperimentConfig`,
starts or resumes ``runs/<name>/``, and writes metrics and the checkpointed
trajectory there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import ExperimentConfig, Optimizer, PoisonObjective, TrainConfig
from .data import Dataset, load_dataset
from .evaluate import evaluate_members, resolve_device
from .functional import Params, buffers_like, is_weight, n_members, stack, stacked_forward
from .lock import locking
from .loss import poisoned_nll
from .models import build_model, init_params
from .runs import DEFAULT_ROOT, Checkpoint, Run, RunError, load_tensors, save_tensors
from .validate import check_training_memory

__all__ = ["fit", "FitResult", "TrainingDiverged", "train_run", "TrainResult", "init_stack",
           "effective_beta", "make_optimizer", "load_run_model", "match_model"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class FitResult:
    params: Params
    buffers: Params
    step: int
    history: list[dict[str, Any]]
    stopped_at: list[int | None]


def make_optimizer(cfg: TrainConfig, leaves: list[torch.Tensor]) -> torch.optim.Optimizer:
    # foreach: one fused kernel per op over all tensors (torch picks it only on CUDA).
    if cfg.optimizer is Optimizer.SGD:
        return torch.optim.SGD(leaves, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    if cfg.optimizer is Optimizer.ADAM:
        return torch.optim.Adam(leaves, lr=cfg.lr, foreach=True)
    # Keras' RMSprop defaults (rho 0.9, eps 1e-7), as in the paper's minefield code.
    return torch.optim.RMSprop(leaves, lr=cfg.lr, alpha=0.9, eps=1e-7, foreach=True)


def init_stack(model: nn.Module, scheme: str, seeds: Sequence[int]) -> Params:
    """M freshly initialised members, member i drawn from a generator seeded ``seeds[i]``."""
    return stack([init_params(model, scheme, torch.Generator().manual_seed(int(s)))
                  for s in seeds])


def effective_beta(beta: float | None, data: Dataset) -> float:
    """``beta``, or the authors' concatenation weight ``n_p / (n_t + n_p)`` when None."""
    if beta is not None:
        return beta
    n_t, n_p = len(data.y_train), len(data.y_poison)
    return n_p / (n_t + n_p)


def _batch_indices(n: int, bs: int, seed: int, step: int, device) -> torch.Tensor | None:
    if bs >= n:
        return None
    per_epoch = math.ceil(n / bs)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)[k * bs:(k + 1) * bs].to(device)


def _per_member_norm(tensors: list[torch.Tensor], m: int) -> torch.Tensor:
    return torch.sqrt(sum(t.reshape(m, -1).pow(2).sum(1) for t in tensors))


def _diverged(step: int, last_good: int | None) -> TrainingDiverged:
    where = f"step {last_good}" if last_good is not None else "none yet"
    return TrainingDiverged(f"loss became NaN/inf at step {step}; last good checkpoint: {where}")


def fit(
    model: nn.Module,
    params: Params,
    data: Dataset,
    cfg: TrainConfig,
    betas: torch.Tensor | float = 0.0,
    *,
    flip: bool = False,
    buffers: Params | None = None,
    start_step: int = 0,
    opt_state: dict | None = None,
    on_log: Callable[[int, list[dict[str, Any]]], None] | None = None,
    on_checkpoint: Callable[[int, Params, Params, torch.optim.Optimizer], None] | None = None,
    stop_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
    poison_weight: torch.Tensor | None = None,
    eval_data: Dataset | None = None,
    progress: bool = False,
    desc: str = "train",
) -> FitResult:
    """Train the stack ``params`` ``(M, ...)`` on the poisoned objective for ``cfg.steps``.

    Per member m the loss is ``poisoned_nll(train, poison, betas[m]) + l2 * sum W^2``.
    ``stop_fn(metrics) -> (M,) bool`` (checked at every log step) freezes members
    that reached their goal: their parameters are kept from that step on and
    ``stopped_at[m]`` records it; training ends when all members have stopped.
    ``poison_weight`` ``(N_p,)`` weights the poison points (see
    :func:`~minefield.loss.poisoned_nll`). Logged metrics (and so ``stop_fn``) are
    measured on ``eval_data`` (default ``data``), e.g. the paper's splits when
    ``data`` holds extra training points.
    Returns the final (or frozen) parameters and the logged history.
    """
    m = n_members(params)
    dev = next(iter(params.values())).device
    beta_vals = torch.as_tensor(betas, dtype=torch.float64).expand(m).tolist()  # for logs
    betas_t = torch.tensor(beta_vals, dtype=torch.float32, device=dev)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    buffers = {k: v.clone() for k, v in (buffers or buffers_like(model, m, dev)).items()}
    weights = [v for k, v in leaves.items() if is_weight(k, v.shape[1:])]
    opt = make_optimizer(cfg, list(leaves.values()))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    n_t, n_p = len(data.y_train), len(data.y_poison)
    if poison_weight is not None:
        if poison_weight.shape != (n_p,):
            raise ValueError(f"poison_weight has shape {tuple(poison_weight.shape)}, the poison "
                             f"set {n_p} points")
        poison_weight = poison_weight.to(dev)
    bs = cfg.batch_size or n_t
    bs_p = cfg.poison_batch_size or (n_p if bs >= n_t else math.ceil(n_p * bs / n_t))
    use_poison = n_p > 0 and bool((betas_t > 0).any())
    frozen: dict[str, torch.Tensor] = {}
    done = torch.zeros(m, dtype=torch.bool, device=dev)
    stopped_at: list[int | None] = [None] * m
    history: list[dict[str, Any]] = []
    last_ckpt: int | None = start_step if start_step > 0 else None
    has_bn = any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in model.modules())

    def log(step: int) -> bool:
        nonlocal done, last_ckpt
        with torch.no_grad():
            vals = evaluate_members(model, _current(), eval_data or data, buffers)
        if not (torch.isfinite(vals["train_loss"]).all()
                and torch.isfinite(vals["weight_norm"]).all()):
            raise _diverged(step, last_ckpt)
        lr = cfg.lr_at(step)
        rows = [{"step": step, "member": i, "lr": lr, "beta": beta_vals[i],
                 **{k: float(v[i]) for k, v in vals.items()}} for i in range(m)]
        history.extend(rows)
        if on_log:
            on_log(step, rows)
        if stop_fn is not None:
            newly = stop_fn(vals).to(dev) & ~done
            for i in newly.nonzero().flatten().tolist():
                stopped_at[i] = step
            if newly.any():
                for k, v in leaves.items():
                    f = frozen.setdefault(k, v.detach().clone())
                    f[newly] = v.detach()[newly]
            done = done | newly
        return bool(done.all())

    def _current() -> Params:
        cur = {k: v.detach() for k, v in leaves.items()}
        if frozen and done.any():
            cur = {k: torch.where(done.view(-1, *[1] * (v.dim() - 1)), frozen[k], v)
                   for k, v in cur.items()}
        return cur

    # BatchNorm uses batch statistics while training; evaluation switches to eval mode
    # and back (see evaluate_split).
    model.train(has_bn)
    bar = tqdm(total=cfg.steps, initial=start_step, desc=desc, disable=not progress,
               leave=False, mininterval=0.5)
    step = start_step
    try:
        if step % cfg.log_every == 0 and log(step):
            return FitResult(_current(), buffers, step, history, stopped_at)
        if on_checkpoint and step % cfg.checkpoint_every == 0 and start_step == 0:
            on_checkpoint(step, _current(), buffers, opt)
            last_ckpt = step
        while step < cfg.steps:
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(step)
            it = _batch_indices(n_t, bs, cfg.seed, step, dev)
            xb = data.x_train if it is None else data.x_train[it]
            yb = data.y_train if it is None else data.y_train[it]
            if use_poison:
                ip = _batch_indices(n_p, bs_p, cfg.seed + 1, step, dev)
                xp = data.x_poison if ip is None else data.x_poison[ip]
                yp = data.y_poison if ip is None else data.y_poison[ip]
                wp = None if poison_weight is None else (
                    poison_weight if ip is None else poison_weight[ip])
                x = torch.cat([xb, xp])
            else:
                x = xb
            logits = stacked_forward(model, leaves, x, buffers)
            nb = len(yb)
            if use_poison:
                loss = poisoned_nll(logits[:, :nb], yb, logits[:, nb:], yp, betas_t, flip, wp)
            else:
                loss = poisoned_nll(logits, yb)
            if cfg.l2 > 0:
                loss = loss + cfg.l2 * sum(w.pow(2).reshape(m, -1).sum(1) for w in weights)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            if cfg.clip_norm is not None:
                grads = [v.grad for v in leaves.values()]
                norm = _per_member_norm(grads, m)
                scale = (cfg.clip_norm / (norm + 1e-6)).clamp(max=1.0)
                for g_ in grads:
                    g_.mul_(scale.view(-1, *[1] * (g_.dim() - 1)))
            opt.step()
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                if log(step):
                    break
            if on_checkpoint and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                with torch.no_grad():
                    if not all(torch.isfinite(v).all() for v in leaves.values()):
                        raise _diverged(step, last_ckpt)
                on_checkpoint(step, _current(), buffers, opt)
                last_ckpt = step
    finally:
        bar.close()
        model.eval()
    return FitResult(_current(), buffers, step, history, stopped_at)


# --- runs ---------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run: Run | None
    params: Params
    buffers: Params
    metrics: dict[str, list[float]]
    model: nn.Module
    data: Dataset


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
    return [cfg.train.seed + i for i in range(cfg.train.members)]


@locking
def train_run(cfg: ExperimentConfig, root: Path | str = DEFAULT_ROOT, force: bool = False,
              progress: bool = True, betas: Sequence[float] | None = None,
              seeds: Sequence[int] | None = None, save: bool = True) -> TrainResult:
    """Train ``cfg`` into ``root/cfg.name`` (resuming if it was interrupted).

    ``betas`` gives each member its own poison factor (a sweep); by default all
    members use ``cfg.poison.beta``. ``seeds`` gives each member its init seed
    (default ``cfg.train.seed + i``); equal seeds give identical inits. With
    ``save=False`` nothing is written.
    """
    dev = resolve_device(cfg.device)
    data = load_dataset(cfg.data)
    _check_memory(cfg, data)
    model = build_model(cfg.model, data.input_shape, data.n_classes)
    data = data.to(dev)
    m = cfg.train.members
    if betas is None:
        betas = [effective_beta(cfg.poison.beta, data)] * m
    if len(betas) != m:
        raise ValueError(f"{len(betas)} betas for {m} members")
    seeds = list(seeds) if seeds is not None else member_seeds(cfg)
    if len(seeds) != m:
        raise ValueError(f"{len(seeds)} seeds for {m} members")
    params = {k: v.to(dev) for k, v in init_stack(model, cfg.model.init, seeds).items()}
    cfg_dict = cfg.to_dict()
    run = Run.create(cfg.name, cfg_dict, root, force) if save else None
    start, opt_state, buffers, old_rows = 0, None, None, []
    if run is not None and run.exists("state.safetensors"):
        tensors, meta = load_tensors(run.file("state.safetensors"), dev)
        try:
            start = int(meta["step"])
            # safetensors sorts its keys: restore the model's order (the optimizer's too)
            params = {k: _same_shape(tensors[f"param.{k}"], v) for k, v in params.items()}
            buffers = {k: tensors[f"buffer.{k}"] for k, _ in model.named_buffers()} or None
            opt_state = _opt_from_tensors(tensors, meta)
            _check_opt_state(opt_state, cfg.train, list(params.values()), start)
            old_rows = [r for r in run.metrics() if r["step"] < start]
            if start > 0 and not run.exists(f"trajectory/step_{start:08d}.safetensors"):
                raise ValueError(f"the trajectory checkpoint of step {start} is missing")
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise RunError(f"{run.file('state.safetensors')} cannot resume this run "
                           f"({type(e).__name__}: {str(e)[:80]}); delete it to restart "
                           "from the beginning, or use --force") from None
    rows = list(old_rows)
    base_meta = {"config": cfg_dict, "seeds": seeds, "betas": list(map(float, betas)),
                 "members": m}

    def on_log(step, new_rows):
        nonlocal rows
        if run is None:
            return
        rows = [r for r in rows if r["step"] != step] + new_rows
        run.write_metrics(rows)

    def on_checkpoint(step, p, b, opt):
        if run is None:
            return
        last = {k: v for k, v in rows[-1].items()} if rows and rows[-1]["step"] == step else {}
        meta = {**base_meta, "step": step, "metrics": last}
        run.save_checkpoint(f"trajectory/step_{step:08d}.safetensors", p, b, meta)
        ot, om = _opt_to_tensors(opt)
        state = {f"param.{k}": v for k, v in p.items()}
        state.update({f"buffer.{k}": v for k, v in b.items()})
        state.update(ot)
        save_tensors(run.file("state.safetensors"), state, {**base_meta, "step": step, **om})

    if start >= cfg.train.steps and run is not None and run.trajectory():
        p, b = match_model(model, run.load_checkpoint(run.trajectory()[-1], dev))
        res = FitResult(p, b, start, [], [None] * m)
    else:
        res = fit(model, params, data, cfg.train, torch.tensor(betas),
                  flip=cfg.poison.objective is PoisonObjective.FLIP, buffers=buffers,
                  start_step=start, opt_state=opt_state, on_log=on_log,
                  on_checkpoint=on_checkpoint, progress=progress, desc=cfg.name)
    final = evaluate_members(model, res.params, data, res.buffers)
    metrics = {k: v.tolist() for k, v in final.items()}
    if run is not None:
        run.write_json("summary.json", {"step": res.step, "seeds": seeds,
                                        "betas": list(map(float, betas)), **metrics})
    return TrainResult(run, res.params, res.buffers, metrics, model, data)


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


def load_run_model(run: Run, checkpoint: str | Path | None = None, device="cpu"):
    """``(model, params, buffers, data, cfg)`` of a run at its last (or a given) checkpoint."""
    cfg = ExperimentConfig.from_dict(run.config)
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.n_classes)
    traj = run.trajectory()
    if checkpoint is None:
        if not traj:
            raise RunError(f"run {run.path} has no trajectory checkpoints (was it trained?)")
        checkpoint = traj[-1]
    ck = run.load_checkpoint(checkpoint, device)
    params, buffers = match_model(model, ck)
    return model, params, buffers, data.to(device), cfg


def match_model(model: nn.Module, ck: Checkpoint) -> tuple[Params, Params]:
    """A checkpoint's stacked params and buffers in the model's order, or a RunError."""
    out: list[Params] = [{}, {}]
    for i, (named, saved) in enumerate([(model.named_parameters(), ck.params),
                                        (model.named_buffers(), ck.buffers)]):
        for k, v in named:
            if k not in saved or tuple(saved[k].shape[1:]) != tuple(v.shape):
                raise RunError(f"checkpoint {ck.path} does not match the model "
                               f"({k}: expected shape {tuple(v.shape)})")
            out[i][k] = saved[k]
    return out[0], out[1]
