"""Sharpness of a minimum: how much the loss rises when the weights move a little.

For the loss ``L`` of each member of a stack (an :class:`~minefield.hvp.Objective`):

- **worst case** (Keskar et al. 2017; the SAM bound of Foret et al. 2021):
  ``S = max_{||delta||_p <= rho} L(w + T delta) - L(w)`` with ``p`` = 2 or inf,
  ``T = I``; found by projected gradient ascent (normalised steps for L2, sign
  steps for L-inf, Madry et al. 2018) from ``restarts`` random starts, all
  members x restarts as one stack; the largest value seen is reported, a lower
  bound of the true maximum. For a quadratic ``L = w^T A w / 2`` at its
  minimum the L2 value is ``rho^2 lambda_max / 2``.
- **adaptive** (ASAM, Kwon et al. 2021): the same with ``T = diag(|w| + eta)``, so
  the ball scales with each weight and the measure is invariant to ReLU rescaling
  at ``eta = 0`` (nearly so for small ``eta``: ``eta`` does not rescale).
- **average case** (expected sharpness, Neyshabur et al. 2017):
  ``E_{z ~ N(0, I)} L(w + sigma T z) - L(w)``; antithetic pairs ``+-z`` cancel the
  first-order term; evaluated by the batched engine; ``~ sigma^2 tr(T H T) / 2``.
- **m-sharpness** (Foret et al. 2021; Andriushchenko & Flammarion 2022): the worst
  case on each of ``N / m`` disjoint random data subsets of size ``m``, averaged.
- **PAC-Bayes sigma'** (Jiang et al. 2020, "Fantastic generalization measures",
  Sec. 5.1): the largest ``sigma`` with ``E L(w + sigma T z) - L(w) <= bound``,
  by bisection over ``log sigma`` with the same probes at every ``sigma``.
  Flatter minima have *larger* sigma'; Jiang et al.'s measure is ``1 / sigma'^2``.

``rho`` and ``sigma`` are in parameter units (``T = I``) or fractions of
``|w| + eta`` (adaptive). Losses are in nats. Example::

    >>> import torch
    >>> from minefield.hvp import Objective
    >>> a = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    >>> obj = Objective.from_function({"w": torch.zeros(1, 2, dtype=torch.float64)},
    ...                               lambda p: p["w"] @ a @ p["w"] / 2)
    >>> worst_case_sharpness(obj, rho=0.1, steps=20).value   # rho^2 * 4 / 2
    tensor([0.0200], dtype=torch.float64)
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from .config import ConfigError
from .hvp import Objective
from .options import integers, option
from .stacked import flatten, one, unflatten

__all__ = ["Norm", "SharpnessEstimate", "worst_case_sharpness", "average_sharpness",
           "m_sharpness", "pac_bayes_sigma"]

#: How many times :func:`pac_bayes_sigma` may double ``hi`` (halve ``lo``) to bracket sigma'.
WIDEN = 64


class Norm(str, enum.Enum):
    L2 = "l2"
    LINF = "linf"


@dataclass
class SharpnessEstimate:
    """A measure per member: ``value`` ``(M,)`` and its standard error (NaN when the
    value is a maximum found by search rather than a mean). A search also gives
    ``spread`` ``(M,)``: the best minus the worst of the per-restart maxima, 0 when
    every restart reached the same value; a large spread says that restarts end at
    different local maxima, so more of them may find a higher one (``None``: not a
    search)."""

    value: torch.Tensor
    stderr: torch.Tensor
    spread: torch.Tensor | None = None


def _positive(name: str, v: float) -> None:
    if not (v > 0 and math.isfinite(v)):
        raise ConfigError(f"{name} must be a finite number > 0, got {v}")


def _check_eta(eta: float) -> None:
    if not (eta >= 0 and math.isfinite(eta)):
        raise ConfigError(f"eta must be a finite number >= 0, got {eta}")


def _scale(w: torch.Tensor, adaptive: bool, eta: float) -> torch.Tensor:
    return w.abs() + eta if adaptive else torch.ones_like(w)


def _project(delta: torch.Tensor, rho: float, norm: Norm) -> torch.Tensor:
    if norm is Norm.LINF:
        return delta.clamp(-rho, rho)
    n = delta.norm(dim=1, keepdim=True)
    return delta * (rho / n.clamp(min=rho))


def worst_case_sharpness(obj: Objective, rho: float, norm: Norm | str = "l2",
                         adaptive: bool = False, steps: int = 10, restarts: int = 8,
                         step_size: float = 1.0, eta: float = 0.01, seed: int = 0
                         ) -> SharpnessEstimate:
    """``max_{||delta||_p <= rho} L(w + T delta) - L(w)`` per member, by projected ascent.

    ``steps`` gradient steps of length ``step_size * rho`` (L2: along the normalised
    gradient; L-inf: its sign) from ``restarts`` random starts on the sphere (L2)
    or in the box (L-inf), every member and restart as one stack. ``adaptive``
    uses ASAM's ``T = |w| + eta``. The value is the best loss seen (``w`` itself
    included: never below 0, which ascent started off a local maximum had reported as
    -0.043), a lower bound of the maximum; ``spread`` (see :class:`SharpnessEstimate`)
    shows how far apart the restarts ended. Ascent stops at local maxima (sign ascent in
    the box at corners):
    on a 33-parameter swiss-roll MLP, 2 restarts found 0.027 nats in the L-inf box of
    ``rho = 0.01`` and 0.27 in ASAM's ball of 0.05, where 8 (and 64) found 0.083 and
    0.78; hence 8 restarts by default (members x restarts are one stack).

    Raises:
        ConfigError: rho <= 0 or not finite, steps < 1, restarts < 1 (or not integers),
            eta < 0 or not finite, or an unknown norm.
    """
    integers(steps=steps, restarts=restarts, seed=seed)  # 2.5 had failed deep in torch
    _positive("rho", rho)
    _positive("step_size", step_size)
    _check_eta(eta)
    if steps < 1 or restarts < 1:
        raise ConfigError(f"steps and restarts must be >= 1, got {steps} and {restarts}")
    try:
        norm = option(Norm, norm, "norm")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    base = obj.check_finite().double()
    w = flatten(obj.params).repeat_interleave(restarts, 0)  # (M R, n)
    t = _scale(w, adaptive, eta)
    # Every member starts from the same R draws, so a member's result does not depend
    # on the stack it sits in.
    g = torch.Generator().manual_seed(int(seed))
    shape = (restarts, w.shape[1])
    z = (torch.randn(shape, generator=g, dtype=torch.float64) if norm is Norm.L2
         else 2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1)
    z = z.to(w).repeat(obj.n_members, 1)  # (M R, n)
    delta = rho * z / z.norm(dim=1, keepdim=True) if norm is Norm.L2 else rho * z
    best = torch.full((w.shape[0],), -math.inf, dtype=torch.float64)
    for i in range(steps + 1):
        loss, grads = obj.value_and_grad(unflatten(w + t * delta, obj.params), restarts)
        best = torch.maximum(best, loss.detach().double().cpu())
        if i == steps:
            break
        gd = t * flatten(grads)
        step = (gd.sign() if norm is Norm.LINF
                else gd / gd.norm(dim=1, keepdim=True).clamp(min=1e-30))
        delta = _project(delta + step_size * rho * step, rho, norm)
    m = obj.n_members
    per_restart = best.view(m, restarts)  # (M, R) each restart's maximum
    value = (per_restart.amax(1) - base.cpu()).clamp(min=0)  # delta = 0 is in the ball
    return SharpnessEstimate(value, torch.full((m,), math.nan, dtype=torch.float64),
                             per_restart.amax(1) - per_restart.amin(1))


def _probes(obj: Objective, n_samples: int, seed: int, adaptive: bool, eta: float, i: int):
    """Antithetic directions ``(2K, ...)`` ``[T z_1..T z_K, -T z_1..]`` for member ``i``,
    each parameter's written in place into its own contiguous tensor, which the engine
    then takes as it is (a cast copy of ``z``, ``T z``, ``-T z``, their concatenation and
    the engine's contiguous copies made 5-6 times the probes' size: 3.3 GB for a
    1.1M-parameter model, hunt 47)."""
    g = torch.Generator().manual_seed(int(seed))
    w = flatten(one(obj.params, i))  # (1, n)
    z = torch.randn(n_samples, w.shape[1], generator=g, dtype=torch.float64)  # (K, n)
    scale = _scale(w, adaptive, eta) if adaptive else None
    out, j = {}, 0
    for k, v in obj.params.items():
        n = v[0].numel()
        t = torch.empty(2 * n_samples, *v.shape[1:], dtype=w.dtype, device=w.device)
        d = t[:n_samples]
        d.copy_(z[:, j:j + n].view(d.shape))  # rounded to the parameters' dtype first
        if scale is not None:
            d.mul_(scale[:, j:j + n].view(1, *v.shape[1:]))
        torch.neg(d, out=t[n_samples:])
        out[k], j = t, j + n
    return out


def _pair_means(losses: torch.Tensor, k: int) -> torch.Tensor:
    return (losses[:k] + losses[k:]) / 2  # (K,) one iid sample per antithetic pair


def average_sharpness(obj: Objective, sigma: float, n_samples: int = 64,
                      adaptive: bool = False, eta: float = 0.01, seed: int = 0
                      ) -> SharpnessEstimate:
    """``E_z L(w + sigma T z) - L(w)``, ``z ~ N(0, I)``, per member, with its standard
    error over ``n_samples`` antithetic pairs (``2 n_samples`` engine evaluations).

    Raises:
        ConfigError: sigma <= 0 or not finite, eta < 0 or not finite, or n_samples < 2
            (or not an integer).
    """
    integers(n_samples=n_samples, seed=seed)
    _positive("sigma", sigma)
    _check_eta(eta)
    if n_samples < 2:
        raise ConfigError(f"n_samples must be >= 2, got {n_samples}")
    base = obj.check_finite().double().cpu()
    vals, errs = [], []
    for i in range(obj.n_members):
        d = _probes(obj, n_samples, seed, adaptive, eta, i)
        ts = torch.full((2 * n_samples,), float(sigma), dtype=torch.float64)
        inc = _pair_means(obj.perturbed_losses(i, d, ts).double().cpu(), n_samples) - base[i]
        vals.append(inc.mean())
        errs.append(inc.std() / math.sqrt(n_samples))
    return SharpnessEstimate(torch.stack(vals), torch.stack(errs))


def m_sharpness(obj: Objective, rho: float, m: int, n_subsets: int | None = None,
                seed: int = 0, **worst) -> SharpnessEstimate:
    """Worst-case sharpness averaged over disjoint random data subsets of size ``m``
    (``floor(N / m)`` of them, or the first ``n_subsets``); ``worst`` goes to
    :func:`worst_case_sharpness`. The standard error is over subsets.

    Raises:
        ConfigError: m < 1 or larger than the data, n_subsets < 1 (either not an
            integer), or an objective without data.
    """
    integers(m=m, seed=seed, **({} if n_subsets is None else {"n_subsets": n_subsets}))
    if obj.data is None:
        raise ConfigError("m-sharpness needs a model objective with data")
    n = len(obj.data[1])
    if not 1 <= m <= n:
        raise ConfigError(f"m must be in [1, {n}] (the number of training points), got {m}")
    if n_subsets is not None and n_subsets < 1:  # no subset: nothing to average
        raise ConfigError(f"n_subsets must be >= 1 (None: all of them), got {n_subsets}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    count = n // m if n_subsets is None else min(n // m, n_subsets)
    vals = torch.stack([worst_case_sharpness(obj.restrict(perm[j * m:(j + 1) * m]), rho,
                                             seed=seed, **worst).value for j in range(count)])
    # one column at a time: a strided reduction over the stack rounds by its width
    se = (torch.stack([vals[:, i].contiguous().std() for i in range(vals.shape[1])])
          / math.sqrt(count) if count > 1 else torch.full_like(vals[0], math.nan))
    return SharpnessEstimate(vals.mean(0), se)


def pac_bayes_sigma(obj: Objective, bound: float = 0.1, n_samples: int = 64,
                    adaptive: bool = False, eta: float = 0.01, lo: float = 1e-5,
                    hi: float = 1.0, rtol: float = 1e-2, seed: int = 0) -> torch.Tensor:
    """Jiang et al.'s ``sigma'`` per member ``(M,)``: the largest ``sigma`` with a mean
    loss increase ``<= bound`` over ``n_samples`` antithetic Gaussian pairs (the same
    pairs at every sigma, so the estimate is a smooth function of sigma), bisected in
    ``log sigma`` until ``hi/lo <= 1 + rtol``. ``[lo, hi]`` is the first bracket: when
    even ``hi`` stays under the bound it is doubled (``lo`` halved when ``lo`` does not),
    at most :data:`WIDEN` times, so a flat member is not reported at ``hi``; ``inf``
    (``0``) if the bound is never crossed.

    Raises:
        ConfigError: bound <= 0, ``not 0 < lo < hi`` (finite), rtol <= 0, eta < 0 (or any
            of them not finite), n_samples < 1 (or not an integer), or a NaN loss at a
            perturbation.
    """
    integers(n_samples=n_samples, seed=seed)
    _positive("bound", bound)
    _positive("rtol", rtol)
    _check_eta(eta)
    _positive("hi", hi)
    if not 0 < lo < hi:
        raise ConfigError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
    if n_samples < 1:  # a mean of none is NaN, which read as "above the bound": sigma' = lo
        raise ConfigError(f"n_samples must be >= 1, got {n_samples}")
    base = obj.check_finite().double().cpu()
    out = []
    for i in range(obj.n_members):
        d = _probes(obj, n_samples, seed, adaptive, eta, i)

        seen: dict[float, float] = {}

        def dev(s: float, i=i, d=d, seen=seen) -> float:
            if s not in seen:
                ts = torch.full((2 * n_samples,), s, dtype=torch.float64)
                seen[s] = float(obj.perturbed_losses(i, d, ts).double().cpu().mean() - base[i])
                if math.isnan(seen[s]):
                    raise ConfigError(f"member {i}'s loss is NaN at sigma = {s:g}: no sigma' "
                                      f"can be read off it")
            return seen[s]

        a, b = lo, hi
        for _ in range(WIDEN):  # widen until [a, b] brackets sigma': dev(a) <= bound < dev(b)
            if dev(b) <= bound:
                a, b = b, 2 * b
            elif dev(a) > bound:
                a, b = a / 2, a
            else:
                break
        if dev(b) <= bound or dev(a) > bound:  # never crossed: flat (or a jump at w) for good
            out.append(math.inf if dev(b) <= bound else 0.0)
            continue
        while b / a > 1 + rtol:
            mid = math.sqrt(a * b)
            a, b = (mid, b) if dev(mid) <= bound else (a, mid)
        out.append(a)
    return torch.tensor(out, dtype=torch.float64)
