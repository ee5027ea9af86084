"""One batched engine for the loss and accuracy at many points of parameter space.

Basin radii, rollouts and landscapes all need ``L(theta + t d)`` at thousands of
points. The paper's code loads each point into the network and runs it, one
point at a time (:func:`evaluate_points_loop`, kept as the reference). Here a
chunk of points becomes one *stack* of models (see :mod:`minefield.functional`)
and runs in one forward pass:

- plain MLPs (``nn.Sequential`` of ``Linear`` and elementwise activations) use
  batched matmuls directly, ``h <- act(b + h W^T)`` as one ``torch.bmm`` over the
  stacked weights in homogeneous coordinates ``(m, out + 1, in + 1)``
  (:mod:`minefield.homogeneous`);
- any other module goes through :func:`~minefield.functional.stacked_forward`
  (``functional_call`` under ``vmap``, path ``vmap``), or, for conv nets, runs one
  point at a time on all the data (paths ``loop`` / ``loop_cl``: plain convolutions
  instead of grouped ones); a sequential conv net then shares its first
  convolution's unfolded input between points (:mod:`minefield.seqconv`).

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
from torch.func import functional_call

from . import homogeneous
from .autotune import arithmetic, cache_clamped, choose_path, memory_budget_mb, probe_key
from .functional import (
    Params,
    activation_elements,
    batch_statistics,
    bn_mode,
    buffers_like,
    check_buffers,
    check_single,
    covers,
    member,
    mlp_fast_path,
    n_members,
    one,
    stacked_forward,
)
from .loss import check_labels, nll, predict
from .options import BNPolicy, ConfigError, EnginePath, Precision, option
from .seqconv import seq_conv_logits, seq_conv_path

__all__ = ["BNPolicy", "LOSSES", "evaluate_points", "evaluate_combinations",
           "evaluate_points_loop", "mlp_fast_path", "precision_error"]

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"nll": nll}


#: one MLP layer's activations per chunk on a CPU: 1-4 MB ran the swiss-roll MLP (1024
#: points, 200 inputs) 1.2-1.4x faster than 8 MB at 1 and 2 threads (idle, 2026-11-30)
_CACHE_BYTES = 4 * 2**20
#: the looped conv paths on a CPU: a layer output of one point over more than twice
#: this is split into equal input chunks of at most this. ResNet-20 on 128 images (8 MB
#: per layer) ran 1.1-2.3x faster in chunks of 32 images (2 MB) than whole, and 4 MB
#: chunks page-faulted as the whole did (glibc maps and unmaps blocks above its adaptive
#: threshold); the digits CNN (2.9 MB) ran 0.8-1.0x as fast split into halves, so it stays
#: whole (idle 2-core CPU, 2026-11-30)
_LOOP_CACHE_BYTES = 2 * 2**20
#: points built (and their logits kept) at a time on the looped paths, which run one
#: point per call anyway: 1024 at once ran the digits CNN 5-30% slower than 16-64 at a
#: time in 5 of 6 side-by-side rounds (idle 2-core CPU, 2026-11-30), and memory stays small
_LOOP_POINTS = 64


def _candidates(model: nn.Module, buffers: Params | None, path: EnginePath | str,
                x: torch.Tensor, center: Params) -> list[str]:
    """The paths ``path`` allows for this model, the preferred (unprobed) one first; the
    matmuls only for a centre with every parameter at its shape (:func:`homogeneous.fits`)."""
    path = option(EnginePath, path, "engine path")
    mlp_ok = mlp_fast_path(model) and not buffers and homogeneous.fits(model, center)
    if path is EnginePath.MLP and not mlp_ok:
        raise ValueError("path 'mlp' needs a plain nn.Sequential MLP, no buffers, a full centre")
    if path is EnginePath.LOOP_CL and x.dim() != 4:
        raise ValueError("path 'loop_cl' needs images (N, C, H, W); use 'loop'")
    if path not in (EnginePath.AUTO, EnginePath.PROBE):
        return [path.value]
    conv = x.dim() == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules())
    if path is EnginePath.AUTO and x.device.type == "cpu":  # a fixed rule: reproducible
        bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        return ["mlp" if mlp_ok else ("loop_cl" if bn else "loop") if conv else "vmap"]
    if mlp_ok:
        return ["mlp", "vmap"]
    return ["vmap", "loop", "loop_cl"] if conv else ["vmap", "loop"]


def _check_loss(loss: str) -> Callable:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(sorted(LOSSES))}")
    return LOSSES[loss]


def _looped_logits(model: nn.Module, p: Params, x: torch.Tensor, b: Params | None,
                   channels_last: bool) -> torch.Tensor:
    """``(m, N, C)``: each point of the stack ``p`` run alone on all of ``x``, as an
    ordinary module call (one plain convolution per layer instead of a grouped one);
    a sequential conv net with its first convolution shared (:mod:`minefield.seqconv`),
    except under autocast (its products write into a float32 buffer) or without a full stack."""
    if (not b and seq_conv_path(model) and covers(model, p)
            and not torch.is_autocast_enabled(x.device.type)):
        return seq_conv_logits(model, p, x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = []
    for i in range(n_members(p)):
        pi = {k: (v[i].contiguous(memory_format=torch.channels_last)
                  if channels_last and v.dim() == 5 else v[i]) for k, v in p.items()}
        bi = {k: v[i] for k, v in b.items()} if b else {}
        out.append(functional_call(model, (pi, bi), (x,)))
    return torch.stack(out)


@torch.no_grad()
def _evaluate(model: nn.Module, n_points: int, n_params: int, dtype: torch.dtype,
              make: Callable[[slice], Params], x: torch.Tensor, y: torch.Tensor,
              buffers: Params | None, memory_mb: float | None, bn: BNPolicy, loss: str,
              path: str, precision: Precision = Precision.FLOAT32
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss (n_points,), acc (n_points,))``; ``make(sl, out)`` builds the points ``sl``
    (stacked, into the views ``out`` if it can), ``path`` (``mlp``, ``vmap``, ...) runs them."""
    loss_fn, dev, y = _check_loss(loss), y.device, check_labels(y)  # int64
    out_loss = torch.zeros(n_points, dtype=torch.float64, device=dev)
    out_acc = torch.zeros(n_points, dtype=torch.float64, device=dev)
    n = len(y)
    if n == 0:
        return out_loss.fill_(float("nan")), out_acc.fill_(float("nan"))
    if n_points == 0:
        return out_loss, out_acc
    x = x.to(dtype)
    version = x._version  # an in-place change of x (or of a view of it) bumps it
    size = torch.finfo(dtype).bits // 8
    mdt = next(model.parameters()).dtype  # activation_elements runs the module itself
    sample = x[:2].to(mdt, copy=True)  # a forward may change its input in place
    per = activation_elements(model, sample) * size  # bytes per (point, input)
    budget = memory_budget_mb(dev, memory_mb) * 2**20
    # batch statistics (asked for, or a BatchNorm without running ones) see all inputs
    whole = bn is BNPolicy.BATCH or batch_statistics(model)
    pts = n if whole else max(1, min(n, int(budget // (per + 1))))
    looped = path in ("loop", "loop_cl")
    if looped and not whole and cache_clamped(dev):
        # one layer's output per input chunk cache-sized, the chunks equal
        big = activation_elements(model, sample, largest=True) * size
        if big * pts > 2 * _LOOP_CACHE_BYTES:
            pts = min(pts, max(1, _LOOP_CACHE_BYTES // big))
            pts = -(-n // -(-n // pts))
    # a looped chunk keeps one point's activations alive; a vmapped one every point's
    act = per * pts * (0 if looped else 1)
    mem = max(1, min(n_points, int(budget // (act + 3 * n_params * size))))
    if looped:  # one point per call: a few built at a time are enough
        mem = min(mem, _LOOP_POINTS)
    if path == "mlp" and cache_clamped(dev):
        # keep one layer's activations cache-sized: bandwidth, not FLOPs, limits on a CPU
        width = max(m.out_features for m in model if isinstance(m, nn.Linear))
        mem = max(1, min(mem, _CACHE_BYTES // (pts * width * size)))
    work = homogeneous.Workspace(model, mem, pts, x) if path == "mlp" else None
    stale = any(b.is_floating_point() and b.dtype != dtype for b in model.buffers())
    if not buffers and (bn is BNPolicy.BATCH or stale):  # batch statistics must not update
        buffers = buffers_like(model, 1, dev, dtype) or None  # the module's; its dtype here
    with bn_mode(model, bn is BNPolicy.BATCH):
        with arithmetic(precision, dev):
            for i in range(0, n_points, mem):
                sl = slice(i, min(n_points, i + mem))
                p = make(sl, work.views(sl.stop - sl.start) if path == "mlp" else None)
                m = n_members(p)
                packed = work.pack(p) if path == "mlp" else None
                b = ({k: v.expand(m, *v.shape[1:]).clone() for k, v in one(buffers, 0).items()}
                     if buffers else None)
                for j in range(0, n, pts):
                    ps = slice(j, min(n, j + pts))
                    if path == "mlp":
                        logits = homogeneous.forward(model, packed, x[ps], work)
                    elif looped:
                        logits = _looped_logits(model, p, x[ps], b, path == "loop_cl")
                    else:
                        logits = stacked_forward(model, p, x[ps], b, path="vmap")
                    logits = logits.to(dtype)
                    if i == 0 and j == 0:  # below the logits' count (2 for one logit)
                        check_labels(y, logits.shape[-1])
                    if x._version != version:  # every later point would see other inputs
                        raise ConfigError("the model's forward changes its input in place "
                                          "(e.g. x.sub_(mean)), so x has changed: compute "
                                          "out of place (x = x - mean)")
                    out_loss[sl] += loss_fn(logits, y[ps]).sum(-1).double()
                    out_acc[sl] += (predict(logits) == y[ps]).sum(-1).double()
    return out_loss / n, out_acc / n


def _run(model: nn.Module, n_points: int, dtype: torch.dtype, make: Callable[[slice], Params],
         n_params: int, x: torch.Tensor, y: torch.Tensor, buffers: Params | None,
         memory_mb: float | None, bn: BNPolicy, loss: str, candidates: list[str],
         precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the path (probing the candidates on a few points, cached) and evaluate."""
    if buffers:  # running statistics in the points' dtype (a float32 run's, float64 points)
        buffers = {k: v.to(dtype) if v.is_floating_point() else v for k, v in buffers.items()}

    def evaluate(p: str, k: int = n_points, xs=x, ys=y):
        return _evaluate(model, k, n_params, dtype, make, xs, ys, buffers,
                         memory_mb, bn, loss, p, precision)

    # The probe: a chunk of points on a slice of the inputs per candidate. MLP points are
    # cheap and their batched path only shows its worth on many points at once; conv
    # points are dear, a few tell the per-point cost.
    cuda = y.device.type == "cuda"
    if "mlp" in candidates:
        q, nx = min(n_points, 256), min(len(y), 256)
    else:
        q, nx = min(n_points, 8 if cuda else 4), min(len(y), 512 if cuda else 32)
    if len(candidates) > 1 and q and nx:
        key = probe_key(model, make(slice(0, 1)), x[:nx], (bn.value, precision.value))
        path = choose_path(key, candidates, lambda p: lambda: evaluate(p, q, x[:nx], y[:nx]),
                           per=q, device=y.device, repeats=1)
    else:
        path = candidates[0]
    return evaluate(path)


def _check_points(center: Params, directions: Params, x: torch.Tensor, y: torch.Tensor,
                  what: str = "directions") -> int:
    """The common count ``K`` of ``directions`` ``{name: (K, ...)}``, after checking they
    cover exactly the centre's tensors with its shapes and that ``x`` and ``y`` pair up
    (``torch.addcmul`` and slicing would otherwise broadcast or truncate silently)."""
    check_single(center, "the centre")
    if set(directions) != set(center):
        raise ValueError(f"{what} must have one tensor per parameter of the centre; missing "
                         f"{sorted(set(center) - set(directions))}, unknown "
                         f"{sorted(set(directions) - set(center))}")
    k = next(iter(directions.values())).shape[0]
    for name, c in center.items():
        if tuple(directions[name].shape) != (k, *c.shape[1:]):
            raise ValueError(f"{what}[{name!r}] has shape {tuple(directions[name].shape)}, "
                             f"expected {(k, *c.shape[1:])} ({k} rows, as the first tensor)")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} inputs but y has {len(y)} labels")
    return k


def evaluate_points(model: nn.Module, center: Params, directions: Params, ts: torch.Tensor,
                    x: torch.Tensor, y: torch.Tensor, buffers: Params | None = None,
                    memory_mb: float | None = None, loss: str = "nll",
                    bn: BNPolicy | str = "eval", path: EnginePath | str = "auto",
                    starts: Params | None = None, precision: Precision | str = "float32"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and accuracy at ``theta + ts[k, j] * d_k`` for every direction k and distance j.

    ``center``: one model with a member dim of 1; ``directions``: ``(K, ...)``;
    ``ts``: ``(K,)`` (one distance per direction) or ``(K, T)``. Returns
    ``(loss, acc)`` in float64 with the shape of ``ts``. The points are formed
    in the centre's dtype, so float64 parameters give a float64 evaluation.
    ``path``: ``auto`` (the fastest by a cached timing probe, see
    :mod:`minefield.autotune`), or one of ``mlp``, ``vmap``, ``loop``, ``loop_cl``.
    ``memory_mb``: chunk budget, ``None`` for the device's default
    (:func:`~minefield.autotune.memory_budget_mb`). ``precision``: ``float32`` (the
    parameters' dtype), or the opt-in ``bf16`` / ``tf32`` (see :func:`precision_error`).
    ``starts`` ``(K, ...)``: lines from ``theta + s_k`` instead (hit-and-run chords).
    """
    bn = BNPolicy.of(bn)
    precision = option(Precision, precision, "precision")
    dtype = center[next(iter(center))].dtype
    k_dirs = _check_points(center, directions, x, y)
    check_buffers(model, buffers, 1, bn is BNPolicy.BATCH)
    if starts is not None and _check_points(center, starts, x, y, "starts") != k_dirs:
        raise ValueError(f"starts must have one row per direction ({k_dirs})")
    ts = torch.as_tensor(ts)
    if ts.dim() not in (1, 2) or ts.shape[0] != k_dirs:
        raise ValueError(f"ts must be (K,) or (K, T) with K = {k_dirs} directions, "
                         f"got shape {tuple(ts.shape)}")
    candidates = _candidates(model, buffers, path, x, center)
    dev = center[next(iter(center))].device
    t_flat = ts.reshape(-1).to(dtype=dtype, device=dev)
    k_idx = torch.arange(k_dirs, device=dev).repeat_interleave(
        1 if ts.dim() == 1 else ts.shape[1])

    c = {k: v.contiguous() for k, v in center.items()}
    d = {k: v.to(dtype).contiguous() for k, v in directions.items()}
    s0 = None if starts is None else {k: v.to(dtype).contiguous() for k, v in starts.items()}

    def make(sl: slice, out: Params | None = None) -> Params:
        t = t_flat[sl]
        # one distance per direction: the chunk's directions are a view, not a copy
        idx = sl if ts.dim() == 1 else k_idx[sl]
        base = c if s0 is None else {k: c[k] + s0[k][idx] for k in c}
        return {k: torch.addcmul(v, t.view(-1, *[1] * (v.dim() - 1)), d[k][idx],
                                 out=(out or {}).get(k)) for k, v in base.items()}

    n_params = sum(v[0].numel() for v in center.values())
    lo, ac = _run(model, t_flat.numel(), dtype, make, n_params, x, y, buffers, memory_mb, bn,
                  loss, candidates, precision)
    return lo.reshape(ts.shape), ac.reshape(ts.shape)


def evaluate_combinations(model: nn.Module, center: Params, basis: Params, coeffs: torch.Tensor,
                          x: torch.Tensor, y: torch.Tensor, buffers: Params | None = None,
                          memory_mb: float | None = None, loss: str = "nll",
                          bn: BNPolicy | str = "eval", path: EnginePath | str = "auto",
                          precision: Precision | str = "float32"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and accuracy at ``theta + sum_b coeffs[i, b] basis_b`` for every row i.

    ``basis``: ``(B, ...)`` (e.g. the two directions of a plane); ``coeffs``:
    ``(N_points, B)``. Returns ``(loss (N_points,), acc (N_points,))`` in float64.
    ``path``, ``memory_mb`` and ``precision`` as in :func:`evaluate_points`.
    """
    bn = BNPolicy.of(bn)
    precision = option(Precision, precision, "precision")
    dtype = center[next(iter(center))].dtype
    n_basis = _check_points(center, basis, x, y, "basis")
    check_buffers(model, buffers, 1, bn is BNPolicy.BATCH)
    candidates = _candidates(model, buffers, path, x, center)
    coeffs = torch.as_tensor(coeffs).to(dtype=dtype, device=center[next(iter(center))].device)
    if coeffs.dim() != 2 or coeffs.shape[1] != n_basis:
        raise ValueError(f"coeffs must be (N, {n_basis}), got shape {tuple(coeffs.shape)}")

    c = {k: v.contiguous() for k, v in center.items()}
    v = {k: b.to(dtype).contiguous() for k, b in basis.items()}

    def make(sl: slice, out: Params | None = None) -> Params:  # out: not used
        a = coeffs[sl]
        return {k: (c0.reshape(1, -1) + a @ v[k].reshape(n_basis, -1)).reshape(
            -1, *c0.shape[1:]) for k, c0 in c.items()}

    n_params = sum(t[0].numel() for t in center.values())
    return _run(model, coeffs.shape[0], dtype, make, n_params, x, y, buffers, memory_mb, bn,
                loss, candidates, precision)


def precision_error(model: nn.Module, center: Params, directions: Params, ts: torch.Tensor,
                    x: torch.Tensor, y: torch.Tensor, precision: Precision | str,
                    buffers: Params | None = None, bn: BNPolicy | str = "eval",
                    path: EnginePath | str = "auto") -> float:
    """Largest ``|L_precision - L_float32|`` over the points of :func:`evaluate_points`.

    The report that goes with the opt-in ``bf16`` / ``tf32`` evaluation: a radius
    found by bisection on a cutoff ``c`` moves by about ``error / |dL/dt|``, so an
    error well below ``c * rtol`` leaves radii inside the bisection tolerance.
    """
    ref = evaluate_points(model, center, directions, ts, x, y, buffers, bn=bn, path=path)[0]
    low = evaluate_points(model, center, directions, ts, x, y, buffers, bn=bn, path=path,
                          precision=precision)[0]
    return float((low - ref).abs().max())


@torch.no_grad()
def evaluate_points_loop(model: nn.Module, center: Params, directions: Params, ts: torch.Tensor,
                         x: torch.Tensor, y: torch.Tensor, buffers: Params | None = None,
                         loss: str = "nll", bn: BNPolicy | str = "eval"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's method, for reference: load each point into the module and run it.

    Same arguments and result as :func:`evaluate_points`, one forward pass per point.
    """
    loss_fn, bn = _check_loss(loss), BNPolicy.of(bn)
    _check_points(center, directions, x, y)
    check_buffers(model, buffers, 1, bn is BNPolicy.BATCH)
    ts = torch.as_tensor(ts)
    dtype = center[next(iter(center))].dtype
    net = copy.deepcopy(model).to(dtype=dtype, device=y.device)
    x = x.to(dtype)
    tt = ts.reshape(ts.shape[0], -1)
    out_loss = torch.zeros(tt.shape, dtype=torch.float64)
    out_acc = torch.zeros(tt.shape, dtype=torch.float64)
    fixed = member(buffers or {}, 0)
    with bn_mode(net, bn is BNPolicy.BATCH):  # net.train() would switch dropout on
        for k in range(tt.shape[0]):
            for j in range(tt.shape[1]):
                t = float(tt[k, j])
                state = {name: center[name][0] + t * directions[name][k].to(dtype)
                         for name in center}
                net.load_state_dict(state | fixed, strict=False)
                logits = net(x)
                out_loss[k, j] = float(loss_fn(logits, y).double().mean())
                out_acc[k, j] = float((predict(logits) == y).double().mean())
    return out_loss.reshape(ts.shape), out_acc.reshape(ts.shape)
