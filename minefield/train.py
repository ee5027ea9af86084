"""Training: one or many models of one architecture, good or poisoned, resumable.

:func:`fit` trains a *stack* of M models at once (see :mod:`minefield.functional`).
Every per-model quantity stays separate: the total loss is the sum of the
members' losses, so each member gets exactly its own gradient; the optimizers
(SGD with momentum, Adam, RMSprop) act elementwise, so one optimizer over the
stacked tensors equals M independent ones; gradient clipping uses each member's
own global norm. A stack of one is ordinary training.

Minibatches are a pure function of ``(seed, step)`` (:mod:`minefield.batches`), and
the optimizer state is
checkpointed, so an interrupted run resumes to bit-identical results on CPU.

:func:`minefield.stages.train_run` is the whole ``minefield train`` command as
one call: it starts or resumes ``runs/<name>/`` and trains through :func:`fit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .batches import minibatch
from .compiled import CompiledObjective, sync
from .config import ConfigError, Optimizer, TrainConfig
from .data import Dataset
from .evaluate import evaluate_members
from .functional import (
    Params,
    bn_mode,
    buffers_like,
    n_members,
    stack,
    stacked_forward,
    stochastic_modules,
)
from .loss import logits_only
from .models import init_params
from .optim import StackedOptimizer
from .sam import sam_update
from .step import (
    Hyper,
    Objective,
    Update,
    clean_apart,
    plain_update,
    poisoned_objective,
    train_step,
)
from .step import isolated as isolate  # fit's flag of the same name switches it on

__all__ = ["fit", "FitResult", "TrainingDiverged", "init_stack", "effective_beta", "fitted",
           "make_optimizer"]


class TrainingDiverged(RuntimeError):
    """The loss of every member became NaN or infinite; the last good checkpoint is kept."""
    repeats = True  # same seed, same numbers: a rerun diverges again (executors say so)


@dataclass
class FitResult:
    params: Params
    buffers: Params
    step: int
    history: list[dict[str, Any]]
    stopped_at: list[int | None]
    compiled: dict[str, Any] = field(default_factory=dict)  # CompiledObjective.report
    diverged_at: list[int | None] = field(default_factory=list)  # [] or one per member


def make_optimizer(cfg: TrainConfig, leaves: list[torch.Tensor]) -> StackedOptimizer:
    """``cfg.optimizer`` over the stacked ``leaves``; a step may give each member its own lr."""
    if cfg.optimizer is Optimizer.SGD:
        return StackedOptimizer(leaves, cfg.optimizer, cfg.lr, momentum=cfg.momentum)
    return StackedOptimizer(leaves, cfg.optimizer, cfg.lr)


def init_stack(model: nn.Module, scheme: str, seeds: Sequence[int]) -> Params:
    """M freshly initialised members, member i drawn from a generator seeded ``seeds[i]``."""
    return stack([init_params(model, scheme, torch.Generator().manual_seed(int(s)))
                  for s in seeds])


def effective_beta(beta: float | None, data: Dataset, cfg: TrainConfig | None = None) -> float:
    """``beta``, or when None the authors' concatenation weight: the poison rows' share of
    a step's batch (the NLL averaged over the concatenated batch), ``n_p / (n_t + n_p)``
    for the whole sets (batches drawn in proportion; ``n_t``: the points ``cfg`` fits),
    ``b_p / (b_t + b_p)`` when ``cfg.poison_batch_size`` draws ``b_p`` poison points a
    step."""
    if beta is not None:
        return beta
    n_t, n_p = len(fitted(data, cfg).y_train), len(data.y_poison)
    if n_p == 0:  # a weight of 0: a clean model, trained as if poisoned
        raise ValueError("poison factor 'concat' (the poison rows' share) needs a poison set")
    if cfg is not None and cfg.poison_batch_size:
        n_t, n_p = min(cfg.batch_size or n_t, n_t), min(cfg.poison_batch_size, n_p)
    return n_p / (n_t + n_p)


def fitted(data: Dataset, cfg: TrainConfig | None) -> Dataset:
    """``data`` with only the training points ``cfg`` fits (``cfg.fit_first``)."""
    if cfg is None or cfg.fit_first is None:
        return data
    if cfg.fit_first > len(data.y_train):
        raise ConfigError(f"train.fit_first = {cfg.fit_first}, but {data.name} has only "
                          f"{len(data.y_train)} training points")
    return replace(data, x_train=data.x_train[:cfg.fit_first], y_train=data.y_train[:cfg.fit_first])


def _per_member(what: str, values, default: float, m: int, dtype: torch.dtype,
                device) -> torch.Tensor:
    """``values`` (or ``default`` for all) as an ``(M,)`` tensor; ValueError on a wrong length."""
    if values is None:
        return torch.full((m,), default, dtype=dtype, device=device)
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if len(t) != m:
        raise ValueError(f"{len(t)} {what} for {m} members")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} must be finite, got {t.tolist()}")
    return t.to(device=device, dtype=dtype)


def _diverged(step: int, last_good: int | None) -> TrainingDiverged:
    where = f"step {last_good}" if last_good is not None else "none yet"
    e = TrainingDiverged(f"loss became NaN/inf at step {step}; last good checkpoint: {where}")
    e.step = step  # the first step that is not finite
    return e


def _check_inputs(model: nn.Module, params: Params, data: Dataset, buffers: Params) -> None:
    """``params`` must be the model's parameters (a missing one would silently stay the
    module's own, untrained), in the data's dtype, and the model's outputs must fit
    the labels: one logit for two classes, else one per class (a single logit with
    labels up to 9 trains a meaningless loss silently)."""
    names = {k for k, _ in model.named_parameters()}
    if set(params) != names:
        raise ConfigError(f"params do not match the model's parameters: missing "
                          f"{sorted(names - set(params))[:3]}, unexpected "
                          f"{sorted(set(params) - names)[:3]}")
    dtype = next(iter(params.values())).dtype
    if data.x_train.is_floating_point() and data.x_train.dtype != dtype:
        raise ConfigError(f"the data are {data.x_train.dtype} and the parameters {dtype}: "
                          "convert one (Dataset.to(device, dtype))")
    with torch.no_grad(), bn_mode(model, False):
        c = logits_only(stacked_forward(model, {k: v[:1].detach() for k, v in params.items()},
                        data.x_train[:2], {k: v[:1] for k, v in buffers.items()})).shape[-1]
    if (c == 1 and data.n_classes > 2) or 1 < c < data.n_classes:
        raise ConfigError(f"the model has {c} output(s) for {data.n_classes} classes: give it "
                          "one logit for two classes, or one per class")


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
    on_checkpoint: Callable[[int, Params, Params, torch.optim.Optimizer, list], None]
                   | None = None,
    stop_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
    poison_weight: torch.Tensor | None = None,
    eval_data: Dataset | None = None,
    progress: bool = False,
    desc: str = "train",
    objective: Objective = poisoned_objective,
    update: Update | None = None,
    isolated: bool = False,
    lrs: torch.Tensor | Sequence[float] | None = None,
    l2s: torch.Tensor | Sequence[float] | None = None,
    rhos: torch.Tensor | Sequence[float] | None = None,
    diverged_at: Sequence[int | None] | None = None,
    compile_mode: str = "auto",
    compile_backend: str = "inductor",
    compile_horizon: int | None = None,
) -> FitResult:
    """Train the stack ``params`` ``(M, ...)`` on the poisoned objective for ``cfg.steps``.

    Per member m the loss is ``poisoned_nll(train, poison, betas[m]) + l2[m] * sum W^2``
    (``l2``: one coefficient per member; default ``cfg.l2`` for all).
    ``stop_fn(metrics) -> (M,) bool`` (checked at every log step) freezes members
    that reached their goal: their parameters are kept from that step on and
    ``stopped_at[m]`` records it; training ends when all members have stopped.
    A member whose loss (or weights) becomes NaN/inf diverged: it is frozen at its
    last finite parameters (those of the last log step or checkpoint
    before, so a resumed run freezes it where the uninterrupted one does), ``diverged_at[m]``
    records the step and its logged rows are NaN with ``"diverged": True``; the
    others train on as they would alone. When every member has diverged (a single
    model: at once) :class:`TrainingDiverged` is raised. ``diverged_at`` (input)
    names members that diverged before ``start_step`` (a resumed run); ``on_checkpoint(step,
    params, buffers, opt, diverged_at)`` gets them so far, those no log row names yet too.
    ``poison_weight`` ``(N_p,)`` weights the poison points (see
    :func:`~minefield.loss.poisoned_nll`). Logged metrics (and so ``stop_fn``) are
    measured on ``eval_data`` (default ``data``), e.g. the paper's splits when
    ``data`` holds extra training points; ``cfg.fit_first`` steps on the first
    training points only (see :class:`~minefield.config.TrainConfig`).
    ``lrs``, ``l2s``, ``rhos`` ``(M,)`` give each member its own learning rate
    (scaled by the schedule's ``gamma**k``), L2 coefficient and SAM radius
    (default: ``cfg.lr``, ``cfg.l2``, ``cfg.rho`` for every member); equal values
    train exactly as the scalar config does.
    This is the driver (schedule, minibatches, logging, checkpoints, stopping);
    each step is :func:`minefield.step.train_step` with ``objective`` and
    ``update`` plugged in (default: :func:`minefield.sam.sam_update` for
    ``cfg.sam``, which is the plain update when ``cfg.sam`` is none).
    ``isolated=True`` computes every member on its own kernels (objective,
    clipping norms, logged metrics; see :func:`minefield.step.isolated`), so a
    member's trajectory is bit-for-bit the same in a stack of any size; it runs
    on one intra-op thread (restored on return).
    ``compile_mode`` (``auto``/``on``/``off``): the objective under ``torch.compile``
    when it pays, on CUDA only by default (:mod:`minefield.compiled`);
    ``compile_horizon``: the steps the caller will train this objective in all (default
    this fit's), what a first compilation's saving is bounded by.
    Returns the final (or frozen) parameters and the logged history.
    """
    m = n_members(params)
    if cfg.fit_first is not None:  # steps on the first k points, metrics on all of them
        eval_data, data = eval_data or data, fitted(data, cfg)
    dev = next(iter(params.values())).device
    if stochastic_modules(model):
        raise ConfigError(f"{', '.join(stochastic_modules(model))}: dropout (p > 0) is not "
                          "supported in training (each member of a stack would need its own "
                          "seeded masks); set p = 0")
    beta_in = torch.as_tensor(betas, dtype=torch.float64).flatten()
    if beta_in.numel() not in (1, m):
        raise ValueError(f"{beta_in.numel()} poison factors for {m} members")
    beta_vals = beta_in.expand(m).tolist()  # for logs
    dtype = next(iter(params.values())).dtype  # beta and L2 in the parameters' precision
    betas_t = torch.tensor(beta_vals, dtype=dtype, device=dev)
    if not all(0.0 <= b < 1.0 for b in beta_vals):
        raise ValueError(f"poison factors must be in [0, 1), got {beta_vals}")
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    buffers = {k: v.clone() for k, v in (buffers or buffers_like(model, m, dev)).items()}
    _check_inputs(model, params, data, buffers)
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
    if n_p == 0 and bool((betas_t > 0).any()):
        raise ValueError("a poison factor > 0 needs a poison set; the data has none")
    lr0 = _per_member("lrs", lrs, cfg.lr, m, torch.float64, "cpu")
    l2 = _per_member("l2s", l2s, cfg.l2, m, dtype, dev)
    rho = _per_member("rhos", rhos, cfg.rho, m, torch.float64, dev)
    if bool((lr0 <= 0).any()) or bool((l2 < 0).any()) or bool((rho < 0).any()):
        raise ValueError("per-member lrs must be > 0, l2s and rhos >= 0")
    if update is None:
        update = sam_update(cfg.sam, cfg.sam_m, cfg.asam_eta)
        if bool((rho > 0).any()) and update is plain_update:
            raise ValueError("per-member rhos > 0 need train.sam = sam or asam")
    hyper = Hyper(betas_t, l2 if bool((l2 > 0).any()) else None, cfg.clip_norm, flip,
                  isolated, rho=rho)
    has_bn = any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in model.modules())
    if isolated:
        objective = isolate(objective)
    elif has_bn and use_poison:  # BN statistics of a clean member without poison rows
        objective = clean_apart(objective)
    frozen: dict[str, torch.Tensor] = {}
    frozen_buf: dict[str, torch.Tensor] = {}
    done = torch.zeros(m, dtype=torch.bool, device=dev)
    stopped_at: list[int | None] = [None] * m
    div_at = list(diverged_at) if diverged_at is not None else [None] * m
    if len(div_at) != m:
        raise ValueError(f"{len(div_at)} diverged_at for {m} members")
    div = torch.tensor([d is not None for d in div_at], dtype=torch.bool, device=dev)
    # the last finite state of every member (a diverging one is frozen there); one model
    # has no other to train on, so it keeps none and raises at once
    good = ({k: v.detach().clone() for k, v in (*leaves.items(), *buffers.items())}
            if m > 1 else {})
    history: list[dict[str, Any]] = []
    last_ckpt: int | None = start_step if start_step > 0 else None
    step_objective = CompiledObjective(objective, compile_mode, dev, cfg.steps - start_step,
                                       backend=compile_backend, horizon=compile_horizon,
                                       scope=model)

    def freeze(newly: torch.Tensor, params: Params, bufs: Params) -> None:
        """Keep members ``newly``'s parameters and running statistics from now on."""
        nonlocal done
        for store, src in ((frozen, params), (frozen_buf, bufs)):
            for k, v in src.items():
                f = store.setdefault(k, v.detach().clone())
                f[newly] = v.detach()[newly]
        done = done | newly

    def settle(bad: torch.Tensor, step: int) -> None:
        """Members ``bad`` (still training) became NaN/inf at ``step``: frozen at their
        last finite state; then every member's state now is the last finite one."""
        bad = bad.to(dev) & ~done
        if bool(bad.any()):
            if bool((div | bad).all()):
                e = _diverged(step, last_ckpt)
                e.diverged_at = [step if d is None else d for d in div_at]  # per member
                raise e
            for i in bad.nonzero().flatten().tolist():
                div_at[i] = step
            div[bad] = True
            freeze(bad, {k: good[k] for k in leaves}, {k: good[k] for k in buffers})
        for k, v in good.items():
            v.copy_(leaves[k] if k in leaves else buffers[k])

    def log(step: int) -> bool:
        with torch.no_grad():
            vals = evaluate_members(model, _current(), eval_data or data,
                                    _kept(buffers, frozen_buf), isolated=isolated)
            settle(~(torch.isfinite(vals["train_loss"]) & torch.isfinite(vals["weight_norm"])),
                   step)
        lr = (lr0 * cfg.lr_factor(step)).tolist()
        nan = div.tolist()
        rows = [{"step": step, "member": i, "lr": lr[i], "beta": beta_vals[i],
                 **{k: math.nan if nan[i] else float(v[i]) for k, v in vals.items()},
                 **({"diverged": True} if nan[i] else {})} for i in range(m)]
        history.extend(rows)
        if on_log:
            on_log(step, rows)
        if stop_fn is not None:
            newly = stop_fn(vals).to(dev) & ~done
            for i in newly.nonzero().flatten().tolist():
                stopped_at[i] = step
            if newly.any():  # parameters and running statistics, kept from this step
                freeze(newly, leaves, buffers)
        return bool(done.all())

    def finite() -> torch.Tensor:
        """``(M,)``: whether each member's live parameters are all finite."""
        return torch.stack([torch.isfinite(v.detach().flatten(1)).all(1)
                            for v in leaves.values()]).all(0)

    def _kept(live: Params, store: Params) -> Params:
        cur = {k: v.detach() for k, v in live.items()}
        if store and done.any():
            cur = {k: torch.where(done.view(-1, *[1] * (v.dim() - 1)), store[k], v)
                   for k, v in cur.items()}
        return cur

    def _current() -> Params:
        return _kept(leaves, frozen)

    # BatchNorm uses batch statistics while training (dropout is refused above);
    # evaluation switches to eval mode and back (see evaluate_split).
    mode = bn_mode(model, True)
    mode.__enter__()
    bar = tqdm(total=cfg.steps, initial=start_step, desc=desc, disable=not progress,
               leave=False, mininterval=0.5)
    if div.any():  # diverged before a resume: frozen at the parameters handed in
        freeze(div.clone(), leaves, buffers)
    step = start_step
    threads = torch.get_num_threads()
    if isolated:  # one member's small kernels gain nothing from threads, and lose to their
        torch.set_num_threads(1)  # start-up cost (much more so on a busy machine)
    try:
        if step % cfg.log_every == 0 and log(step):
            return FitResult(_current(), _kept(buffers, frozen_buf), step, history, stopped_at,
                             step_objective.report, div_at)
        if on_checkpoint and step % cfg.checkpoint_every == 0 and start_step == 0:
            on_checkpoint(step, _current(), _kept(buffers, frozen_buf), opt, list(div_at))
            last_ckpt = step
        while step < cfg.steps:
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(step)
            hyper.lr = lr0 * cfg.lr_factor(step)
            batch = minibatch(data, cfg.seed, step, bs, bs_p if use_poison else 0, poison_weight)
            t0 = sync(dev) if step_objective.timing else 0.0
            train_step(model, leaves, buffers, opt, batch, hyper, step_objective, update)
            if step_objective.timing:
                step_objective.record(sync(dev) - t0)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                if log(step):
                    break
            if on_checkpoint and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                with torch.no_grad():  # the finite state saved here is the one resumed from
                    settle(~finite(), step)
                on_checkpoint(step, _current(), _kept(buffers, frozen_buf), opt, list(div_at))
                last_ckpt = step
    finally:
        bar.close()
        mode.__exit__(None, None, None)
        model.eval()  # as before: a trained model is handed back for evaluation
        torch.set_num_threads(threads)
    return FitResult(_current(), _kept(buffers, frozen_buf), step, history, stopped_at,
                     step_objective.report, div_at)
