"""One training step of a stack of M models: loss -> gradients -> optimizer update.

:func:`train_step` is the whole step; :func:`minefield.train.fit` is the driver
around it (schedule, minibatches, logging, checkpoints, stopping). Two parts
plug in without touching the driver:

- an **objective** ``objective(model, params, buffers, batch, hyper) -> (M,)``,
  the loss of every member (default :func:`poisoned_objective`: the poisoned
  NLL of :mod:`minefield.loss` plus ``l2 * sum W^2``; :mod:`minefield.connectivity`
  plugs in the loss at sampled points of Bezier curves);
- an **update** ``update(loss_fn, params, opt, hyper, batch) -> (M,)`` that
  evaluates ``loss_fn(batch)`` (on the step's batch or a part of it) as often
  as it needs and steps the optimizer (default :func:`plain_update`;
  :func:`minefield.sam.sam_update`: SAM, ASAM and m-SAM, two gradient
  evaluations per step).

Per-member hyper-parameters (:class:`Hyper`: poison factor ``beta``, ``l2``,
learning rate ``lr``, SAM radius ``rho``) are ``(M,)`` tensors; members' losses
are summed before ``backward``, so each member gets exactly its own gradient,
and :class:`~minefield.optim.StackedOptimizer` steps member m with ``lr[m]``.

**Isolated members** (:func:`isolated`, ``Hyper.isolated``). Batched kernels
give each member its own gradient *mathematically*, but not to the last bit:
how a member's numbers are rounded depends on how many members share the call
and where in the stack it sits (BLAS runs a one-output layer of a stack of one
as gemv and of a larger stack as batched gemm, and its results depend on the
memory alignment of a member's slice; vectorised ``softplus``/``sigmoid``
compute the last elements of a tensor in scalar code). Chaotic objectives such
as the poisoned loss amplify that to O(1) over a few thousand steps. An
isolated step computes every member with kernels shaped for one model, on
freshly allocated parameters, and clips with per-member norms, so member m's
step is bit-for-bit the same in any stack (the stacked optimizer and the other
elementwise updates are exact per element).

Example::

    >>> import torch
    >>> from minefield import DataConfig, ModelConfig, TrainConfig, build_model, load_dataset
    >>> from minefield.train import init_stack, make_optimizer
    >>> data = load_dataset(DataConfig("blobs"))
    >>> model = build_model(ModelConfig(widths=(8,)), (2,), 2)
    >>> leaves = {k: v.requires_grad_() for k, v in init_stack(model, "torch", [0, 1]).items()}
    >>> opt = make_optimizer(TrainConfig(lr=0.1), list(leaves.values()))
    >>> batch = Batch(data.x_train, data.y_train)
    >>> hyper = Hyper(beta=torch.zeros(2), lr=torch.tensor([0.1, 0.01]))
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

from .functional import Params, is_weight, mlp_fast_path, n_members, one, stacked_forward
from .loss import poisoned_nll
from .mlpgrad import mlp_logits

__all__ = ["Batch", "Hyper", "Objective", "LossFn", "Update", "poisoned_objective", "clean_apart",
           "plain_update", "train_step", "clip_per_member", "set_grads", "clear_grads", "isolated"]


@dataclass
class Batch:
    """Inputs of one step: ``x`` holds the train points then the poison points."""

    x: torch.Tensor  # (N_t + N_p, ...)
    y: torch.Tensor  # (N_t,) true labels of the train points
    y_poison: torch.Tensor | None = None  # (N_p,) true labels of the poison points
    poison_weight: torch.Tensor | None = None  # (N_p,), see poisoned_nll
    poison_norm: float | None = None  # the poison term's denominator (see poisoned_nll)

    @property
    def n_train(self) -> int:
        return len(self.y)


@dataclass
class Hyper:
    """Per-member hyper-parameters of one step, ``(M,)`` tensors, and the clip norm.

    ``lr`` is the learning rate of *this* step (the driver applies the schedule);
    ``None`` leaves it to the optimizer's ``param_groups``. ``rho`` is the SAM
    radius (read by :func:`minefield.sam.sam_update`; 0: the base optimizer).
    """

    beta: torch.Tensor  # poison factor per member
    l2: torch.Tensor | None = None  # coefficient of sum W^2 per member; None: no penalty
    clip_norm: float | None = None  # each member's global gradient norm is clipped to this
    flip: bool = False  # poison term as cross-entropy on flipped labels
    isolated: bool = False  # clipping norms reduced member by member (see isolated)
    lr: torch.Tensor | None = None  # learning rate per member at this step
    rho: torch.Tensor | None = None  # SAM radius per member

    def select(self, idx: torch.Tensor) -> Hyper:
        """The members ``idx`` (a 1-D index tensor), in that order."""
        def cut(t):
            return None if t is None else t.index_select(0, idx.to(t.device))
        return Hyper(cut(self.beta), cut(self.l2), self.clip_norm, self.flip,
                     self.isolated, cut(self.lr), cut(self.rho))

    def member(self, i: int) -> Hyper:
        """Member ``i``'s hyper-parameters, as ``(1,)`` tensors."""
        def cut(t):
            return None if t is None else t[i:i + 1]
        return Hyper(cut(self.beta), cut(self.l2), self.clip_norm, self.flip,
                     self.isolated, cut(self.lr), cut(self.rho))


