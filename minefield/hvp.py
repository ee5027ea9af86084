"""Hessian-, Gauss-Newton- and Fisher-vector products for a whole stack of models in one call.

The curvature of the mean training loss ``L(theta) = (1/N) sum_i l(f(x_i; theta), y_i)``
enters every flatness measure through products with a vector ``v``:

- Hessian: ``H v = d/dt grad L(theta + t v) |_{t=0}``, forward-over-reverse
  (``torch.func.jvp`` of ``torch.func.grad``): about the cost of two gradients, exact;
- generalised Gauss-Newton (Schraudolph 2002): ``G v = J^T H_z J v`` with ``J``
  the Jacobian of the outputs ``z = f(x; theta)`` and ``H_z`` the Hessian of the
  loss in ``z`` (positive semi-definite for the NLL);
- empirical Fisher: ``F v = (1/N) sum_i g_i (g_i . v)`` with the per-sample
  gradients ``g_i = grad l_i`` (also PSD; Kunstner et al. 2019 on its limits).

An :class:`Objective` is the loss of every member of a stack ``{name: (M, ...)}``
(see :mod:`minefield.functional`); :class:`CurvatureOperator` applies one of the
three matrices to ``(M, n)`` or ``(M, K, n)`` flat vectors, all members (and all
K probes) through ``torch.func.vmap`` in one call. Vectors are flat in
:func:`~minefield.functional.flatten` order. BatchNorm follows the engine's
:class:`~minefield.engine.BNPolicy`: ``eval`` uses each member's running
statistics, ``batch`` the statistics of the whole training set (never updated).
Everything runs in the parameters' dtype: float64 parameters give a float64
operator.

Example (a stack of two swiss-roll-sized MLPs, one HVP call for both)::

    >>> import torch
    >>> from minefield import ModelConfig, build_model
    >>> from minefield.train import init_stack
    >>> model = build_model(ModelConfig(widths=(8,)), (2,), 2)
    >>> p = init_stack(model, "glorot_uniform", [0, 1])
    >>> x, y = torch.randn(20, 2), torch.randint(0, 2, (20,))
    >>> op = CurvatureOperator(model_objective(model, p, (x, y)))
    >>> op.matvec(torch.randn(2, op.n)).shape   # (M, n)
    torch.Size([2, 33])
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vjp, vmap

from .config import ConfigError
from .data import Dataset
from .engine import LOSSES, BNPolicy, evaluate_points
from .functional import bn_mode, buffers_like, check_buffers, covers
from .graph_hvp import GraphHessian, graph_plan
from .kept_graph import KeptGraph, check_second_derivatives
from .loss import check_labels, logits_only
from .options import option
from .pearlmutter import MLPHessian, mlp_plan
from .stacked import Params, flatten, member, n_members, one, unflatten

__all__ = ["CurvatureKind", "NonFiniteLoss", "Objective", "model_objective", "CurvatureOperator",
           "dense_matrix"]

Forward = Callable[[Params, Params, torch.Tensor], torch.Tensor]  # (p, b, x) -> outputs (N, C)
PerSample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, y) -> losses (N,)


class CurvatureKind(str, enum.Enum):
    HESSIAN = "hessian"
    GGN = "ggn"
    FISHER = "fisher"


class NonFiniteLoss(ValueError):
    """The loss is NaN or infinite at a member: its curvature is undefined."""


class Objective:
    """The loss ``L_m`` of every member m of a stack, as differentiable pieces.

    ``L_m = weight * sum_chunks sum_i per_sample(forward(p_m, b_m, x_c), y_c)_i``.
    ``params`` ``{name: (M, ...)}``, copied (an optimizer step on the caller's tensors
    later must not reach an operator's cached forward pass and leave it half updated);
    ``buffers`` ``{name: (M, ...)}`` (per-member running statistics) or ``{name: None}``
    (batch statistics) or ``{}``; ``chunks`` is a list of ``(x, y)`` pieces of the data.
    ``model``, ``data``, ``bn``, ``loss`` (:func:`model_objective`) let
    :meth:`perturbed_losses` use the batched engine instead of autograd."""

    def __init__(self, params: Params, forward: Forward, per_sample: PerSample,
                 chunks: Sequence[tuple[torch.Tensor, torch.Tensor]], weight: float = 1.0,
                 buffers: Params | None = None, model: nn.Module | None = None,
                 data: tuple[torch.Tensor, torch.Tensor] | None = None,
                 bn: BNPolicy = BNPolicy.EVAL, loss: str = "nll"):
        self.params = {k: v.detach().clone() for k, v in params.items()}
        self.forward, self.per_sample = forward, per_sample
        self.chunks, self.weight = list(chunks), float(weight)
        self.buffers = dict(buffers or {})
        self.model, self.data, self.bn, self.loss = model, data, bn, loss
        self._bdim = 0 if any(v is not None for v in self.buffers.values()) else None

    @classmethod
    def from_function(cls, params: Params, fn: Callable[[Params], torch.Tensor],
                      inner: Callable[[Params], torch.Tensor] | None = None) -> Objective:
        """``L_m = fn(inner(p_m))`` (``inner`` defaults to the identity on the dict).

        For oracles such as ``L(w) = w^T A w / 2``; with ``inner`` the outputs
        ``z = inner(p)`` define the Gauss-Newton matrix ``J^T (d^2 fn / dz^2) J``.
        """
        inner = inner or (lambda p: p)
        dummy = torch.zeros(1)
        return cls(params, lambda p, b, x: inner(p), lambda z, y: fn(z).reshape(1),
                   [(dummy, dummy)])

    # --- shapes -------------------------------------------------------------------------
    @property
    def n_members(self) -> int:
        return n_members(self.params)

    @property
    def n_params(self) -> int:
        return sum(math.prod(v.shape[1:]) for v in self.params.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    def member_loss(self, p: Params, b: Params) -> torch.Tensor:
        """The loss of one member (no member dimension): a scalar."""
        return sum(self.weight * self.per_sample(self.forward(p, b, x), y).sum()
                   for x, y in self.chunks)

    # --- values and gradients of the whole stack -------------------------------------------
    def losses(self, params: Params | None = None) -> torch.Tensor:
        """``(M,)`` losses at ``params`` (default: the objective's own)."""
        p = self.params if params is None else params
        with torch.no_grad():
            return vmap(self.member_loss, in_dims=(0, self._bdim))(p, self.buffers)

    def value_and_grad(self, params: Params, repeat: int = 1) -> tuple[torch.Tensor, Params]:
        """``(losses (M R,), gradients {name: (M R, ...)})`` of every point in one call;
        ``params`` holds ``repeat`` consecutive points per member (member-major)."""
        b = self.buffers
        if self._bdim == 0 and repeat > 1:
            b = {k: v.repeat_interleave(repeat, 0) for k, v in b.items()}
        g, v = vmap(grad_and_value(self.member_loss), in_dims=(0, self._bdim))(params, b)
        return v, g

    def check_finite(self) -> torch.Tensor:
        """The ``(M,)`` losses, or :class:`NonFiniteLoss` naming the bad members."""
        return _raise_if_not_finite(self.losses())

    def perturbed_losses(self, i: int, directions: Params, ts: torch.Tensor) -> torch.Tensor:
        """Losses ``(K,)`` of member ``i`` at ``theta_i + ts[k] d_k`` (no gradients).

        Models go through :func:`~minefield.engine.evaluate_points` (batched
        matmuls, chunked); other objectives through ``vmap``.
        """
        centre = one(self.params, i)
        dev = next(iter(centre.values())).device
        if self.model is not None:
            # batch statistics: the engine makes the (unused) stats it updates itself, on
            # the data's device
            bufs = one(self.buffers, i) if self._bdim == 0 else None
            x, y = self.data
            return evaluate_points(self.model, centre, directions, ts, x, y, bufs,
                                   loss=self.loss, bn=self.bn)[0]
        pts = {k: v + ts.to(dev, v.dtype).view(-1, *[1] * (v.dim() - 1)) * directions[k]
               for k, v in centre.items()}
        b = member(self.buffers, i) if self._bdim == 0 else self.buffers
        with torch.no_grad():
            return vmap(self.member_loss, in_dims=(0, None))(pts, b).double()

    def restrict(self, idx: torch.Tensor) -> Objective:
        """The same objective on the data points ``idx`` only (for m-sharpness)."""
        if self.model is None:
            raise ConfigError("only a model objective can be restricted to a data subset")
        x, y = self.data
        return model_objective(self.model, self.params, (x[idx], y[idx]), self._own_buffers(),
                               self.bn, self.loss, _mode_checked=True)

    def _own_buffers(self) -> Params | None:
        return self.buffers if self._bdim == 0 else None


def _raise_if_not_finite(losses: torch.Tensor) -> torch.Tensor:
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteLoss(f"the loss is NaN or infinite at member(s) {bad}: curvature and "
                            f"sharpness are undefined there")
    return losses


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def model_objective(model: nn.Module, params: Params,
                    data: Dataset | tuple[torch.Tensor, torch.Tensor],
                    buffers: Params | None = None, bn: BNPolicy | str = "eval",
                    loss: str = "nll", batch_size: int | None = None,
                    _mode_checked: bool = False) -> Objective:
    """The mean training loss of every member of ``params`` ``(M, ...)`` on ``data``.

    ``data``: a :class:`~minefield.data.Dataset` (its train split) or ``(x, y)``.
    ``bn="eval"`` uses the running statistics ``buffers`` ``(M, ...)`` (default:
    the module's own); ``bn="batch"`` the statistics of all of ``x`` at once.
    ``batch_size`` splits ``x`` into chunks whose products are summed (memory
    only; not allowed with ``bn="batch"``). Inputs are cast to the parameters' dtype.

    Raises:
        ConfigError: an unknown loss or BN policy, a BatchNorm model left in
            training mode under ``bn="eval"``, ``batch_size`` with ``bn="batch"``, or
            no ``buffers`` under ``bn="eval"`` for a BatchNorm never updated (see
            :func:`~minefield.functional.check_buffers`).
    """
    try:
        bn = BNPolicy.of(bn)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; choose from {', '.join(sorted(LOSSES))}")
    has_bn = _has_bn(model)
    if has_bn and model.training and bn is BNPolicy.EVAL and not _mode_checked:
        raise ConfigError("the model is in training mode but bn='eval' uses running statistics: "
                          "call model.eval(), or pass bn='batch'")
    x, y = data.split("train") if isinstance(data, Dataset) else data
    if len(x) != len(y) or not len(y):
        raise ConfigError(f"x has {len(x)} inputs and y {len(y)} labels: need as many, >= 1")
    dtype = next(iter(params.values())).dtype
    x, y = x.to(dtype), check_labels(y)  # int64 (the R-operators index with it)
    m = n_members(params)
    if has_bn:  # never a fresh module's statistics in place of the trained ones
        check_buffers(model, buffers, m, bn is BNPolicy.BATCH)
    if bn is BNPolicy.BATCH and has_bn:
        if batch_size is not None and batch_size < len(y):
            raise ConfigError("bn='batch' normalises with the statistics of all inputs at once: "
                              "batch_size cannot split them")
        bufs: Params = {k: None for k, _ in model.named_buffers()}
    elif buffers:
        bufs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in buffers.items()}
    else:  # the module's own, on the parameters' device (the module may be elsewhere)
        bufs = buffers_like(model, m, next(iter(params.values())).device, dtype)
    step = batch_size or max(1, len(y))
    chunks = [(x[i:i + step], y[i:i + step]) for i in range(0, len(y), step)]
    loss_fn = LOSSES[loss]
    train = bn is BNPolicy.BATCH and has_bn

    def forward(p: Params, b: Params, xx: torch.Tensor) -> torch.Tensor:
        with bn_mode(model, train):  # dropout stays off either way
            return functional_call(model, (p, b), (xx,))

    if len(y) and not train:  # two inputs tell the logits' count (BatchNorm1d: not one)
        try:
            with torch.no_grad():
                width = logits_only(forward(member(params, 0), member(bufs, 0), x[:2])).shape[-1]
        except RuntimeError:  # data that do not fit: the caller's checks or the first
            width = None  # product say so
        check_labels(y, width)
    return Objective(params, forward, loss_fn, chunks, 1.0 / max(1, len(y)), bufs, model,
                     (x, y), bn, loss)


def _pearlmutter_applies(obj: Objective) -> bool:
    """Only for params holding every parameter: a frozen one left out is a constant of
    the module, which the R-operator would read as none (:func:`covers`)."""
    return (obj.model is not None and not obj.buffers and obj.loss == "nll"
            and covers(obj.model, obj.params) and mlp_plan(obj.model) is not None)


def _graph_applies(obj: Objective) -> bool:
    """BatchNorm only with running statistics: batch statistics couple the samples; every
    parameter in params, as for :func:`_pearlmutter_applies`."""
    return (obj.model is not None and obj.loss == "nll" and (obj._bdim == 0 or not obj.buffers)
            and covers(obj.model, obj.params) and graph_plan(obj.model) is not None)


class CurvatureOperator:
    """``H``, ``G`` or ``F`` of every member, applied to flat ``(M, n)`` vectors in one call.

    The Hessian defaults to ``mode="reverse"``: Pearlmutter's R-operator with the
    forward and backward quantities cached once, for plain MLPs with the NLL
    (:func:`~minefield.pearlmutter.mlp_plan`) as batched matmuls over the members
    (:class:`~minefield.pearlmutter.MLPHessian`), for traceable conv/BatchNorm
    networks with running statistics (:func:`~minefield.graph_hvp.graph_plan`, such
    as ResNet-20) layer by layer (:class:`~minefield.graph_hvp.GraphHessian`); for
    any other model the gradient of the summed loss of all members is built once
    with its graph kept (``create_graph``), and each product is one more backward pass
    through it, a block of probes in one batched pass
    (:class:`~minefield.kept_graph.KeptGraph`). ``mode="forward"`` (``jvp`` of ``grad``
    under ``vmap``) keeps no graph: less memory, slower. GGN and Fisher always use
    forward mode. ``probe_chunk`` bounds how many probes :meth:`matmat`
    pushes through one call. Checks once that every member's loss is finite.

    Raises:
        NonFiniteLoss: the loss is NaN or infinite at some member.
        ConfigError: an unknown kind or mode.
    """

    def __init__(self, objective: Objective, kind: CurvatureKind | str = "hessian",
                 probe_chunk: int | None = 64, mode: str = "reverse"):
        try:
            self.kind = option(CurvatureKind, kind, "curvature kind")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if mode not in ("reverse", "forward"):
            raise ConfigError(f"mode must be 'reverse' or 'forward', got {mode!r}")
        self.objective = objective
        self.probe_chunk = probe_chunk
        self.n, self.m = objective.n_params, objective.n_members
        self.dtype = objective.dtype
        self.device = next(iter(objective.params.values())).device
        self.n_matvecs = 0  # products per member applied so far (one per probe vector)
        self.mode = mode if self.kind is CurvatureKind.HESSIAN else "forward"
        if self.kind is CurvatureKind.HESSIAN and objective.model is not None:
            check_second_derivatives(objective.model)
        self._mlp = None  # an exact R-operator when one applies: MLPHessian or GraphHessian
        if self.mode == "reverse" and _pearlmutter_applies(objective):
            self._mlp = MLPHessian(objective.model, objective.params, objective.chunks,
                                   objective.weight)
            _raise_if_not_finite(self._mlp.losses)
        elif self.mode == "reverse" and _graph_applies(objective):
            self._mlp = GraphHessian(objective.model, objective.params, objective.buffers,
                                     objective.chunks, objective.weight)
            _raise_if_not_finite(self._mlp.losses)
        elif self.mode == "reverse":
            self._kept = KeptGraph(objective)
            _raise_if_not_finite(self._kept.losses)
        else:
            objective.check_finite()
        self._apply = vmap(self._member_product, in_dims=(0, objective._bdim, 0))

    def _member_product(self, p: Params, b: Params, v: Params) -> Params:
        obj = self.objective
        if self.kind is CurvatureKind.HESSIAN:
            return jvp(grad(lambda q: obj.member_loss(q, b)), (p,), (v,))[1]
        out = {k: torch.zeros_like(t) for k, t in p.items()}
        for x, y in obj.chunks:
            if self.kind is CurvatureKind.GGN:
                def f(q, x=x):
                    return obj.forward(q, b, x)

                z, jv = jvp(f, (p,), (v,))
                hjv = jvp(grad(lambda zz, y=y: obj.per_sample(zz, y).sum()), (z,), (jv,))[1]
                back = vjp(f, p)[1](obj.weight * hjv)[0]
            else:
                def f(q, x=x, y=y):
                    return obj.per_sample(obj.forward(q, b, x), y)

                _, jv = jvp(f, (p,), (v,))
                back = vjp(f, p)[1](obj.weight * jv)[0]
            out = {k: out[k] + back[k] for k in out}
        return out

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        """``(M, n) -> (M, n)`` without checks or counting."""
        obj = self.objective
        if self._mlp is not None:
            return self._mlp.matvec_flat(v.to(self.dtype))
        vd = unflatten(v.to(self.dtype), obj.params)
        if self.mode == "forward":
            return flatten(self._apply(obj.params, obj.buffers, vd))
        return self._kept.product(v.to(self.dtype))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``(M, n) -> (M, n)``: member m's matrix times ``v[m]``."""
        if v.shape != (self.m, self.n):
            raise ConfigError(f"expected vectors of shape ({self.m}, {self.n}), got "
                              f"{tuple(v.shape)}")
        self.n_matvecs += 1
        return self._product(v)

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        """``(M, K, n) -> (M, K, n)``: K products per member, ``probe_chunk`` at a time
        through ``vmap`` (forward mode) or one batched backward through the kept graph
        (reverse mode; one backward per probe where an op has no batching rule); the
        MLP R-operator takes up to ``probe_chunk`` probes as one batch axis where that pays
        (:attr:`~minefield.pearlmutter.MLPHessian.probes_per_pass`), the layer-by-layer
        one (conv nets) one product at a time."""
        if v.dim() != 3 or v.shape[0] != self.m or v.shape[2] != self.n:
            raise ConfigError(f"expected vectors of shape ({self.m}, K, {self.n}), got "
                              f"{tuple(v.shape)}")
        k = v.shape[1]
        self.n_matvecs += k
        chunk = self.probe_chunk or k
        if self.mode == "reverse" and self._mlp is None:
            return self._kept.products(v.to(self.dtype), chunk)
        per = min(chunk, getattr(self._mlp, "probes_per_pass", 0))
        if per >= 2:  # the MLP R-operator, the probes a batch axis of its matmuls
            v = v.to(self.dtype)
            return torch.cat([self._mlp.matmat_flat(v[:, i:i + per])
                              for i in range(0, k, per)], 1)
        if self.mode == "reverse":
            return torch.stack([self._product(v[:, i]) for i in range(k)], 1)
        fn = vmap(self._product, in_dims=1, out_dims=1)
        return torch.cat([fn(v[:, i:i + chunk]) for i in range(0, k, chunk)], 1)


def dense_matrix(op: CurvatureOperator) -> torch.Tensor:
    """The full ``(M, n, n)`` matrix of ``op`` from ``n`` products with the unit vectors
    (``probe_chunk`` columns at a time), symmetrised. Memory ``M n^2``: small nets only."""
    eye = torch.eye(op.n, dtype=op.dtype, device=op.device).expand(op.m, op.n, op.n)
    h = op.matmat(eye)  # (M, n, n): row j is H e_j
    return (h + h.transpose(1, 2)) / 2
