"""Sharpness-aware minimisation (SAM, ASAM, m-SAM) for a stack of models, rho per member.

SAM (Foret et al. 2021) minimises ``max_{||eps|| <= rho} L(theta + eps)`` by one
ascent step to the first-order worst point and a descent step with the gradient
there. Per member m, with ``g = grad L_m(theta_m)``:

- ``sam``: ``eps = rho_m g / ||g||``;
- ``asam`` (Kwon et al. 2021, adaptive): ``eps = rho_m T^2 g / ||T g||`` with
  ``T = |theta| + eta`` elementwise over all parameters (the ``T`` of
  :mod:`minefield.sharpness`; Kwon et al.'s code leaves biases unscaled), so the
  radius is relative to each weight's size and, up to ``eta``, invariant to
  rescaling layers;

then the base optimizer (SGD, Adam or RMSprop, :mod:`minefield.optim`) steps
from ``theta`` with ``grad L_m(theta + eps)``, clipped per member when
``clip_norm`` is set. Norms are each member's global norm over all its
parameters; ``||g|| + 1e-12`` guards a zero gradient.

**m-SAM** (``m`` set; Foret et al. 2021 sec. 4, Andriushchenko & Flammarion
2022): the batch is split into ``k = ceil(n / m)`` parts of about ``m`` training
points (poison points split alongside, the loss split as a sum over points:
:func:`split_batch`), each part j gets its own ``eps_j`` from its own gradient, and
the update uses ``sum_j (n_j / n) grad L_j(theta + eps_j)``.
Smaller ``m`` is what Andriushchenko & Flammarion found makes SAM generalise.

``rho_m = 0`` gives member m exactly the base optimizer's gradient (the one at
``theta`` on the whole batch, bit for bit), and a stack whose every ``rho`` is 0
runs :func:`~minefield.step.plain_update` itself: one gradient per step.
BatchNorm running statistics are updated by the pass at ``theta`` only.

Example::

    >>> import torch
    >>> from minefield import DataConfig, ModelConfig, TrainConfig, build_model, load_dataset
    >>> from minefield.step import Batch, Hyper, train_step
    >>> from minefield.train import init_stack, make_optimizer
    >>> data = load_dataset(DataConfig("blobs"))
    >>> model = build_model(ModelConfig(widths=(8,)), (2,), 2)
    >>> leaves = {k: v.requires_grad_() for k, v in init_stack(model, "torch", [0, 0]).items()}
    >>> opt = make_optimizer(TrainConfig(optimizer="sgd", lr=0.1), list(leaves.values()))
    >>> hyper = Hyper(beta=torch.zeros(2), rho=torch.tensor([0.0, 0.05]))  # SGD and SAM
    >>> loss = train_step(model, leaves, {}, opt, Batch(data.x_train, data.y_train), hyper,
    ...                   update=sam_update("sam"))
    >>> bool(loss[0] == loss[1]), bool((leaves["0.weight"][0] != leaves["0.weight"][1]).any())
    (True, True)
"""

from __future__ import annotations

import math

import torch

from .functional import Params
from .options import SamKind, option
from .step import Batch, Hyper, LossFn, Update, _step, clear_grads, plain_update, set_grads

__all__ = ["SamKind", "sam_update", "sam_perturbation", "split_batch"]


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).view(-1, *[1] * (like.dim() - 1))


def sam_perturbation(params: list[torch.Tensor], grads: list[torch.Tensor] | tuple,
                     rho: torch.Tensor, kind: SamKind | str = "sam",
                     eta: float = 0.01) -> list[torch.Tensor]:
    """The ascent step ``eps`` of every member, one tensor per parameter ``(M, ...)``.

    ``sam``: ``rho_m g / ||g_m||``; ``asam``: ``rho_m T^2 g / ||T g||_m`` with
    ``T = |theta| + eta``. ``rho`` is ``(M,)``, in the units of the parameters
    (sam) or relative to ``|theta|`` (asam).

    Example::

        >>> eps = sam_perturbation([torch.ones(2, 3)], [torch.ones(2, 3)], torch.tensor([1., 2.]))
        >>> eps[0].norm(dim=1)
        tensor([1.0000, 2.0000])
    """
    kind = option(SamKind, kind, "sam")
    m = len(rho)
    scaled = list(grads)
    if kind is SamKind.ASAM:
        ts = [p.detach().abs() + eta for p in params]
        scaled = [t * g for t, g in zip(ts, grads)]
    norm = torch.sqrt(sum(g.reshape(m, -1).pow(2).sum(1) for g in scaled))
    scale = rho.to(norm) / (norm + 1e-12)
    if kind is SamKind.ASAM:
        scaled = [t * g for t, g in zip(ts, scaled)]
    return [g * _view(scale, g) for g in scaled]


