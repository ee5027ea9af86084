"""Optimizers over stacked parameters with a learning rate per member.

A stack holds M models in tensors ``(M, ...)`` (see :mod:`minefield.functional`).
SGD, Adam and RMSprop act elementwise, so one optimizer over the stacked tensors
is M independent optimizers, except for the learning rate, which torch.optim
keeps as one number per parameter group. :class:`StackedOptimizer` takes the
learning rate at each step as a float or an ``(M,)`` tensor ``lr_m``, broadcast
over member m's slice of every tensor:

- ``sgd``: ``b <- mu b + g`` (``b = g`` at the first step), ``theta <- theta - lr_m b``;
- ``adam`` (Kingma & Ba 2015): ``m <- beta1 m + (1 - beta1) g``,
  ``v <- beta2 v + (1 - beta2) g^2``,
  ``theta <- theta - lr_m / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``;
- ``rmsprop`` (Keras' defaults rho 0.9, eps 1e-7, as in the paper's code):
  ``v <- alpha v + (1 - alpha) g^2``, ``theta <- theta - lr_m g / (sqrt(v) + eps)``.

The operations are torch.optim's ``foreach`` implementations, op for op, and the
state keeps torch's names (``momentum_buffer``, ``step``, ``exp_avg``,
``exp_avg_sq``, ``square_avg``): when every member has the same learning rate the
step *is* torch's (bit-identical on CPU), and state dicts load either way. With
different learning rates only the last operation (``theta -= lr * direction``)
takes the ``(M,)`` tensor. Per-member L2 lives in the objective
(:class:`minefield.step.Hyper`), not here.

Example::

    >>> w = torch.ones(3, 2, requires_grad=True)          # 3 members, 2 weights each
    >>> opt = StackedOptimizer([w], "sgd", lr=0.1, momentum=0.0)
    >>> w.grad = torch.ones(3, 2)
    >>> opt.step(lr=torch.tensor([0.1, 0.2, 0.5]))
    >>> w.detach()[:, 0]
    tensor([0.9000, 0.8000, 0.5000])
"""

from __future__ import annotations

import torch

from .options import Optimizer, option

__all__ = ["StackedOptimizer"]

# Keras' RMSprop defaults, as in the paper's minefield code; torch's Adam defaults.
_DEFAULTS = {Optimizer.SGD: {"momentum": 0.9},
             Optimizer.ADAM: {"betas": (0.9, 0.999), "eps": 1e-8},
             Optimizer.RMSPROP: {"alpha": 0.9, "eps": 1e-7}}


def _uniform(lr: float | torch.Tensor) -> float | torch.Tensor:
    """A float, or the ``(M,)`` tensor when its members differ (float64 for exact ratios)."""
    if not torch.is_tensor(lr):
        return float(lr)
    lr = lr.detach().to("cpu", torch.float64).reshape(-1)
    return float(lr[0]) if bool((lr == lr[0]).all()) else lr


