"""Exact Hessian-vector products of stacked plain MLPs by Pearlmutter's R-operator.

For ``a_l = h_{l-1} W_l^T + b_l``, ``h_l = phi(a_l)`` and the NLL of the logits
``z = a_L``, the directional derivative ``R{.} = d/dt (.)(theta + t v)|_{t=0}``
(Pearlmutter 1994, "Fast exact multiplication by the Hessian") of the backward
pass ``delta_L = dL/dz``, ``g_{W_l} = delta_l^T h_{l-1}``,
``delta_{l-1} = (delta_l W_l) * phi'(a_{l-1})`` gives ``H v`` exactly:

- forward: ``R{a_l} = h_{l-1} V_l^T + v_{b_l} + R{h_{l-1}} W_l^T``,
  ``R{h_l} = phi'(a_l) R{a_l}``;
- at the loss: ``R{delta_L} = (d^2 l / dz^2) R{z}`` (``sigma (1 - sigma) R{z}`` for a
  sigmoid output, ``p * R{z} - p (p . R{z})`` for a softmax);
- backward: ``(H v)_{W_l} = R{delta_l}^T h_{l-1} + delta_l^T R{h_{l-1}}``,
  ``(H v)_{b_l} = sum_i R{delta_l}``,
  ``R{delta_{l-1}} = (R{delta_l} W_l + delta_l V_l) phi'(a_{l-1})
  + (delta_l W_l) phi''(a_{l-1}) R{a_{l-1}}``.

The forward activations, ``phi'``, ``delta`` and ``(delta W) phi''`` are computed
once and kept, so each product costs two batched matmuls (``torch.bmm`` over the
M members) per layer forward and four backward, and no autograd graph: on the
small networks of the paper that overhead, not the arithmetic, dominates.
Activations are kept feature-major, ``(M, width, N)``: the long data axis is
then the one the matmul kernels vectorise over, and every product writes into
buffers allocated once (fresh large tensors cost page faults on every call).
Piecewise-linear activations (ReLU, leaky ReLU) have ``phi'' = 0`` almost
everywhere, as autograd assumes too.

Example (agrees with autograd's double backward)::

    >>> import torch
    >>> from minefield import ModelConfig, build_model
    >>> from minefield.train import init_stack
    >>> model = build_model(ModelConfig(widths=(8,), activation="tanh"), (2,), 3).double()
    >>> p = {k: v.double() for k, v in init_stack(model, "glorot_uniform", [0, 1]).items()}
    >>> x, y = torch.randn(20, 2, dtype=torch.float64), torch.randint(0, 3, (20,))
    >>> hv = MLPHessian(model, p, [(x, y)], 1 / 20).matvec({k: torch.ones_like(t)
    ...                                                     for k, t in p.items()})
    >>> hv["0.weight"].shape
    torch.Size([2, 8, 2])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .functional import mlp_fast_path
from .loss import nll
from .stacked import Params

__all__ = ["mlp_plan", "MLPHessian", "CPU_PROBE_ELEMENTS", "GPU_PROBE_BYTES"]

#: Working set (elements) one batched pass of probes may take on the CPU: ~ the L2/L3
#: caches a product runs in, measured (see ``MLPHessian.probes_per_pass``).
CPU_PROBE_ELEMENTS = 2**21
#: Working set (bytes) one batched pass of probes may take on a GPU.
GPU_PROBE_BYTES = 2**30

_ACTS = (nn.ReLU, nn.LeakyReLU, nn.Tanh)


def mlp_plan(model: nn.Module) -> list[tuple[str, nn.Module | None]] | None:
    """``[(linear name, activation after it or None), ...]`` for an ``nn.Sequential`` of
    an optional leading ``Flatten``, ``Linear`` layers and at most one ReLU / leaky
    ReLU / Tanh (or ``Identity``) after each; ``None`` for anything else."""
    if type(model) is not nn.Sequential or not mlp_fast_path(model):  # exact classes only
        return None
    plan: list[tuple[str, nn.Module | None]] = []
    for name, mod in model._modules.items():  # a reused activation at each place
        if type(mod) is nn.Linear:
            plan.append((name, None))
        elif type(mod) is nn.Flatten and not plan:
            continue
        elif type(mod) is nn.Identity and plan:
            continue
        elif type(mod) in _ACTS and plan and plan[-1][1] is None:
            plan[-1] = (plan[-1][0], mod)
        else:
            return None
    if not plan or plan[-1][1] is not None:  # the logits must be the last Linear's output
        return None
    return plan


def _derivatives(act: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor | None]:
    """``(phi(a), phi'(a), phi''(a) or None where it is zero a.e.)``; ``act=None`` (a
    hidden ``Linear`` followed by none, or by ``Identity``) is the identity, ``phi' = 1``."""
    if act is None:
        return a, torch.ones_like(a), None
    if type(act) is nn.Tanh:
        h = a.tanh()
        d1 = 1 - h * h
        return h, d1, -2 * h * d1
    if type(act) is nn.LeakyReLU:
        slope = act.negative_slope
        d1 = (a > 0).to(a.dtype).mul_(1 - slope).add_(slope)
        return a * d1, d1, None
    pos = (a > 0).to(a.dtype)
    return a * pos, pos, None


