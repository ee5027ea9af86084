"""One training step of a stack of M models: loss -> gradients -> optimizer update.

:func:`train_step` is the whole step; :func:`minefield.train.fit` is the driver
around it (schedule, minibatches, logging, checkpoints, stopping). Two parts
plug in without touching the driver:

- an **objective** ``objective(model, params, buffers, batch, hyper) -> (M,)``,
  the loss of every member (default :func:`poisoned_objective`: the poisoned
  NLL of :mod:`minefield.loss` plus ``l2 * sum W^2``; a Bezier-curve objective
  would evaluate points along the curve instead);
- an **update** ``update(loss_fn, params, opt, hyper) -> (M,)`` that evaluates
  ``loss_fn()`` as often as it needs and steps the optimizer (default
  :func:`plain_update`; :func:`sam_update` evaluates the gradient twice, at
  ``theta`` and at ``theta + rho g / ||g||``, Foret et al. 2021).

Per-member hyper-parameters (:class:`Hyper`: poison factor ``beta`` and ``l2``)
are ``(M,)`` tensors; members' losses are summed before ``backward``, so each
member gets exactly its own gradient.

Example::

    >>> import torch
    >>> from minefield import DataConfig, ModelConfig, TrainConfig, build_model, load_dataset
    >>> from minefield.train import init_stack, make_optimizer
    >>> data = load_dataset(DataConfig("blobs"))
    >>> model = build_model(ModelConfig(widths=(8,)), (2,), 2)
    >>> leaves = {k: v.requires_grad_() for k, v in init_stack(model, "torch", [0, 1]).items()}
    >>> opt = make_optimizer(TrainConfig(lr=0.1), list(leaves.values()))
    >>> batch = Batch(data.x_train, data.y_train)
    >>> hyper = Hyper(beta=torch.zeros(2), l2=torch.zeros(2))
    >>> first = train_step(model, leaves, {}, opt, batch, hyper)
    >>> second = train_step(model, leaves, {}, opt, batch, hyper)
    >>> first.shape, bool((second < first).all())
    (torch.Size([2]), True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .functional import Params, is_weight, n_members, stacked_forward
from .loss import poisoned_nll

__all__ = ["Batch", "Hyper", "Objective", "Update", "poisoned_objective", "plain_update",
           "sam_update", "train_step", "clip_per_member"]


@dataclass
class Batch:
    """Inputs of one step: ``x`` holds the train points then the poison points."""

    x: torch.Tensor  # (N_t + N_p, ...)
    y: torch.Tensor  # (N_t,) true labels of the train points
    y_poison: torch.Tensor | None = None  # (N_p,) true labels of the poison points
    poison_weight: torch.Tensor | None = None  # (N_p,), see poisoned_nll

    @property
    def n_train(self) -> int:
        return len(self.y)


@dataclass
class Hyper:
    """Per-member hyper-parameters of one step, ``(M,)`` tensors, and the clip norm."""

    beta: torch.Tensor  # poison factor per member
    l2: torch.Tensor | None = None  # coefficient of sum W^2 per member; None: no penalty
    clip_norm: float | None = None  # each member's global gradient norm is clipped to this
    flip: bool = False  # poison term as cross-entropy on flipped labels


Objective = Callable[[nn.Module, Params, Params, Batch, Hyper], torch.Tensor]
Update = Callable[[Callable[[], torch.Tensor], Params, torch.optim.Optimizer, Hyper],
                  torch.Tensor]


def poisoned_objective(model: nn.Module, params: Params, buffers: Params, batch: Batch,
                       hyper: Hyper) -> torch.Tensor:
    """``(M,)``: ``poisoned_nll(train, poison, beta_m) + l2_m * sum W^2`` for each member."""
    logits = stacked_forward(model, params, batch.x, buffers)
    nb = batch.n_train
    if batch.y_poison is not None:
        loss = poisoned_nll(logits[:, :nb], batch.y, logits[:, nb:], batch.y_poison, hyper.beta,
                            hyper.flip, batch.poison_weight)
    else:
        loss = poisoned_nll(logits, batch.y)
    if hyper.l2 is not None:
        m = n_members(params)
        loss = loss + hyper.l2 * sum(w.pow(2).reshape(m, -1).sum(1) for k, w in params.items()
                                     if is_weight(k, w.shape[1:]))
    return loss


def clip_per_member(grads: list[torch.Tensor], clip_norm: float) -> None:
    """Scale each member's gradient (in place) so its global norm is at most ``clip_norm``."""
    m = grads[0].shape[0]
    norm = torch.sqrt(sum(g.reshape(m, -1).pow(2).sum(1) for g in grads))
    scale = (clip_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))


def plain_update(loss_fn: Callable[[], torch.Tensor], params: Params,
                 opt: torch.optim.Optimizer, hyper: Hyper) -> torch.Tensor:
    """One gradient of ``sum_m loss_m``, clipped per member, then ``opt.step()``."""
    loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    loss.sum().backward()
    if hyper.clip_norm is not None:
        clip_per_member([v.grad for v in params.values()], hyper.clip_norm)
    opt.step()
    return loss.detach()


def sam_update(rho: float) -> Update:
    """Sharpness-aware minimisation (Foret et al. 2021) as an update rule.

    Per member: ``g = grad L(theta)``, ``eps = rho g / ||g||``, then the
    optimizer steps with ``grad L(theta + eps)`` from ``theta``: two gradient
    evaluations per step. Returns the loss at ``theta``.
    """

    def update(loss_fn, params, opt, hyper):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        leaves = list(params.values())
        m = leaves[0].shape[0]
        with torch.no_grad():
            norm = torch.sqrt(sum(v.grad.reshape(m, -1).pow(2).sum(1) for v in leaves))
            scale = rho / (norm + 1e-12)
            eps = [v.grad * scale.view(-1, *[1] * (v.dim() - 1)) for v in leaves]
            for v, e in zip(leaves, eps):
                v.add_(e)
        opt.zero_grad(set_to_none=True)
        loss_fn().sum().backward()
        with torch.no_grad():
            for v, e in zip(leaves, eps):
                v.sub_(e)
        if hyper.clip_norm is not None:
            clip_per_member([v.grad for v in leaves], hyper.clip_norm)
        opt.step()
        return loss.detach()

    return update


def train_step(model: nn.Module, params: Params, buffers: Params, opt: torch.optim.Optimizer,
               batch: Batch, hyper: Hyper, objective: Objective = poisoned_objective,
               update: Update = plain_update) -> torch.Tensor:
    """One step of every member of the stack ``params`` (leaves with ``requires_grad``).

    Returns the members' losses ``(M,)`` before the step.
    """
    return update(lambda: objective(model, params, buffers, batch, hyper), params, opt, hyper)
