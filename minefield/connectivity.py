"""Mode connectivity: the loss along the straight line and along a trained Bezier curve.

Between two minima ``a`` and ``b`` of one architecture:

- the **line** ``theta(t) = (1 - t) a + t b``;
- a quadratic **Bezier curve** (Garipov et al. 2018, "Loss Surfaces, Mode Connectivity,
  and Fast Ensembling of DNNs") ``theta(t) = (1 - t)^2 a + 2 t (1 - t) c + t^2 b`` whose
  control point ``c`` is trained to minimise ``E_{t ~ U[0, 1]} L(theta(t))`` (one ``t``
  per curve and step), starting from the midpoint ``c = (a + b) / 2``, where the curve
  is the line. Endpoints are exact: ``theta(0) = a``, ``theta(1) = b`` bit for bit.

Many pairs are one stack: the control points of P curves are trained together (P members,
:func:`minefield.step.train_step` with :func:`curve_objective`), and the points of the
curves are evaluated by stacked forwards (:func:`evaluate_curves`: all T points of a curve
in one forward; with ``isolate=False`` all ``P x T`` points per chunk of memory). A curve
does not depend on its stack: its ``t`` samples come from its own generator, seeded by the
training seed and the pair's endpoint values (:func:`pair_seed`), and with ``isolate`` (the
default) each curve is trained and evaluated on kernels shaped for one model (as
:func:`minefield.step.isolated`), so a pair trained in a stack of P gives the same
numbers, bit for bit, as the pair trained alone (tested).

Models with BatchNorm get statistics recomputed at every point of the curve (Garipov et
al.): one train-mode pass over the training inputs with fresh running statistics (their
exact mean and unbiased variance on the training inputs), then evaluation in eval mode.

The **barrier** of a path (Entezari et al. 2022; Frankle et al. 2020 subtract the endpoints'
mean) is its largest excess over the straight interpolation of the endpoint values:
``max_t L(theta(t)) - ((1 - t) L(a) + t L(b))`` for the loss (nats) and
``max_t ((1 - t) A(a) + t A(b)) - A(theta(t))`` for accuracy (fraction);
:func:`barriers` also reports the maximum loss along the path.

Example::

    >>> from minefield import DataConfig, ModelConfig, build_model, load_dataset
    >>> from minefield.train import init_stack
    >>> data = load_dataset(DataConfig("blobs"))
    >>> model = build_model(ModelConfig(widths=(8,)), (2,), 2)
    >>> a, b = init_stack(model, "glorot_uniform", [0]), init_stack(model, "glorot_uniform", [1])
    >>> res = connect(model, a, b, data, ConnectConfig(n_points=5, train=CURVE_TRAIN.replace(
    ...     steps=50)))
    >>> res.curve["train_loss"].shape, bool(res.curve["train_loss"][0, 0] == res.line[
    ...     "train_loss"][0, 0])
    (torch.Size([1, 5]), True)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batches import minibatch
from .config import TrainConfig
from .connect_config import CURVE_TRAIN, ConnectConfig
from .data import Dataset
from .functional import (
    Params,
    activation_elements,
    bn_mode,
    buffers_like,
    n_members,
    stacked_forward,
)
from .loss import nll, predict
from .stacked import alone, one
from .step import Batch, Hyper, plain_update, poisoned_objective, train_step
from .train import TrainingDiverged, make_optimizer

__all__ = ["ConnectConfig", "CURVE_TRAIN", "ConnectResult", "bezier", "curve_objective",
           "pair_seed", "fit_curves", "evaluate_curves", "barriers", "connect"]

def bezier(a: Params, c: Params, b: Params, t: torch.Tensor) -> Params:
    """Points ``(1 - t)^2 a + 2 t (1 - t) c + t^2 b`` of P curves at T values of ``t``.

    ``a``, ``c``, ``b``: stacks ``(P, ...)``; ``t``: ``(T,)`` (every curve) or
    ``(P, T)``. Returns a stack ``(P * T, ...)``, curve-major. Differentiable in
    ``c`` (and ``a``, ``b``).
    """
    p = n_members(a)
    t = torch.as_tensor(t)
    t = t.expand(p, t.shape[-1]) if t.dim() == 1 else t
    if t.shape[0] != p:
        raise ValueError(f"t has {t.shape[0]} rows for {p} curves")
    k = t.shape[1]
    out = {}
    for name, va in a.items():
        tt = t.to(va).reshape(p, k, *[1] * (va.dim() - 1))
        s = 1 - tt
        pt = (s * s) * va.unsqueeze(1) + (2 * tt * s) * c[name].unsqueeze(1) \
            + (tt * tt) * b[name].unsqueeze(1)
        out[name] = pt.reshape(p * k, *va.shape[1:])
    return out


def curve_objective(a: Params, b: Params, t: torch.Tensor, isolate: bool = False):
    """An objective for :func:`~minefield.step.train_step` whose parameters are the
    control points ``c`` ``(P, ...)``: the clean NLL (+ ``l2 * sum W^2``) of each
    curve at its own ``t[p]`` (a ``(P,)`` tensor the caller refills each step).
    ``isolate``: one curve at a time, its point in fresh storage and on kernels
    shaped for one model (as :func:`minefield.step.isolated`)."""

    def objective(model: nn.Module, c: Params, buffers: Params, batch: Batch,
                  hyper: Hyper) -> torch.Tensor:
        if not isolate:
            return poisoned_objective(model, bezier(a, c, b, t.unsqueeze(1)), buffers, batch,
                                      hyper)
        cols = {k: v.unbind(0) for k, v in c.items()}  # backward stacks the gradients
        losses = []
        for i in range(n_members(c)):
            ci = {k: col[i].clone().unsqueeze(0) for k, col in cols.items()}
            point = bezier(alone(a, i), ci, alone(b, i), t[i:i + 1].unsqueeze(1))
            losses.append(poisoned_objective(model, point, one(buffers, i) if buffers else {},
                                             batch, hyper.member(i)))
        return torch.cat(losses)

    return objective


def pair_seed(a: Params, b: Params, seed: int = 0) -> int:
    """A 63-bit seed from ``seed`` and the values of one pair's endpoints (stacks of one).

    The pair's identity: the same endpoints give the same seed whatever stack they
    are in, their dtype (values hashed as float64) or device. SHA-256 of the
    names, shapes and bytes.

    Example::

        >>> a, b = {"w": torch.zeros(1, 2)}, {"w": torch.ones(1, 2)}
        >>> pair_seed(a, b) == pair_seed({"w": torch.zeros(1, 2, dtype=torch.float64)}, b)
        True
        >>> pair_seed(a, b) != pair_seed(b, a) != pair_seed(a, b, seed=1)
        True
    """
    h = hashlib.sha256(str(int(seed)).encode())
    for side in (a, b):
        for k in sorted(side):
            v = side[k].detach().to("cpu", torch.float64).contiguous()
            h.update(f"{k}{tuple(v.shape)}".encode())
            h.update(v.numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fit_curves(model: nn.Module, a: Params, b: Params, data: Dataset,
               cfg: TrainConfig = CURVE_TRAIN, isolate: bool = True) -> Params:
    """Control points ``c`` ``(P, ...)`` of P Bezier curves from ``a[p]`` to ``b[p]``.

    Minimises ``E_{t ~ U[0,1]} L_train(theta_p(t))`` with ``cfg``'s optimizer,
    schedule, batch size and L2; all curves are one stack. Curve p draws one ``t``
    per step from its own generator, seeded by :func:`pair_seed` of ``cfg.seed``
    and its endpoints; the minibatches come from ``cfg.seed`` (the same for every
    curve). So a curve sees the same ``t`` and batches in any stack, and with
    ``isolate`` (each curve's loss, gradient norm and clipping computed on its own,
    on one intra-op thread, restored on return) its control point is bit-for-bit
    the one it gets trained alone. BatchNorm layers use batch statistics.

    Raises:
        TrainingDiverged: a curve's loss became NaN or infinite (its values would be NaN).
    """
    p = n_members(a)
    w = next(iter(a.values()))
    dev, kw = w.device, {"dtype": w.dtype, "device": w.device}  # the parameters' precision
    c = {k: ((a[k] + b[k]) / 2).detach().clone().requires_grad_(True) for k in a}
    opt = make_optimizer(cfg, list(c.values()))
    t = torch.zeros(p, dtype=torch.float64, device=dev)
    gens = [torch.Generator().manual_seed(pair_seed(one(a, i), one(b, i), cfg.seed))
            for i in range(p)]
    hyper = Hyper(beta=torch.zeros(p, **kw), l2=torch.full((p,), cfg.l2, **kw)
                  if cfg.l2 > 0 else None, clip_norm=cfg.clip_norm, isolated=isolate)
    buffers = buffers_like(model, p, dev) if _has_bn(model) else {}
    objective = curve_objective(a, b, t, isolate)
    n_t = len(data.y_train)
    threads, mode = torch.get_num_threads(), bn_mode(model, True)  # BN on batch statistics
    mode.__enter__()  # (dropout off)
    if isolate:  # one model's small kernels gain nothing from threads (as fit does)
        torch.set_num_threads(1)
    ok = torch.ones(p, dtype=torch.bool, device=dev)  # checked once at the end: no syncs
    try:
        for step in range(cfg.steps):
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(step)
            t.copy_(torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens]))
            batch = minibatch(data, cfg.seed, step, cfg.batch_size or n_t, 0, None)
            ok &= train_step(model, c, buffers, opt, batch, hyper, objective,
                             plain_update).isfinite()
    finally:
        mode.__exit__(None, None, None)
        torch.set_num_threads(threads)
    for v in c.values():
        ok &= v.detach().reshape(p, -1).isfinite().all(1)
    if not bool(ok.all()):
        raise TrainingDiverged(f"the curve of pair(s) {(~ok).nonzero().flatten().tolist()} "
                               f"diverged (loss NaN or infinite) in {cfg.steps} steps at lr "
                               f"{cfg.lr:g}: use a smaller --lr")
    return {k: v.detach() for k, v in c.items()}


@torch.no_grad()
def _point_stats(model: nn.Module, points: Params, x: torch.Tensor) -> Params:
    """Fresh BatchNorm statistics of every point: one train-mode pass over ``x``."""
    bufs = buffers_like(model, n_members(points), x.device)
    mods = [mo for mo in model.modules() if isinstance(mo, nn.modules.batchnorm._BatchNorm)]
    saved = [mod.momentum for mod in mods]
    try:
        for mod in mods:
            mod.momentum = 1.0  # running <- the batch's own mean and unbiased variance
        with bn_mode(model, True):
            stacked_forward(model, points, x, bufs)
    finally:
        for mod, mom in zip(mods, saved):
            mod.momentum = mom
    return bufs


@torch.no_grad()
def evaluate_curves(model: nn.Module, a: Params, c: Params, b: Params, ts: torch.Tensor,
                    x: torch.Tensor, y: torch.Tensor, x_stats: torch.Tensor | None = None,
                    memory_mb: float = 256.0, isolate: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL and accuracy at every point of P curves: ``(loss (P, T), acc (P, T))``.

    ``ts`` ``(T,)``. Points go through one stacked forward per chunk of about
    ``memory_mb`` of activations, the inputs in chunks too where one point's exceed it.
    With BatchNorm, each point's statistics are recomputed on ``x_stats`` (the training
    inputs, required then; one pass over all of them per point).
    ``isolate``: one curve at a time, in fresh storage (its numbers are then the same in
    any stack)."""
    p, k = n_members(a), len(ts)
    if isolate:
        rows = [evaluate_curves(model, alone(a, i), alone(c, i), alone(b, i), ts, x, y,
                                x_stats, memory_mb) for i in range(p)]
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    bn = _has_bn(model)
    if bn and x_stats is None:
        raise ValueError("a model with BatchNorm needs x_stats (the training inputs) to "
                         "recompute its statistics along the curve")
    dtype = next(iter(a.values())).dtype
    x = x.to(dtype)
    per = activation_elements(model, x[:2].to(next(model.parameters()).dtype)) * x.element_size()
    step = max(1, min(len(x), int(memory_mb * 2**20 // max(1, per))))  # inputs per forward
    n_pts = max(step, 0 if x_stats is None else len(x_stats))
    chunk = max(1, int(memory_mb * 2**20 // max(1, per * n_pts)))
    loss = torch.empty(p * k, dtype=torch.float64, device=y.device)
    acc = torch.empty(p * k, dtype=torch.float64, device=y.device)
    loss, acc = loss.view(p, k), acc.view(p, k)
    per_t = min(k, chunk)  # values of t per forward: all of them unless one curve's overflow
    with bn_mode(model, False):
        for i in range(0, p, max(1, chunk // k)):
            sl = slice(i, min(p, i + max(1, chunk // k)))
            for j in range(0, k, per_t):
                cols = slice(j, min(k, j + per_t))
                pts = bezier({n: v[sl] for n, v in a.items()},
                             {n: v[sl] for n, v in c.items()},
                             {n: v[sl] for n, v in b.items()}, ts[cols])
                bufs = _point_stats(model, pts, x_stats.to(dtype)) if bn else None
                lo, ac = _means(model, pts, x, y, bufs, step)
                loss[sl, cols], acc[sl, cols] = (v.view(-1, cols.stop - cols.start)
                                                 for v in (lo, ac))
    return loss, acc


def _means(model: nn.Module, pts: Params, x: torch.Tensor, y: torch.Tensor,
           bufs: Params | None, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL and accuracy ``(m,)`` (float64) of the points on ``x``, ``step`` inputs
    per forward (summed per chunk where the inputs do not fit one)."""
    if step >= len(x):
        logits = stacked_forward(model, pts, x, bufs)
        return nll(logits, y).double().mean(-1), (predict(logits) == y).double().mean(-1)
    lo = ac = 0
    for i in range(0, len(x), step):
        logits, yi = stacked_forward(model, pts, x[i:i + step], bufs), y[i:i + step]
        lo = lo + nll(logits, yi).double().sum(-1)
        ac = ac + (predict(logits) == yi).double().sum(-1)
    return lo / len(x), ac / len(x)


def barriers(ts: torch.Tensor, loss: torch.Tensor, acc: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per path ``(P,)``: ``max_loss``, ``loss_barrier``, ``acc_barrier`` and the ``t``
    of the loss barrier (see the module docstring); ``loss``/``acc`` are ``(P, T)``."""
    t = torch.as_tensor(ts, dtype=torch.float64).to(loss.device)
    lin_l = (1 - t) * loss[:, :1] + t * loss[:, -1:]
    lin_a = (1 - t) * acc[:, :1] + t * acc[:, -1:]
    excess = loss - lin_l
    return {"max_loss": loss.max(1).values, "loss_barrier": excess.max(1).values,
            "t_barrier": t[excess.argmax(1)], "acc_barrier": (lin_a - acc).max(1).values}


@dataclass
class ConnectResult:
    """Line and curve from ``a[p]`` to ``b[p]``: ``ts`` ``(T,)``; ``line`` and ``curve``
    hold ``{train,test}_{loss,acc}`` ``(P, T)`` and their :func:`barriers` ``(P,)``
    (keys ``train_max_loss``, ``test_acc_barrier``, ...); ``control`` the trained ``c``."""

    ts: torch.Tensor
    line: dict[str, torch.Tensor]
    curve: dict[str, torch.Tensor]
    control: Params

    def to_dict(self) -> dict[str, Any]:
        return {"ts": self.ts.tolist(),
                "line": {k: v.tolist() for k, v in self.line.items()},
                "curve": {k: v.tolist() for k, v in self.curve.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], control: Params | None = None) -> ConnectResult:
        def tensors(x):
            return {k: torch.tensor(v, dtype=torch.float64) for k, v in x.items()}

        return cls(torch.tensor(d["ts"], dtype=torch.float64), tensors(d["line"]),
                   tensors(d["curve"]), control or {})


def _path(model, a, c, b, data, ts, memory_mb, isolate) -> dict[str, torch.Tensor]:
    out = {}
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        loss, acc = evaluate_curves(model, a, c, b, ts, x, y, data.x_train, memory_mb, isolate)
        loss, acc = loss.cpu(), acc.cpu()  # a result on the CPU (plots, JSON), any device
        out[f"{split}_loss"], out[f"{split}_acc"] = loss, acc
        out.update({f"{split}_{k}": v for k, v in barriers(ts, loss, acc).items()})
    return out


def connect(model: nn.Module, a: Params, b: Params, data: Dataset,
            cfg: ConnectConfig = ConnectConfig(), control: Params | None = None,
            on_control: Callable[[Params], None] | None = None) -> ConnectResult:
    """Connect ``a[p]`` to ``b[p]`` for every pair p by the line and a trained Bezier curve.

    ``a``, ``b``: stacks ``(P, ...)`` of one architecture (a stack of one is
    broadcast to the other's P). ``control``: control points already trained
    (skips :func:`fit_curves`); ``on_control(c)`` gets the ones trained here before the
    evaluation (the stage saves them: a killed command resumes there). Returns losses
    and accuracies on the train and test splits along both paths, and their barriers.
    With ``cfg.isolate`` a pair's numbers are the same, bit for bit, in any stack of pairs.

    Raises:
        ValueError: endpoints of two architectures, or with NaN or infinite weights.
        TrainingDiverged: a curve's training diverged (:func:`fit_curves`).
    """
    a, b = _broadcast(a, b)
    for side, ends in (("a", a), ("b", b)):  # a NaN weight makes every value along it NaN
        bad = (~torch.stack([v.reshape(len(v), -1).isfinite().all(1) for v in ends.values()])
               .all(0)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"endpoint {side} of pair(s) {bad} has NaN or infinite weights")
    names = {k: v.shape for k, v in model.named_parameters()}
    if set(a) != set(names) or any(a[k].shape[1:] != names[k] for k in a):
        raise ValueError("the endpoints are not the model's parameters (names or shapes)")
    if control is None:
        control = fit_curves(model, a, b, data, cfg.train, cfg.isolate)
        if on_control is not None:
            on_control(control)
    elif set(control) != set(a) or any(control[k].shape != a[k].shape
                                       or control[k].dtype != a[k].dtype for k in a):
        raise ValueError("control points must have the endpoints' names, shapes "
                         f"(P = {n_members(a)} pairs) and dtype")
    ts = cfg.ts()
    mid = {k: (a[k] + b[k]) / 2 for k in a}
    return ConnectResult(ts, _path(model, a, mid, b, data, ts, cfg.memory_mb, cfg.isolate),
                         _path(model, a, control, b, data, ts, cfg.memory_mb, cfg.isolate),
                         control)


def _broadcast(a: Params, b: Params) -> tuple[Params, Params]:
    if set(a) != set(b) or any(a[k].shape[1:] != b[k].shape[1:] for k in a):
        raise ValueError("the two endpoints are not of one architecture")
    pa, pb = n_members(a), n_members(b)
    if pa != pb and 1 not in (pa, pb):
        raise ValueError(f"{pa} and {pb} endpoints: give equal numbers, or one and many")
    p = max(pa, pb)
    return ({k: v.expand(p, *v.shape[1:]) for k, v in a.items()},
            {k: v.expand(p, *v.shape[1:]) for k, v in b.items()})