def _loss_derivatives(z: torch.Tensor, y: torch.Tensor):
    """``(dl/dz, u -> (d^2 l/dz^2) u in place)`` of the per-sample NLL of feature-major
    logits ``(M, C, N)``."""
    def probes(t, u):  # ``u`` (M, K, C, N) holds K probes per member
        return t if u.dim() == 3 else t.unsqueeze(1)

    if z.shape[1] == 1:
        s = (1 - 2 * y.to(z.dtype)).view(1, 1, -1)
        sig = torch.sigmoid(s * z)
        curv = sig * (1 - sig)
        return s * sig, lambda u: u.mul_(probes(curv, u))
    p = torch.softmax(z, 1)
    g = p - torch.nn.functional.one_hot(y, z.shape[1]).to(z.dtype).T
    return g, lambda u: u.sub_((probes(p, u) * u).sum(-2, keepdim=True)).mul_(probes(p, u))


def _transposed(out_features: int, in_features: int) -> bool:
    """Whether a layer's weight-gradient product (``(M, out, N) x (M, N, in)``, the data
    axis contracted) runs faster as its transpose ``(M, in, out)``. MKL's small
    matrix kernels are fastest when the output's contiguous (last) dimension has the
    larger power-of-two factor: on the swiss-roll MLP's (16, 23) and (32, 26) layers
    the transposed product took 58% and 73% of the time (1 thread, AMD EPYC)."""
    def twos(n: int) -> int:
        return (n & -n).bit_length()

    return twos(out_features) > twos(in_features)