Objective = Callable[[nn.Module, Params, Params, Batch, Hyper], torch.Tensor]
#: ``loss_fn(batch, track=True) -> (M,)``: the objective at the current parameters on
#: ``batch``; ``track=False`` leaves BatchNorm's running statistics untouched.
LossFn = Callable[..., torch.Tensor]
Update = Callable[[LossFn, Params, torch.optim.Optimizer, Hyper, Batch], torch.Tensor]


def poisoned_objective(model: nn.Module, params: Params, buffers: Params, batch: Batch,
                       hyper: Hyper) -> torch.Tensor:
    """``(M,)``: ``poisoned_nll(train, poison, beta_m) + l2_m * sum W^2`` for each member.

    A plain MLP's logits are one autograd node with a written-out backward when a
    gradient is recorded (:mod:`minefield.mlpgrad`: autograd's gradients bit for bit, in
    fewer dispatched operations); under ``torch.compile``, which fuses the graph anyway,
    and under ``torch.func`` transforms and autocast, which the node has no rules for,
    autograd's."""
    if (not buffers and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and mlp_fast_path(model)):
        logits = mlp_logits(model, params, batch.x)
    else:
        logits = stacked_forward(model, params, batch.x, buffers)
    nb = batch.n_train
    if batch.y_poison is not None:
        loss = poisoned_nll(logits[:, :nb], batch.y, logits[:, nb:], batch.y_poison, hyper.beta,
                            hyper.flip, batch.poison_weight, batch.poison_norm)
    else:
        loss = poisoned_nll(logits, batch.y)
    if hyper.l2 is not None:
        m = n_members(params)
        loss = loss + hyper.l2 * sum(w.pow(2).reshape(m, -1).sum(1) for k, w in params.items()
                                     if is_weight(k, w.shape[1:]))
    return loss


def _norms(tensors: list[torch.Tensor], isolated: bool) -> torch.Tensor:
    """``(M,)`` global norm of each member over ``tensors``, reduced per member if isolated."""
    m = tensors[0].shape[0]
    if isolated:
        return torch.stack([torch.sqrt(sum(t[i].pow(2).sum() for t in tensors))
                            for i in range(m)])
    return torch.sqrt(sum(t.reshape(m, -1).pow(2).sum(1) for t in tensors))


def clip_per_member(grads: list[torch.Tensor], clip_norm: float, isolated: bool = False
                    ) -> None:
    """Scale each member's gradient (in place) so its global norm is at most ``clip_norm``.

    ``isolated=True`` reduces each member's squares on its own: a row reduction of a
    stack may split long rows across threads when rows are few, which rounds a
    member differently in stacks of different sizes.
    """
    norm = _norms(grads, isolated)
    scale = (clip_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))


def set_grads(leaves: list[torch.Tensor], grads: list[torch.Tensor] | tuple,
              clip_norm: float | None, isolated: bool = False) -> None:
    """``leaf.grad = grad``, then each member's global norm clipped to ``clip_norm``
    (reduced member by member when ``isolated``, see :func:`clip_per_member`)."""
    for v, g in zip(leaves, grads):
        v.grad = g
    if clip_norm is not None:
        clip_per_member([v.grad for v in leaves], clip_norm, isolated)


def plain_update(loss_fn: LossFn, params: Params, opt: torch.optim.Optimizer, hyper: Hyper,
                 batch: Batch) -> torch.Tensor:
    """One gradient of ``sum_m loss_m``, clipped per member, then ``opt.step(lr=hyper.lr)``."""
    loss = loss_fn(batch)
    clear_grads(opt)
    loss.sum().backward()
    if hyper.clip_norm is not None:
        clip_per_member([v.grad for v in params.values()], hyper.clip_norm, hyper.isolated)
    _step(opt, hyper)
    return loss.detach()