def split_batch(batch: Batch, m: int) -> list[tuple[float, Batch]]:
    """``k = ceil(n_train / m)`` parts of ``batch`` with their weights ``n_j / n_train``.

    Training points are split into ``k`` contiguous parts of sizes differing by at
    most one; the poison points (and their weights) into ``k`` parts alongside. The
    batch loss is a sum over points, ``L = sum_i c_i l_i`` (``c_i = (1 - beta) / n_t``
    on a training point, ``beta w_i / W`` on a poison point, ``W = sum w``), and the
    parts split that sum: ``L = sum_j (n_j / n_t) L_j`` exactly, each part's poison
    term normalised by ``(n_j / n_t) W`` (``poison_norm``) rather than by its own
    weight, as the poison points need not split in proportion to the training points.

    Example (10 training and 3 poison points, parts of about 4: the poison term of the
    whole batch is the weighted sum of the parts')::

        >>> b = Batch(torch.randn(13, 2), torch.zeros(10, dtype=torch.long),
        ...           torch.zeros(3, dtype=torch.long))
        >>> [(w, p.n_train, len(p.y_poison), round(p.poison_norm, 6))
        ...  for w, p in split_batch(b, 4)]
        [(0.4, 4, 1, 1.2), (0.3, 3, 1, 0.9), (0.3, 3, 1, 0.9)]
    """
    nt = batch.n_train
    k = max(1, math.ceil(nt / m))
    xt, xp = batch.x[:nt], batch.x[nt:]
    train = torch.arange(nt).tensor_split(k)
    poison = torch.arange(len(xp)).tensor_split(k)
    total = (float(len(xp)) if batch.poison_weight is None
             else float(batch.poison_weight.sum()))
    out = []
    for it, ip in zip(train, poison):
        share = len(it) / nt
        if batch.y_poison is None:
            part = Batch(xt[it], batch.y[it])
        else:
            w = None if batch.poison_weight is None else batch.poison_weight[ip]
            part = Batch(torch.cat([xt[it], xp[ip]]), batch.y[it], batch.y_poison[ip], w,
                         share * total)
        out.append((share, part))
    return out


def _ascent_descent(loss_fn: LossFn, batch: Batch, leaves: list[torch.Tensor],
                    rho: torch.Tensor, kind: SamKind, eta: float,
                    grads: tuple | None = None) -> list[torch.Tensor]:
    """``grad L(theta + eps)`` on ``batch``, ``eps`` from ``grads`` (computed if None)."""
    if grads is None:
        grads = torch.autograd.grad(loss_fn(batch, track=False).sum(), leaves)
    with torch.no_grad():
        eps = sam_perturbation(leaves, grads, rho, kind, eta)
        theta = [v.detach().clone() for v in leaves]  # restored exactly: (w + e) - e != w
        for v, e in zip(leaves, eps):
            v.add_(e)
    try:
        return list(torch.autograd.grad(loss_fn(batch, track=False).sum(), leaves))
    finally:
        with torch.no_grad():
            for v, w in zip(leaves, theta):
                v.copy_(w)


def sam_update(kind: SamKind | str = "sam", m: int | None = None, eta: float = 0.01) -> Update:
    """The SAM family as an update rule for :func:`minefield.step.train_step`.

    Args:
        kind: ``sam`` or ``asam`` (``none`` returns :func:`~minefield.step.plain_update`).
        m: m-SAM part size in training points; ``None``: one perturbation per batch.
        eta: ASAM's offset in ``T = |theta| + eta``.

    The radius of member i is ``hyper.rho[i]`` (``None`` or all 0: plain update).
    Returns ``update(loss_fn, params, opt, hyper, batch) -> (M,)``, the losses at
    ``theta`` on the whole batch.

    Raises:
        ConfigError: an unknown ``kind``, ``m < 1``, ``eta < 0`` or not finite.
    """
    from .options import ConfigError

    kind = option(SamKind, kind, "sam")
    if m is not None and m < 1:
        raise ConfigError(f"sam_m must be >= 1, got {m}")
    if not (eta >= 0 and math.isfinite(eta)):  # eta = inf: T = inf, every eps NaN
        raise ConfigError(f"asam_eta must be >= 0 and finite, got {eta}")
    if kind is SamKind.NONE:
        return plain_update

    def update(loss_fn: LossFn, params: Params, opt: torch.optim.Optimizer, hyper: Hyper,
               batch: Batch) -> torch.Tensor:
        rho = hyper.rho
        if rho is None or not bool((rho > 0).any()):
            return plain_update(loss_fn, params, opt, hyper, batch)
        leaves = list(params.values())
        loss = loss_fn(batch)
        g = torch.autograd.grad(loss.sum(), leaves)
        if m is None:
            new = _ascent_descent(loss_fn, batch, leaves, rho, kind, eta, g)
        else:
            new = [torch.zeros_like(v) for v in leaves]
            for w, part in split_batch(batch, m):
                for acc, h in zip(new, _ascent_descent(loss_fn, part, leaves, rho, kind, eta)):
                    acc.add_(h, alpha=w)
        on = rho > 0
        final = [torch.where(on.view(-1, *[1] * (a.dim() - 1)), a, b) for a, b in zip(new, g)]
        clear_grads(opt)
        set_grads(leaves, final, hyper.clip_norm, hyper.isolated)
        _step(opt, hyper)
        return loss.detach()

    return update