class MLPHessian:
    """``H v`` of ``L_m = weight * sum_chunks sum_i nll(f(x_i; theta_m), y_i)`` for every
    member m of a stacked plain MLP (weights ``(M, out, in)``), one call for all.

    Args:
        model: the architecture; :func:`mlp_plan` must accept it.
        params: ``{name: (M, ...)}``, any float dtype (the inputs are cast to it).
        chunks: ``[(x (N, ...), y (N,)), ...]`` pieces of the data.
        weight: the factor in front of the sum (``1 / N`` for the mean loss).

    ``losses`` holds the ``(M,)`` losses met on the way. :meth:`matvec_flat` works
    on flat ``(M, n)`` vectors in the order of ``params``, :meth:`matvec` on dicts.

    Raises:
        ValueError: ``model`` is not a plain MLP :func:`mlp_plan` accepts.
    """

    def __init__(self, model: nn.Module, params: Params,
                 chunks: Sequence[tuple[torch.Tensor, torch.Tensor]], weight: float):
        plan = mlp_plan(model)
        if plan is None:
            raise ValueError("MLPHessian needs an nn.Sequential of Linear layers, each "
                             "followed by at most one ReLU, leaky ReLU or Tanh")
        self.names = [(f"{n}.weight", f"{n}.bias" if f"{n}.bias" in params else None)
                      for n, _ in plan]
        self.w = [params[wn] for wn, _ in self.names]
        self.m, self.weight = self.w[0].shape[0], weight
        self.flip = [_transposed(*w.shape[1:]) for w in self.w]
        self.shapes = {k: v.shape[1:] for k, v in params.items()}  # flat order: dict order
        self.offsets, o = {}, 0
        for k, shape in self.shapes.items():
            self.offsets[k] = o
            o += shape.numel()
        self.n = o
        dtype = self.w[0].dtype
        self.losses = torch.zeros(self.m, dtype=dtype, device=self.w[0].device)
        with torch.no_grad():
            self.caches = [self._cache(plan, params, x.to(dtype).flatten(1), y)
                           for x, y in chunks]
        # A probe's working set in a pass: R{a}, R{h}, R{delta} of every layer (3 out x N
        # per member) and the copy of each weight the batched products make (out x in).
        n_max = max(len(y) for _, y in chunks)
        per_probe = self.m * sum(3 * w.shape[1] * n_max + w.shape[1] * w.shape[2]
                                 for w in self.w)
        #: probes :meth:`matmat_flat` takes per pass. On the CPU as many as
        #: ``CPU_PROBE_ELEMENTS`` of working set hold, if that is at least 8, else 1 (one
        #: product at a time): batched probes save per-call overhead but widen the
        #: working set. On the swiss-roll MLP (widths 32, 32, 16; 1 thread, AMD EPYC, 32
        #: products) they took 0.39x the time of one at a time for M = 1, N = 200
        #: (K = 32), 0.6x for M = 4 (K = 16), 0.78x for N = 2000 (K = 8), but 1.2-1.8x
        #: for M = 32 or N = 20000; on wide layers (9 x 100 at N = 2000, 2 x 512 at
        #: N = 200) 1.2-1.6x at K = 32. On a GPU, where each product is launch-bound,
        #: as many as ``GPU_PROBE_BYTES`` hold (not measured).
        if self.w[0].device.type == "cpu":
            k = CPU_PROBE_ELEMENTS // per_probe
            self.probes_per_pass = k if k >= 8 else 1
        else:
            self.probes_per_pass = int(GPU_PROBE_BYTES // (per_probe * dtype.itemsize))

    def _cache(self, plan, params, x, y):
        xt = x.T.contiguous()  # (in, N): the first layer's input, shared by every member
        h = xt
        ins, d1s, d2s = [xt], [], []  # layer inputs h_{l-1} (M, in, N); phi', phi''
        for i, ((wn, bn), (_, act)) in enumerate(zip(self.names, plan)):
            a = self._linear(params[wn], params[bn] if bn else None, h, i)
            if i == len(plan) - 1:  # the logits
                h = a
                continue
            # every hidden layer keeps its phi': Linear, Linear (or Identity between) had
            # left d1s a layer short, an IndexError in every product of such a model
            h, d1, d2 = _derivatives(act, a)
            ins.append(h)
            d1s.append(d1)
            d2s.append(d2)
        self.losses += self.weight * nll(h.transpose(1, 2), y).sum(-1)
        g, hz = _loss_derivatives(h, y)
        delta = self.weight * g
        deltas, curls = [delta], []  # delta_l from the last layer down; (delta W) phi''
        for i in range(len(self.w) - 1, 0, -1):
            back = torch.bmm(self.w[i].transpose(1, 2), delta)
            curls.append(None if d2s[i - 1] is None else back * d2s[i - 1])
            delta = back * d1s[i - 1]
            deltas.append(delta)
        n = xt.shape[1]
        new = xt.new_empty
        # R{a_l} is kept only where the backward pass reads it (the logits, phi'' != 0);
        # elsewhere one scratch buffer serves every layer, and the back-propagated
        # R{delta} alternates between two: a smaller working set stays in cache
        widest = max(max(w.shape[1:]) for w in self.w)
        scratch = [new(self.m * widest * n) for _ in range(3)]

        def view(flat, rows):
            return flat[:self.m * rows * n].view(self.m, rows, n)

        work = ([new(self.m, w.shape[1], n) if i == len(self.w) - 1 or d2s[i] is not None
                 else view(scratch[2], w.shape[1]) for i, w in enumerate(self.w)],  # R{a_l}
                [new(self.m, w.shape[1], n) for w in self.w[:-1]],  # R{h_l}
                [view(scratch[i % 2], w.shape[2]) for i, w in enumerate(self.w)],  # R{delta}
                [new(self.m, *(w.shape[:0:-1] if f else w.shape[1:]))  # weight gradients
                 for w, f in zip(self.w, self.flip)])
        return ins, d1s, deltas[::-1], curls[::-1], lambda u: hz(u).mul_(self.weight), work

    def _linear(self, w, b, h, i, out=None):
        """``w h + b`` for ``(M, out, in)`` weights; layer 0's ``h`` ``(in, N)`` is shared,
        so its product is one plain matmul for all members."""
        m, o = w.shape[:2]
        if i == 0:
            w2 = w.reshape(m * o, -1)
            o2 = None if out is None else out.view(m * o, -1)
            if b is None:
                return torch.mm(w2, h, out=o2).view(m, o, -1)
            return torch.addmm(b.reshape(m * o, 1), w2, h, out=o2).view(m, o, -1)
        if b is None:
            return torch.bmm(w, h, out=out)
        return torch.baddbmm(b.unsqueeze(2), w, h, out=out)

    def _view(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        o = self.offsets[name]
        shape = self.shapes[name]
        return flat[:, o:o + shape.numel()].view(self.m, *shape)

    @torch.no_grad()
    def matvec_flat(self, v: torch.Tensor) -> torch.Tensor:
        """``(M, n) -> (M, n)``: member m's Hessian times ``v[m]`` (flat, ``params`` order)."""
        v = v if v.stride(-1) == 1 else v.contiguous()  # member slices must be views
        out = v.new_zeros(self.m, self.n)
        last = len(self.w) - 1
        for ins, d1s, deltas, curls, hz, (ras, rhs, backs, grads) in self.caches:
            for i, (wn, bn) in enumerate(self.names):
                ra = self._linear(self._view(v, wn), self._view(v, bn) if bn else None, ins[i],
                                  i, ras[i])
                if i:
                    ra.baddbmm_(self.w[i], rhs[i - 1])
                if i < last:
                    torch.mul(ra, d1s[i], out=rhs[i])
            rdelta = hz(ras[-1])  # overwrites R{z}, not needed any more
            for i in range(last, -1, -1):
                wn, bn = self.names[i]
                vw = self._view(v, wn)
                self._weight_product(self._view(out, wn), rdelta, deltas[i], ins[i],
                                     rhs[i - 1] if i else None, grads[i], self.flip[i])
                if bn is not None:
                    self._view(out, bn).add_(rdelta.sum(2))
                if i:  # R{delta_{i-1}} = (W^T R{delta} + V^T delta) phi' (+ curvature term)
                    back = backs[i]
                    if rdelta.shape[1] == 1:  # one output: outer products, elementwise
                        torch.mul(self.w[i].transpose(1, 2), rdelta, out=back)
                        back.addcmul_(vw.transpose(1, 2), deltas[i])
                    else:
                        torch.bmm(self.w[i].transpose(1, 2), rdelta, out=back)
                        back.baddbmm_(vw.transpose(1, 2), deltas[i])
                    rdelta = back.mul_(d1s[i - 1])
                    if curls[i - 1] is not None:
                        rdelta.addcmul_(curls[i - 1], ras[i - 1])
        return out

    @torch.no_grad()
    def matmat_flat(self, v: torch.Tensor) -> torch.Tensor:
        """``(M, K, n) -> (M, K, n)``: K products per member in one pass. The tangents are
        ``(M, K, width, N)``; each product with a cached ``(M, width, N)`` quantity is one
        ``bmm`` over the members with the K probes stacked as rows (no copy of the
        cache), each product with the weights a ``bmm`` over ``M K``. The same
        arithmetic as K :meth:`matvec_flat` calls, for K times the tangents' memory."""
        v = v if v.stride(-1) == 1 else v.contiguous()  # parameter slices must be views
        m, k = v.shape[:2]
        out = v.new_zeros(m, k, self.n)

        def view(flat, name):
            o, shape = self.offsets[name], self.shapes[name]
            return flat[:, :, o:o + shape.numel()].view(m, k, *shape)

        def rows(a, b):  # (M, K, r, c) x (M, c, N) -> (M, K, r, N): the probes as rows
            return torch.matmul(a.reshape(m, -1, a.shape[-1]), b).view(m, k, a.shape[2], -1)

        last = len(self.w) - 1
        for ins, d1s, deltas, curls, hz, _ in self.caches:
            ras, rhs = [], []  # R{a_l}, R{h_l}: (M, K, width, N)
            for i, (wn, bn) in enumerate(self.names):
                ra = rows(view(v, wn), ins[i])  # layer 0's (in, N) input broadcasts
                if bn is not None:
                    ra += view(v, bn).unsqueeze(3)
                if i:
                    ra += torch.matmul(self.w[i].unsqueeze(1), rhs[i - 1])
                ras.append(ra)
                if i < last:
                    rhs.append(ra * d1s[i].unsqueeze(1))
            rdelta = hz(ras[-1])
            for i in range(last, -1, -1):
                wn, bn = self.names[i]
                gw = view(out, wn)
                gw += rows(rdelta, ins[i].transpose(-1, -2))  # R{delta} h^T
                if i:  # + delta R{h}^T, as (R{h} delta^T)^T
                    gw += rows(rhs[i - 1], deltas[i].transpose(1, 2)).transpose(2, 3)
                if bn is not None:
                    view(out, bn).add_(rdelta.sum(3))
                if i:
                    back = torch.matmul(self.w[i].transpose(1, 2).unsqueeze(1), rdelta)
                    back += rows(view(v, wn).transpose(2, 3), deltas[i])
                    rdelta = back.mul_(d1s[i - 1].unsqueeze(1))
                    if curls[i - 1] is not None:
                        rdelta.addcmul_(curls[i - 1].unsqueeze(1), ras[i - 1])
        return out

    @staticmethod
    def _weight_product(gw, rdelta, delta, h, rh, buf, flip):
        """``gw += R{delta} h^T + delta R{h}^T`` (``R{h} = 0`` for the input layer), each
        a product over the data axis, into a contiguous buffer (``bmm`` into a view of
        ``out`` loops over the members) in the orientation :func:`_transposed` picks."""
        if rh is None:  # layer 0: its input is shared, one plain matmul for all members
            gw.add_(torch.mm(rdelta.reshape(-1, rdelta.shape[2]), h.T).view_as(gw))
        elif not flip:
            gw.add_(torch.bmm(rdelta, h.transpose(1, 2), out=buf).baddbmm_(
                delta, rh.transpose(1, 2)))
        else:  # (M, in, out)
            gw.add_(torch.bmm(h, rdelta.transpose(1, 2), out=buf).baddbmm_(
                rh, delta.transpose(1, 2)).transpose(1, 2))

    def matvec(self, v: Params) -> Params:
        """``{name: (M, ...)}`` -> ``{name: (M, ...)}``: member m's Hessian times ``v[m]``."""
        flat = torch.cat([v[k].reshape(self.m, -1) for k in self.shapes], 1)
        hv = self.matvec_flat(flat)
        return {k: self._view(hv, k) for k in self.shapes}
