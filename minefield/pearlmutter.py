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
once and kept, so each product costs two batched matmuls (``torch.baddbmm`` over
the M members) per layer forward and four backward, and no autograd graph: on
the small networks of the paper that overhead, not the arithmetic, dominates.
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

from .functional import Params
from .loss import nll

__all__ = ["mlp_plan", "MLPHessian"]

_ACTS = (nn.ReLU, nn.LeakyReLU, nn.Tanh)


def mlp_plan(model: nn.Module) -> list[tuple[str, nn.Module | None]] | None:
    """``[(linear name, activation after it or None), ...]`` for an ``nn.Sequential`` of
    an optional leading ``Flatten``, ``Linear`` layers and at most one ReLU / leaky
    ReLU / Tanh (or ``Identity``) after each; ``None`` for anything else."""
    if not isinstance(model, nn.Sequential):
        return None
    plan: list[tuple[str, nn.Module | None]] = []
    for name, mod in model.named_children():
        if isinstance(mod, nn.Linear):
            plan.append((name, None))
        elif isinstance(mod, nn.Flatten) and not plan:
            continue
        elif isinstance(mod, nn.Identity) and plan:
            continue
        elif isinstance(mod, _ACTS) and plan and plan[-1][1] is None:
            plan[-1] = (plan[-1][0], mod)
        else:
            return None
    if not plan or plan[-1][1] is not None:  # the logits must be the last Linear's output
        return None
    return plan


def _derivatives(act: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor | None]:
    """``(phi(a), phi'(a), phi''(a) or None where it is zero a.e.)``."""
    if isinstance(act, nn.Tanh):
        h = a.tanh()
        d1 = 1 - h * h
        return h, d1, -2 * h * d1
    if isinstance(act, nn.LeakyReLU):
        slope = act.negative_slope
        d1 = (a > 0).to(a.dtype).mul_(1 - slope).add_(slope)
        return a * d1, d1, None
    pos = (a > 0).to(a.dtype)
    return a * pos, pos, None


def _loss_derivatives(z: torch.Tensor, y: torch.Tensor):
    """``(dl/dz, u -> (d^2 l/dz^2) u)`` of the per-sample NLL of logits ``(M, N, C)``."""
    if z.shape[-1] == 1:
        s = (1 - 2 * y.to(z.dtype)).view(1, -1, 1)
        sig = torch.sigmoid(s * z)
        curv = sig * (1 - sig)
        return s * sig, lambda u: curv * u
    p = torch.softmax(z, -1)
    g = p - torch.nn.functional.one_hot(y, z.shape[-1]).to(z.dtype)
    return g, lambda u: p * (u - (p * u).sum(-1, keepdim=True))


class MLPHessian:
    """``H v`` of ``L_m = weight * sum_chunks sum_i nll(f(x_i; theta_m), y_i)`` for every
    member m of a stacked plain MLP (weights ``(M, out, in)``), one call for all.

    Args:
        model: the architecture; :func:`mlp_plan` must accept it.
        params: ``{name: (M, ...)}``, any float dtype (the inputs are cast to it).
        chunks: ``[(x (N, ...), y (N,)), ...]`` pieces of the data.
        weight: the factor in front of the sum (``1 / N`` for the mean loss).

    ``losses`` holds the ``(M,)`` losses met on the way.

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
        dtype = self.w[0].dtype
        self.caches = []
        self.losses = torch.zeros(self.w[0].shape[0], dtype=dtype, device=self.w[0].device)
        with torch.no_grad():
            for x, y in chunks:
                self.caches.append(self._cache(plan, params, x.to(dtype).flatten(1), y, weight))

    def _cache(self, plan, params, x, y, weight):
        m = self.w[0].shape[0]
        h = x.expand(m, *x.shape)
        ins, d1s, d2s = [], [], []  # layer inputs h_{l-1}; phi', phi'' of each hidden layer
        for (wn, bn), (_, act) in zip(self.names, plan):
            w = params[wn]
            ins.append(h.contiguous())  # bmm would copy the expanded input at every product
            a = (torch.bmm(h, w.transpose(1, 2)) if bn is None
                 else torch.baddbmm(params[bn].unsqueeze(1), h, w.transpose(1, 2)))
            if act is None:
                h = a
                continue
            h, d1, d2 = _derivatives(act, a)
            d1s.append(d1)
            d2s.append(d2)
        self.losses += weight * nll(h, y).sum(-1)
        g, hz = _loss_derivatives(h, y)
        delta = weight * g
        deltas, curls = [delta], []  # delta_l from the last layer down; (delta W) phi''
        for i in range(len(self.w) - 1, 0, -1):
            back = torch.bmm(delta, self.w[i])
            curls.append(None if d2s[i - 1] is None else back * d2s[i - 1])
            delta = back * d1s[i - 1]
            deltas.append(delta)
        deltas_t = [d.transpose(1, 2).contiguous() for d in deltas[::-1]]
        return ins, d1s, deltas[::-1], deltas_t, curls[::-1], lambda u: weight * hz(u)

    @torch.no_grad()
    def matvec(self, v: Params) -> Params:
        """``{name: (M, ...)}`` -> ``{name: (M, ...)}``: member m's Hessian times ``v[m]``."""
        out: Params = {}
        for ins, d1s, deltas, deltas_t, curls, hz in self.caches:
            ras, rhs, rh = [], [], None  # R{a_l}, R{h_{l-1}}
            for i, (wn, bn) in enumerate(self.names):
                rhs.append(rh)
                vt = v[wn].transpose(1, 2)
                ra = (torch.bmm(ins[i], vt) if bn is None
                      else torch.baddbmm(v[bn].unsqueeze(1), ins[i], vt))
                if rh is not None:
                    ra.baddbmm_(rh, self.w[i].transpose(1, 2))
                ras.append(ra)
                if i < len(d1s):
                    rh = ra * d1s[i]
            rdelta = hz(ras[-1])
            for i in range(len(self.w) - 1, -1, -1):
                wn, bn = self.names[i]
                gw = torch.bmm(rdelta.transpose(1, 2), ins[i])
                if rhs[i] is not None:
                    gw.baddbmm_(deltas_t[i], rhs[i])
                _add(out, wn, gw)
                if bn is not None:
                    _add(out, bn, rdelta.sum(1))
                if i:
                    back = torch.bmm(rdelta, self.w[i]).baddbmm_(deltas[i], v[wn])
                    rdelta = back * d1s[i - 1]
                    if curls[i - 1] is not None:
                        rdelta.addcmul_(curls[i - 1], ras[i - 1])
        return {k: out[k] for k in v}


def _add(out: Params, name: str, t: torch.Tensor) -> None:
    out[name] = out[name] + t if name in out else t
