"""Exact Hessian-vector products of conv/BatchNorm networks by the R-operator on the traced graph.

Pearlmutter's R-operator (Pearlmutter 1994, "Fast exact multiplication by the
Hessian"), ``R{.} = d/dt (.)(theta + t v)|_{t=0}``, applied to the forward and
backward passes of any network :func:`graph_plan` can read (``torch.fx``:
convolutions, linear layers, BatchNorm with running statistics, ReLU / leaky ReLU
/ Tanh, and parameter-free linear maps: sums, pooling by averages, zero padding,
means, flattening). Per layer with input ``x``, adjoint ``delta = dL/dy`` and
direction ``V`` of its weight ``W``:

- convolution or linear map ``y = x * W``: ``R{y} = Rx * W + x * V``;
  ``R{delta_x} = dgrad(R{delta}, W) + dgrad(delta, V)``;
  ``(H v)_W = wgrad(R{delta}, x) + wgrad(delta, Rx)``;
- BatchNorm in eval mode ``y = gamma xhat + beta``, ``xhat = (x - mu) s``,
  ``s = (var + eps)^(-1/2)``: ``R{y} = gamma s Rx + v_gamma xhat + v_beta``;
  ``R{delta_x} = gamma s R{delta} + v_gamma s delta``;
  ``(H v)_gamma = sum(R{delta} xhat + delta s Rx)``, ``(H v)_beta = sum(R{delta})``;
- activation ``y = phi(x)``: ``R{y} = phi' Rx``,
  ``R{delta_x} = phi' R{delta} + phi'' delta Rx``;
- a parameter-free linear map ``A``: ``R{y} = A Rx``, ``R{delta_x} = A^T R{delta}``;
- the NLL of the logits: ``R{delta_z} = (d^2 l / dz^2) R{z}``.

The forward values, ``phi'``, and every adjoint ``delta`` are computed once (one
autograd backward) and kept, so a product is one forward and one backward pass
of the tangents, with no autograd graph: per convolution two forward
convolutions, two transposed ones (input gradients) and two weight gradients,
all in channels-last layout (oneDNN's native one in float32, 1.6x faster than
NCHW on ResNet-20; the transposes of means and paddings are brought back to it),
elementwise results into buffers allocated on the first product. Members of a
stack are looped over.

Example (agrees with autograd's double backward)::

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
    ...                     nn.Linear(8, 3)).double().eval()
    >>> p = {k: v.detach()[None] for k, v in net.named_parameters()}
    >>> b = {k: v.detach()[None] for k, v in net.named_buffers()}
    >>> x, y = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    >>> hv = GraphHessian(net, p, b, [(x, y)], 1 / 5).matvec({k: torch.ones_like(t)
    ...                                                       for k, t in p.items()})
    >>> hv["0.weight"].shape
    torch.Size([1, 2, 1, 3, 3])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import vjp

from .graph_trace import _Step, graph_plan
from .loss import nll
from .stacked import Params, flatten, unflatten

__all__ = ["graph_plan", "GraphHessian"]


def _channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel ``(C,)`` vector shaped to broadcast over ``like`` ``(N, C, ...)``."""
    return t.view(1, -1, *[1] * (like.dim() - 2))


def _act(step: _Step, a: torch.Tensor):
    """``(phi(a), phi'(a), phi''(a) or None where it is zero a.e.)``."""
    if step.act == "tanh":
        h = a.tanh()
        d1 = 1 - h * h
        return h, d1, -2 * h * d1
    d1 = (a > 0).to(a.dtype)
    if step.act == "leaky_relu":
        d1.mul_(1 - step.slope).add_(step.slope)
    return a * d1, d1, None


def _loss_derivatives(z: torch.Tensor, y: torch.Tensor):
    """``(dl/dz, u -> (d^2 l/dz^2) u)`` of the per-sample NLL of logits ``(N, C)``."""
    if z.shape[1] == 1:
        s = (1 - 2 * y.to(z.dtype)).view(-1, 1)
        sig = torch.sigmoid(s * z)
        curv = sig * (1 - sig)
        return s * sig, lambda u: curv * u
    p = torch.softmax(z, 1)
    return (p - F.one_hot(y, z.shape[1]).to(z.dtype),
            lambda u: p * (u - (p * u).sum(1, keepdim=True)))


class _Tape:
    """One member's forward values, ``phi'``, adjoints and map transposes on one chunk."""

    def __init__(self):
        self.value: dict[str, torch.Tensor] = {}
        self.delta: dict[str, torch.Tensor] = {}
        self.extra: dict[str, object] = {}