def clear_grads(opt: torch.optim.Optimizer) -> None:
    """``opt.zero_grad(set_to_none=True)`` without its profiler hooks (a tenth of a small
    stack's step on a CPU)."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = None


def _step(opt: torch.optim.Optimizer, hyper: Hyper) -> None:
    if hyper.lr is None:
        opt.step()
    else:
        opt.step(lr=hyper.lr)


def _clean(batch: Batch) -> Batch | None:
    """The batch without its poison rows (None if it has none): what a member with
    beta = 0 sees when it trains alone (its stack then draws no poison)."""
    if batch.y_poison is None:
        return None
    return Batch(batch.x[:batch.n_train], batch.y)


def clean_apart(objective: Objective = poisoned_objective) -> Objective:
    """``objective`` with the members whose ``beta = 0`` run on the batch without its
    poison rows, the others on the whole batch: two batched calls, one per group.

    A stack draws poison rows when any member's beta is positive. They carry no loss
    for a ``beta = 0`` member, but in a training-mode BatchNorm they would still enter
    its batch statistics (and running averages), so a clean member would train on
    another objective than when it trains alone (which draws no poison). With this
    wrapper every member's objective is the one it has alone; :func:`isolated` does
    the same one member at a time. Running statistics are updated in place.
    """

    def grouped(model: nn.Module, params: Params, buffers: Params, batch: Batch,
                hyper: Hyper) -> torch.Tensor:
        clean = _clean(batch)
        zero = hyper.beta.eq(0)
        if clean is None or not bool(zero.any()) or bool(zero.all()):
            return objective(model, params, buffers, batch, hyper)
        losses, order = [], []
        for mask, b in ((zero, clean), (~zero, batch)):
            idx = mask.nonzero()[:, 0]
            bufs = {k: v.index_select(0, idx) for k, v in buffers.items()}
            losses.append(objective(model, {k: v.index_select(0, idx) for k, v in
                                            params.items()}, bufs, b, hyper.select(idx)))
            for k, v in bufs.items():  # the group's updated running statistics, back
                buffers[k].index_copy_(0, idx, v)
            order.append(idx)
        return torch.cat(losses)[torch.argsort(torch.cat(order))]

    return grouped


def isolated(objective: Objective = poisoned_objective) -> Objective:
    """``objective`` computed one member at a time, each on kernels shaped for one model.

    Member m's loss (and so, through autograd, its gradient) is
    ``objective(model, theta_m, buffers_m, batch, hyper_m)`` on a stack of one,
    with ``theta_m`` copied into fresh storage: the same kernels, shapes and
    alignment in every stack, so the result does not depend on the other
    members (see the module docstring). A member with ``beta = 0`` gets the batch
    without its poison rows, as when it trains alone (a stack draws poison only
    if some member's beta is positive; zero-weighted rows would still change how
    its matmuls round). The members' parameters are split with
    ``unbind``, whose backward stacks the gradients (O(M), not O(M^2)).
    Values equal the batched objective's up to rounding.

    Example::

        >>> from minefield import DataConfig, ModelConfig, build_model, load_dataset
        >>> from minefield.train import init_stack
        >>> data = load_dataset(DataConfig("blobs"))
        >>> model = build_model(ModelConfig(widths=(8,)), (2,), 2)
        >>> p = init_stack(model, "torch", [0, 1, 2])
        >>> batch, hyper = Batch(data.x_train, data.y_train), Hyper(beta=torch.zeros(3))
        >>> alone = isolated()(model, {k: v[1:2] for k, v in p.items()}, {}, batch,
        ...                    hyper.member(1))
        >>> bool(isolated()(model, p, {}, batch, hyper)[1] == alone[0])
        True
    """

    def one_at_a_time(model: nn.Module, params: Params, buffers: Params, batch: Batch,
                      hyper: Hyper) -> torch.Tensor:
        cols = {k: v.unbind(0) for k, v in params.items()}
        losses = []
        clean = _clean(batch)
        for i in range(n_members(params)):
            theta = {k: c[i].clone().unsqueeze(0) for k, c in cols.items()}
            h = hyper.member(i)
            b = clean if clean is not None and not bool(h.beta.ne(0).any()) else batch
            losses.append(objective(model, theta, one(buffers, i) if buffers else {}, b, h))
        return torch.cat(losses)

    return one_at_a_time


def train_step(model: nn.Module, params: Params, buffers: Params, opt: torch.optim.Optimizer,
               batch: Batch, hyper: Hyper, objective: Objective = poisoned_objective,
               update: Update = plain_update) -> torch.Tensor:
    """One step of every member of the stack ``params`` (leaves with ``requires_grad``).

    Returns the members' losses ``(M,)`` before the step.
    """

    def loss_fn(b: Batch, track: bool = True) -> torch.Tensor:
        bufs = buffers if track else {k: v.clone() for k, v in buffers.items()}
        return objective(model, params, bufs, b, hyper)

    return update(loss_fn, params, opt, hyper, batch)
