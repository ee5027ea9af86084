"""One batched engine for the loss and accuracy at many points of parameter space.

Basin radii, rollouts and landscapes all need ``L(theta + t d)`` at thousands of
points. The paper's code loads each point into the network and runs it, one
point at a time (:func:`evaluate_points_loop`, kept as the reference). Here a
chunk of points becomes one *stack* of models (see :mod:`minefield.functional`)
and runs in one forward pass:

- plain MLPs (``nn.Sequential`` of ``Linear`` and elementwise activations) use
  batched matmuls directly, ``h <- act(b + h W^T)`` via ``torch.baddbmm`` over
  the stacked weights ``(m, out, in)``;
- any other module goes through :func:`~minefield.functional.stacked_forward`
  (``functional_call`` under ``vmap``).

Points and inputs are chunked so one pass keeps about ``memory_mb`` of
activations and point weights alive. BatchNorm follows :class:`BNPolicy`:
``eval`` (default, the paper's SVHN choice) uses the centre's running
statistics for every point; ``batch`` uses each point's own batch statistics
on all of ``x`` at once (no input chunking, running stats untouched).

Losses are the mean ``-log p(y|x)`` over ``x`` (``loss="nll"``), accuracies the
fraction correct; both come back in float64, shaped like ``ts``.

Example::

    >>> from minefield import DataConfig, ModelConfig, build_model, init_params, load_dataset
    >>> from minefield import member, random_directions, stack
    >>> data = load_dataset(DataConfig("blobs"))
    >>> model = build_model(ModelConfig(widths=(8,)), (2,), 2)
    >>> theta = stack([init_params(model, "glorot_uniform", torch.Generator().manual_seed(0))])
    >>> dirs = random_directions(member(theta, 0), 8)
    >>> ts = torch.linspace(0, 1, 11).expand(8, 11)   # 8 directions x 11 distances
    >>> loss, acc = evaluate_points(model, theta, dirs, ts, data.x_train, data.y_train)
    >>> loss.shape, bool((loss[:, 0] == loss[0, 0]).all())   # t = 0 is the centre
    (torch.Size([8, 11]), True)
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .functional import (
    Params,
    _mlp_forward,
    activation_elements,
    check_single,
    member,
    mlp_fast_path,
    n_members,
    one,
    stacked_forward,
)
from .loss import nll, predict
from .options import BNPolicy, EnginePath, option

__all__ = ["BNPolicy", "LOSSES", "evaluate_points", "evaluate_combinations",
           "evaluate_points_loop", "mlp_fast_path"]

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"nll": nll}


_CACHE_BYTES = 8 * 2**20


def _use_fast(model: nn.Module, buffers: Params | None, path: EnginePath | str) -> bool:
    path = option(EnginePath, path, "engine path")
    ok = mlp_fast_path(model) and not buffers
    if path is EnginePath.MLP and not ok:
        raise ValueError("path 'mlp' needs a plain nn.Sequential MLP without buffers")
    return ok and path is not EnginePath.VMAP


def _layout(params: Params, model: nn.Module, fast: bool) -> Params:
    """Contiguous tensors; for the MLP path Linear weights become ``(..., in, out)``."""
    if not fast:
        return {k: v.contiguous() for k, v in params.items()}
    return {k: (v.transpose(-1, -2).contiguous() if k.endswith("weight") else v.contiguous())
            for k, v in params.items()}


def _check_loss(loss: str) -> Callable:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(sorted(LOSSES))}")
    return LOSSES[loss]


def _policy(bn: BNPolicy | str) -> BNPolicy:
    return option(BNPolicy, bn, "BatchNorm policy")


@torch.no_grad()
def _evaluate(model: nn.Module, n_points: int, n_params: int, dtype: torch.dtype,
              make: Callable[[slice], Params], x: torch.Tensor, y: torch.Tensor,
              buffers: Params | None, memory_mb: float, bn: BNPolicy, loss: str, fast: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss (n_points,), acc (n_points,))``; ``make(sl)`` builds the points ``sl``
    (in the :func:`_layout` of the chosen path)."""
    loss_fn = _check_loss(loss)
    dev = y.device
    out_loss = torch.zeros(n_points, dtype=torch.float64, device=dev)
    out_acc = torch.zeros(n_points, dtype=torch.float64, device=dev)
    n = len(y)
    if n == 0:
        return out_loss.fill_(float("nan")), out_acc.fill_(float("nan"))
    if n_points == 0:
        return out_loss, out_acc
    x = x.to(dtype)
    size = torch.finfo(dtype).bits // 8
    mdt = next(model.parameters()).dtype  # activation_elements runs the module itself
    per = activation_elements(model, x[:1].to(mdt)) * size  # bytes per (point, input)
    budget = memory_mb * 2**20
    pts = n if bn is BNPolicy.BATCH else max(1, min(n, int(budget // (per + 1))))
    mem = max(1, min(n_points, int(budget // (per * pts + 3 * n_params * size))))
    if fast:  # keep one layer's activations cache-sized: bandwidth, not FLOPs, limits
        width = max(m.out_features for m in model if isinstance(m, nn.Linear))
        mem = max(1, min(mem, _CACHE_BYTES // (pts * width * size)))
    was = model.training
    model.train(bn is BNPolicy.BATCH)
    try:
        for i in range(0, n_points, mem):
            sl = slice(i, min(n_points, i + mem))
            p = make(sl)
            m = n_members(p)
            b = ({k: v.expand(m, *v.shape[1:]).clone() for k, v in one(buffers, 0).items()}
                 if buffers else None)
            for j in range(0, n, pts):
                ps = slice(j, min(n, j + pts))
                logits = (_mlp_forward(model, p, x[ps], transposed=True) if fast
                          else stacked_forward(model, p, x[ps], b, path="vmap"))
                out_loss[sl] += loss_fn(logits, y[ps]).sum(-1).double()
                out_acc[sl] += (predict(logits) == y[ps]).sum(-1).double()
    finally:
        model.train(was)
    return out_loss / n, out_acc / n


def evaluate_points(model: nn.Module, center: Params, directions: Params, ts: torch.Tensor,
                    x: torch.Tensor, y: torch.Tensor, buffers: Params | None = None,
                    memory_mb: float = 256.0, loss: str = "nll",
                    bn: BNPolicy | str = "eval", path: EnginePath | str = "auto",
                    starts: Params | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and accuracy at ``theta + ts[k, j] * d_k`` for every direction k and distance j.

    ``center``: one model with a member dim of 1; ``directions``: ``(K, ...)``;
    ``ts``: ``(K,)`` (one distance per direction) or ``(K, T)``. Returns
    ``(loss, acc)`` in float64 with the shape of ``ts``. The points are formed
    in the centre's dtype, so float64 parameters give a float64 evaluation.
    ``path``: ``auto`` (batched matmuls for plain MLPs, else vmap), ``mlp`` or ``vmap``.
    ``starts`` ``(K, ...)``: lines from ``theta + s_k`` instead (hit-and-run chords).
    """
    bn = _policy(bn)
    dtype = center[next(iter(center))].dtype
    check_single(center, "the centre")
    k_dirs = next(iter(directions.values())).shape[0]
    ts = torch.as_tensor(ts)
    if ts.dim() not in (1, 2) or ts.shape[0] != k_dirs:
        raise ValueError(f"ts must be (K,) or (K, T) with K = {k_dirs} directions, "
                         f"got shape {tuple(ts.shape)}")
    fast = _use_fast(model, buffers, path)
    c = _layout(center, model, fast)
    d = _layout({k: v.to(dtype) for k, v in directions.items()}, model, fast)
    if starts is not None:
        c0 = c
        s0 = _layout({k: v.to(dtype) for k, v in starts.items()}, model, fast)
    dev = c[next(iter(c))].device
    t_flat = ts.reshape(-1).to(dtype=dtype, device=dev)
    k_idx = torch.arange(k_dirs, device=dev).repeat_interleave(
        1 if ts.dim() == 1 else ts.shape[1])

    def make(sl: slice) -> Params:
        t = t_flat[sl]
        base = c if starts is None else {k: c0[k] + s0[k][k_idx[sl]] for k in c0}
        return {k: torch.addcmul(v, t.view(-1, *[1] * (v.dim() - 1)), d[k][k_idx[sl]])
                for k, v in base.items()}

    n_params = sum(v[0].numel() for v in c.values())
    lo, ac = _evaluate(model, t_flat.numel(), n_params, dtype, make, x, y, buffers,
                       memory_mb, bn, loss, fast)
    return lo.reshape(ts.shape), ac.reshape(ts.shape)


def evaluate_combinations(model: nn.Module, center: Params, basis: Params, coeffs: torch.Tensor,
                          x: torch.Tensor, y: torch.Tensor, buffers: Params | None = None,
                          memory_mb: float = 256.0, loss: str = "nll",
                          bn: BNPolicy | str = "eval", path: EnginePath | str = "auto"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and accuracy at ``theta + sum_b coeffs[i, b] basis_b`` for every row i.

    ``basis``: ``(B, ...)`` (e.g. the two directions of a plane); ``coeffs``:
    ``(N_points, B)``. Returns ``(loss (N_points,), acc (N_points,))`` in float64.
    """
    bn = _policy(bn)
    dtype = center[next(iter(center))].dtype
    check_single(center, "the centre")
    n_basis = next(iter(basis.values())).shape[0]
    fast = _use_fast(model, buffers, path)
    c = _layout(center, model, fast)
    v = _layout({k: b.to(dtype) for k, b in basis.items()}, model, fast)
    coeffs = torch.as_tensor(coeffs).to(dtype=dtype, device=c[next(iter(c))].device)
    if coeffs.dim() != 2 or coeffs.shape[1] != n_basis:
        raise ValueError(f"coeffs must be (N, {n_basis}), got shape {tuple(coeffs.shape)}")

    def make(sl: slice) -> Params:
        a = coeffs[sl]
        return {k: (c0.reshape(1, -1) + a @ v[k].reshape(n_basis, -1)).reshape(-1, *c0.shape[1:])
                for k, c0 in c.items()}

    n_params = sum(t[0].numel() for t in c.values())
    return _evaluate(model, coeffs.shape[0], n_params, dtype, make, x, y, buffers,
                     memory_mb, bn, loss, fast)


@torch.no_grad()
def evaluate_points_loop(model: nn.Module, center: Params, directions: Params, ts: torch.Tensor,
                         x: torch.Tensor, y: torch.Tensor, buffers: Params | None = None,
                         loss: str = "nll", bn: BNPolicy | str = "eval"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's method, for reference: load each point into the module and run it.

    Same arguments and result as :func:`evaluate_points`, one forward pass per point.
    """
    loss_fn, bn = _check_loss(loss), _policy(bn)
    check_single(center, "the centre")
    ts = torch.as_tensor(ts)
    dtype = center[next(iter(center))].dtype
    net = copy.deepcopy(model).to(dtype=dtype, device=y.device).train(bn is BNPolicy.BATCH)
    x = x.to(dtype)
    tt = ts.reshape(ts.shape[0], -1)
    out_loss = torch.zeros(tt.shape, dtype=torch.float64)
    out_acc = torch.zeros(tt.shape, dtype=torch.float64)
    fixed = member(buffers or {}, 0)
    for k in range(tt.shape[0]):
        for j in range(tt.shape[1]):
            t = float(tt[k, j])
            state = {name: center[name][0] + t * directions[name][k].to(dtype) for name in center}
            net.load_state_dict(state | fixed, strict=False)
            logits = net(x)
            out_loss[k, j] = float(loss_fn(logits, y).double().mean())
            out_acc[k, j] = float((predict(logits) == y).double().mean())
    return out_loss.reshape(ts.shape), out_acc.reshape(ts.shape)