class GraphHessian:
    """``H v`` of ``L_m = weight * sum_chunks sum_i nll(f(x_i; theta_m), y_i)`` for every
    member m of a stacked network :func:`graph_plan` reads, BatchNorm with the running
    statistics ``buffers`` (eval mode).

    Args:
        model: the architecture.
        params: ``{name: (M, ...)}``, any float dtype (the inputs are cast to it).
        buffers: ``{name: (M, ...)}`` running statistics (``{}`` without BatchNorm).
        chunks: ``[(x (N, ...), y (N,)), ...]`` pieces of the data.
        weight: the factor in front of the sum (``1 / N`` for the mean loss).

    ``losses`` holds the ``(M,)`` losses met on the way.

    Raises:
        ValueError: :func:`graph_plan` cannot read ``model``.
    """

    def __init__(self, model: nn.Module, params: Params, buffers: Params,
                 chunks: Sequence[tuple[torch.Tensor, torch.Tensor]], weight: float):
        steps = graph_plan(model)
        if steps is None:
            raise ValueError("GraphHessian needs a torch.fx-traceable network of convolutions, "
                             "linear layers, BatchNorm, ReLU / leaky ReLU / Tanh and linear "
                             "parameter-free maps")
        self.steps, self.weight = steps, weight
        self._live_set = {s.name for s in steps if s.live}
        self.params, self.buffers = params, buffers
        self.m = next(iter(params.values())).shape[0]
        first = next(iter(params.values()))
        dtype = first.dtype
        self.losses = torch.zeros(self.m, dtype=dtype, device=first.device)
        self.tapes = [[self._record(i, x.to(dtype), y) for x, y in chunks] for i in range(self.m)]

    # --- the primal pass, recorded once --------------------------------------------------
    def _record(self, i: int, x: torch.Tensor, y: torch.Tensor) -> _Tape:
        tape = _Tape()
        val = tape.value
        if x.dim() == 4:  # oneDNN's convolutions run NHWC without reordering every call
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.enable_grad():
            leaves = {k: v[i].detach().requires_grad_(True) for k, v in self.params.items()}
            for step in self.steps:
                if step.kind == "input":
                    val[step.name] = x
                elif step.kind == "output":
                    z = val[step.inputs[0]]
                else:
                    val[step.name] = self._forward(step, tape, leaves, i, val)
            loss = self.weight * nll(z, y).sum()
            keep = [s.name for s in self.steps if s.live and s.kind not in ("output",)]
            deltas = torch.autograd.grad(loss, [val[k] for k in keep], allow_unused=True)
        self.losses[i] += loss.detach()
        tape.delta = {k: (torch.zeros_like(val[k]) if d is None else _layout_of(d, val[k]))
                      for k, d in zip(keep, deltas)}
        tape.value = {k: v.detach() for k, v in val.items()}
        _, hz = _loss_derivatives(tape.value[self.steps[-1].inputs[0]], y)
        tape.extra["loss"] = lambda u: self.weight * hz(u)
        return tape

    def _forward(self, step: _Step, tape: _Tape, leaves: Params, i: int,
                 val: dict[str, torch.Tensor]) -> torch.Tensor:
        node, mod = step.node, step.module
        if step.kind in ("conv", "linear", "bn"):
            x = val[step.inputs[0]]
            w = leaves.get(f"{node.target}.weight")
            b = leaves.get(f"{node.target}.bias")
            if step.kind == "conv":
                return F.conv2d(x, w, b, mod.stride, mod.padding, mod.dilation, mod.groups)
            if step.kind == "linear":
                return F.linear(x, w, b)
            mean = self.buffers[f"{node.target}.running_mean"][i].to(x.dtype)
            var = self.buffers[f"{node.target}.running_var"][i].to(x.dtype)
            s = (var + mod.eps).rsqrt()
            xhat = (x.detach() - _channel(mean, x)) * _channel(s, x)
            tape.extra[step.name] = (s, xhat)
            return F.batch_norm(x, mean, var, w, b, False, 0.0, mod.eps)
        if step.kind == "act":
            h, d1, d2 = _act(step, val[step.inputs[0]].detach())
            tape.extra[step.name] = (d1, d2)
            a = val[step.inputs[0]]
            return a * d1 if step.act != "tanh" else a.tanh()
        # a parameter-free linear map: keep its transpose (one vjp) for the backward
        fn, tensors = self._map(step, val)
        out, back = vjp(fn, *[t.detach() for t in tensors])
        tape.extra[step.name] = (fn, back)
        return fn(*tensors)

    def _map(self, step: _Step, env: dict[str, torch.Tensor]):
        """``(f, tensor inputs)``: the map as a function of its tensor inputs, the other
        arguments fixed."""
        node = step.node
        names = step.inputs

        def sub(a, ts):
            return ts[names.index(a.name)] if isinstance(a, fx.Node) else a

        def fn(*ts):
            args = fx.node.map_aggregate(node.args, lambda a: sub(a, ts))
            kwargs = fx.node.map_aggregate(node.kwargs, lambda a: sub(a, ts))
            if node.op == "call_module":
                return step.module(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)

        return fn, [env[n] for n in names]

    # --- one product -----------------------------------------------------------------------
    @torch.no_grad()
    def matvec(self, v: Params) -> Params:
        """``{name: (M, ...)}`` -> ``{name: (M, ...)}``: member m's Hessian times ``v[m]``."""
        out = {k: torch.zeros_like(t) for k, t in self.params.items()}
        for i, tapes in enumerate(self.tapes):
            vi = {k: t[i] for k, t in v.items()}
            hv = {k: t[i] for k, t in out.items()}  # views: accumulate in place
            for tape in tapes:
                self._product(tape, vi, hv, i)
        return out

    def matvec_flat(self, v: torch.Tensor) -> torch.Tensor:
        """``(M, n) -> (M, n)`` on flat vectors in the order of ``params``."""
        return flatten(self.matvec(unflatten(v, self.params)))

    def _product(self, tape: _Tape, v: Params, hv: Params, i: int) -> None:
        val, delta, extra = tape.value, tape.delta, tape.extra
        r: dict[str, torch.Tensor | None] = {}
        for step in self.steps:  # R-forward
            if step.kind == "input":
                r[step.name] = None
            elif step.kind == "output":
                z = step.inputs[0]
            else:
                r[step.name] = self._r_forward(step, val, r, v, extra, i)
        rd: dict[str, torch.Tensor] = {z: extra["loss"](r[z])}
        for step in reversed(self.steps):  # R-backward
            if step.kind in ("input", "output") or step.name not in rd:
                continue
            self._r_backward(step, rd.pop(step.name), val, r, delta, v, hv, extra, rd, i)

    def _r_forward(self, step, val, r, v, extra, i):
        node, mod = step.node, step.module
        if step.kind in ("conv", "linear"):
            x, rx = val[step.inputs[0]], r[step.inputs[0]]
            vw, vb = v[f"{node.target}.weight"], v.get(f"{node.target}.bias")
            w = self.params[f"{node.target}.weight"][i]
            if step.kind == "conv":
                args = (mod.stride, mod.padding, mod.dilation, False, [0, 0], mod.groups)
                out = _conv(x, vw, vb, args)
                if rx is not None:
                    out += _conv(rx, w, None, args)
                return out
            out = F.linear(x, vw, vb)
            return out if rx is None else out.addmm_(rx, w.T) if out.dim() == 2 else \
                out + F.linear(rx, w)
        if step.kind == "bn":
            rx = r[step.inputs[0]]
            s, xhat = extra[step.name]
            vw, vb = v.get(f"{node.target}.weight"), v.get(f"{node.target}.bias")
            out = _buffer(extra, step.name, 0, xhat)
            if vw is not None:
                torch.mul(xhat, _channel(vw, xhat), out=out)
            else:
                out.zero_()
            if vb is not None:
                out += _channel(vb, xhat)
            if rx is not None:
                gamma = self.params.get(f"{node.target}.weight")
                scale = s if gamma is None else s * gamma[i]
                out.addcmul_(rx, _channel(scale, rx))
            return out
        rins = [r[n] for n in step.inputs]
        if all(t is None for t in rins):
            return None
        if step.kind == "act":
            return torch.mul(rins[0], extra[step.name][0],
                             out=_buffer(extra, step.name, 0, rins[0]))
        fn, _ = extra[step.name]
        return fn(*[torch.zeros_like(val[n]) if t is None else t
                    for n, t in zip(step.inputs, rins)])

    def _r_backward(self, step, rdy, val, r, delta, v, hv, extra, rd, i):
        node, mod = step.node, step.module
        src = step.inputs[0] if step.inputs else None
        need_in = src is not None and self._live(src)
        if step.kind in ("conv", "linear"):
            x, rx, dy = val[src], r[src], delta[step.name]
            wn, bname = f"{node.target}.weight", f"{node.target}.bias"
            w, vw = self.params[wn][i], v[wn]
            if step.kind == "conv":
                # dgrad and wgrad in separate calls: one call for both is several times
                # slower on oneDNN when two such calls follow each other
                args = (None, mod.stride, mod.padding, mod.dilation, False, [0, 0], mod.groups)
                hv[wn] += _conv_back(rdy, x, w, args, weight=True)
                if rx is not None:
                    hv[wn] += _conv_back(dy, rx, vw, args, weight=True)
                if need_in:
                    gi = _dgrad(rdy, w, mod, x)
                    gi += _dgrad(dy, vw, mod, x)
                if bname in hv:
                    hv[bname] += rdy.sum((0, 2, 3))
            else:
                x2, rdy2, dy2 = x.reshape(-1, x.shape[-1]), rdy.reshape(-1, rdy.shape[-1]), \
                    dy.reshape(-1, dy.shape[-1])
                hv[wn].addmm_(rdy2.T, x2)
                if rx is not None:
                    hv[wn].addmm_(dy2.T, rx.reshape(-1, rx.shape[-1]))
                if bname in hv:
                    hv[bname] += rdy2.sum(0)
                gi = (rdy @ w).add_(dy @ vw) if need_in else None
            if need_in:
                _accumulate(rd, src, gi)
            return
        if step.kind == "bn":
            s, xhat = extra[step.name]
            rx, dy = r[src], delta[step.name]
            wn, bname = f"{node.target}.weight", f"{node.target}.bias"
            dims = [0, *range(2, rdy.dim())]
            if wn in hv:
                tmp = _buffer(extra, step.name, 1, rdy)
                hv[wn] += torch.mul(rdy, xhat, out=tmp).sum(dims)
                if rx is not None:
                    hv[wn] += torch.mul(dy, rx, out=tmp).sum(dims) * s
            if bname in hv:
                hv[bname] += rdy.sum(dims)
            if need_in:
                gamma = self.params.get(wn)
                scale = s if gamma is None else s * gamma[i]
                gi = torch.mul(rdy, _channel(scale, rdy), out=_buffer(extra, step.name, 2, rdy))
                if wn in v:
                    gi.addcmul_(dy, _channel(v[wn] * s, dy))
                _accumulate(rd, src, gi)
            return
        if step.kind == "act":
            if not need_in:
                return
            d1, d2 = extra[step.name]
            gi = torch.mul(rdy, d1, out=_buffer(extra, step.name, 1, rdy))
            if d2 is not None and r[src] is not None:
                gi.addcmul_(d2 * delta[step.name], r[src])
            _accumulate(rd, src, gi)
            return
        _, back = extra[step.name]
        for name, g in zip(step.inputs, back(rdy)):
            if self._live(name):
                _accumulate(rd, name, _layout_of(g, val[name]))

    def _live(self, name: str) -> bool:
        return self._live_set.__contains__(name)