def _per_member(values: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """``(M,)`` float64 values as ``(M, 1, ...)`` views in each tensor's dtype and device."""
    return [values.to(t.device, t.dtype).view(-1, *[1] * (t.dim() - 1)) for t in like]


class StackedOptimizer(torch.optim.Optimizer):
    """SGD with momentum, Adam or RMSprop over stacked tensors, one learning rate per member.

    Args:
        params: the stacked leaves ``(M, ...)``, all with the same M.
        kind: ``sgd``, ``adam`` or ``rmsprop`` (:class:`~minefield.options.Optimizer`).
        lr: the learning rate used when :meth:`step` is given none (torch's
            ``param_groups[0]["lr"]``, which drivers may set each step).
        **hyper: ``momentum`` (sgd), ``betas``/``eps`` (adam), ``alpha``/``eps``
            (rmsprop); defaults above.

    Raises:
        ValueError: an unknown ``kind`` or hyper-parameter name.
    """

    def __init__(self, params, kind: Optimizer | str, lr: float, **hyper):
        self.kind = option(Optimizer, kind, "optimizer")
        unknown = sorted(set(hyper) - set(_DEFAULTS[self.kind]))
        if unknown:
            raise ValueError(f"{self.kind.value} takes no {', '.join(unknown)}")
        super().__init__(params, {"lr": lr, **_DEFAULTS[self.kind], **hyper})

    @torch.no_grad()
    def step(self, closure=None, lr: float | torch.Tensor | None = None) -> None:
        """One update of every member with its gradient ``.grad``.

        ``lr``: a float (every member) or an ``(M,)`` tensor; ``None`` uses the
        group's ``lr``. ``closure`` is not supported (two-pass rules such as SAM
        live in :mod:`minefield.step`).
        """
        if closure is not None:
            raise ValueError("StackedOptimizer.step takes no closure")
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            rate = _uniform(group["lr"] if lr is None else lr)
            if torch.is_tensor(rate) and any(p.shape[0] != len(rate) for p in ps):
                raise ValueError(f"{len(rate)} learning rates for a stack of "
                                 f"{ps[0].shape[0]} members")
            grads = [p.grad for p in ps]
            if self.kind is Optimizer.SGD:
                self._sgd(ps, grads, group, rate)
            elif self.kind is Optimizer.ADAM:
                self._adam(ps, grads, group, rate)
            else:
                self._rmsprop(ps, grads, group, rate)

    def _steps(self, ps: list[torch.Tensor], **zeros: bool) -> list[torch.Tensor]:
        for p in ps:
            st = self.state[p]
            if not st:
                st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                for name in zeros:
                    st[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        steps = [self.state[p]["step"] for p in ps]
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
        return steps

    def _sgd(self, ps, grads, group, rate) -> None:
        mu = group["momentum"]
        direction = grads
        if mu != 0:
            bufs = [self.state[p].get("momentum_buffer") for p in ps]
            if all(b is not None for b in bufs):
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, grads, alpha=1.0)
            else:
                for i, p in enumerate(ps):
                    if bufs[i] is None:
                        bufs[i] = self.state[p]["momentum_buffer"] = grads[i].detach().clone()
                    else:
                        bufs[i].mul_(mu).add_(grads[i], alpha=1.0)
            direction = bufs
        if isinstance(rate, float):
            torch._foreach_add_(ps, direction, alpha=-rate)
        else:
            torch._foreach_addcmul_(ps, direction, _per_member(-rate, ps))

    def _adam(self, ps, grads, group, rate) -> None:
        beta1, beta2 = group["betas"]
        steps = self._steps(ps, exp_avg=True, exp_avg_sq=True)
        m1 = [self.state[p]["exp_avg"] for p in ps]
        m2 = [self.state[p]["exp_avg_sq"] for p in ps]
        torch._foreach_lerp_(m1, grads, 1 - beta1)
        torch._foreach_mul_(m2, beta2)
        torch._foreach_addcmul_(m2, grads, grads, 1 - beta2)
        counts = torch.stack(steps).tolist()  # one read, not one .item() per tensor
        bc1 = [1 - beta1 ** s for s in counts]
        bc2_sqrt = [(1 - beta2 ** s) ** 0.5 for s in counts]
        denom = torch._foreach_sqrt(m2)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, group["eps"])
        if isinstance(rate, float):
            torch._foreach_addcdiv_(ps, m1, denom, [(rate / b) * -1 for b in bc1])
        else:
            size = [(rate / b) * -1 for b in bc1]  # (M,) float64 per tensor
            step = [m * s for m, s in zip(m1, _per_member_each(size, ps))]
            torch._foreach_div_(step, denom)
            torch._foreach_add_(ps, step)

    def _rmsprop(self, ps, grads, group, rate) -> None:
        alpha = group["alpha"]
        self._steps(ps, square_avg=True)
        sq = [self.state[p]["square_avg"] for p in ps]
        torch._foreach_mul_(sq, alpha)
        torch._foreach_addcmul_(sq, grads, grads, value=1 - alpha)
        avg = torch._foreach_sqrt(sq)
        torch._foreach_add_(avg, group["eps"])
        if isinstance(rate, float):
            torch._foreach_addcdiv_(ps, grads, avg, value=-rate)
        else:
            step = torch._foreach_mul(grads, _per_member(-rate, ps))
            torch._foreach_div_(step, avg)
            torch._foreach_add_(ps, step)


def _per_member_each(values: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [_per_member(v, [t])[0] for v, t in zip(values, like)]


def _scalar_dtype() -> torch.dtype:
    # torch.optim's choice for its step counters
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