def _buffer(extra: dict, name: str, slot: int, like: torch.Tensor) -> torch.Tensor:
    """A work buffer shaped (and strided) as ``like``, allocated on the first product and
    reused by every later one: fresh large tensors cost page faults on each call."""
    key = (name, slot)
    buf = extra.get(key)
    if buf is None or buf.shape != like.shape:
        buf = extra[key] = torch.empty_like(like)
    return buf


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
          args: tuple) -> torch.Tensor:
    # a fresh output, not ``convolution.out`` into a kept buffer: oneDNN computes into its
    # own tensor and ``.out`` adds a copy (about 8% of a ResNet-20 product); glibc serves
    # the fresh tensor from memory freed by the previous product, without page faults
    return torch.ops.aten.convolution(x, w, b, *args)


def _dgrad(g: torch.Tensor, w: torch.Tensor, mod: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input gradient of a convolution as the transposed convolution."""
    pad = [x.shape[2 + j] - ((g.shape[2 + j] - 1) * mod.stride[j] - 2 * mod.padding[j]
                             + mod.dilation[j] * (w.shape[2 + j] - 1) + 1) for j in range(2)]
    return torch.ops.aten.convolution(g, w, None, mod.stride, mod.padding, mod.dilation,
                                      True, pad, mod.groups)


def _conv_back(grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, args: tuple,
               weight: bool = False) -> torch.Tensor:
    """The input gradient (``weight=False``) or the weight gradient of a convolution."""
    out = torch.ops.aten.convolution_backward(grad_out, x, w, *args, [not weight, weight, False])
    return out[1] if weight else out[0]


def _layout_of(g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``g`` in ``ref``'s channels-last layout: the transpose of a map (the broadcast
    of a mean, a slice of a padding) comes out in another layout, and every later
    convolution would reorder it (several times slower on oneDNN)."""
    if (g.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last)
            and not g.is_contiguous(memory_format=torch.channels_last)):
        return g.contiguous(memory_format=torch.channels_last)
    return g


def _accumulate(rd: dict[str, torch.Tensor], name: str, g: torch.Tensor) -> None:
    if name in rd:
        rd[name] = rd[name] + g
    else:
        rd[name] = g
