"""Bodies of known volume: the oracles that volume estimators are measured against.

Every body is the sub-cutoff region ``{x : L(x) < cutoff}`` of a loss ``L`` on
``R^n`` around the origin, with a closed-form natural log-volume:

- :class:`Ellipsoid` (``L = 1/2 |diag(1/a) R^T x|^2``, cutoff 1/2): semi-axes
  ``a_i`` along the columns of the orthogonal ``R`` (identity when ``None``),
  ``log V = log omega_n + sum_i log a_i``, ``omega_n = pi^(n/2) / Gamma(n/2 + 1)``.
  A unit ball is ``Ellipsoid(torch.ones(n))``.
- :class:`Box` (``L = max_i |x_i| / a_i``, cutoff 1): ``log V = sum_i log(2 a_i)``.
  Its Hessian is zero inside, so curvature says nothing about its shape.
- :class:`LpBall` (``L = |x / a|_p``, cutoff 1): the shapes in between.

Bodies are *line-loss functions* (see :mod:`minefield.volume`): called as
``body(x0, v, t)`` with starts ``x0`` ``(K, n)`` (or ``None``: the origin), unit
directions ``v`` ``(K, n)`` and distances ``t`` ``(K,)`` or ``(K, T)``, they
return ``L(x0_k + t_kj v_k)`` in the shape of ``t``. ``body.loss(x)`` is the
loss at points ``(..., n)`` (differentiable, for Hessians), and
``body.gaussian_log_mass(sigma)`` the log-mass under ``N(0, sigma^2 I)`` where it
has a closed form.

Example::

    >>> body = Ellipsoid(torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> round(math.exp(body.log_volume), 6)    # pi * 1 * 2
    6.283185
    >>> body(None, torch.eye(2, dtype=torch.float64), torch.tensor([1.0, 2.0]))
    tensor([0.5000, 0.5000], dtype=torch.float64)
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Ellipsoid", "Box", "LpBall", "QuadraticNet", "log_ball_volume", "log_spaced_axes",
           "random_rotation"]


def log_ball_volume(n: int, radius: float = 1.0) -> float:
    """``log(omega_n r^n)``, the natural log-volume of an n-ball of radius ``r``."""
    return 0.5 * n * math.log(math.pi) - math.lgamma(0.5 * n + 1) + n * math.log(radius)


def log_spaced_axes(n: int, decades: float, top: float = 1.0) -> torch.Tensor:
    """``n`` semi-axes log-spaced from ``top * 10^-decades`` to ``top`` (float64)."""
    return top * torch.logspace(-decades, 0.0, n, dtype=torch.float64)


def random_rotation(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal ``(n, n)`` matrix (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _points(x0: torch.Tensor | None, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.to(v)
    p = (t[..., None] * v[:, None, :]) if t.dim() == 2 else t[:, None] * v
    if x0 is not None:
        p = p + (x0[:, None, :] if t.dim() == 2 else x0)
    return p


class Ellipsoid:
    """``{x : |diag(1/a) R^T x| < 1}``: the cutoff-1/2 region of ``L = 1/2 |diag(1/a) R^T x|^2``."""

    cutoff = 0.5

    def __init__(self, semi_axes: torch.Tensor, rotation: torch.Tensor | None = None):
        self.a = semi_axes.double()
        self.n = len(self.a)
        self.rotation = None if rotation is None else rotation.double()
        self._cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def log_volume(self) -> float:
        return log_ball_volume(self.n) + float(self.a.log().sum())

    def gaussian_log_mass(self, sigma: float) -> float:
        """``log P(x in ball)``, ``x ~ N(0, sigma^2 I)``, for a ball (all semi-axes equal)."""
        from .volume import log_chi_cdf

        if not bool((self.a == self.a[0]).all()):
            raise ValueError("the Gaussian mass has a closed form only for a ball")
        return float(log_chi_cdf(self.a[0] / sigma, self.n))

    def curvature(self) -> torch.Tensor:
        """The Hessian ``R diag(1/a^2) R^T`` (dense) or its diagonal when axis-aligned."""
        d = self.a.pow(-2)
        return d if self.rotation is None else (self.rotation * d) @ self.rotation.T

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.rotation is None else x @ self.rotation
        return y / self.a

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self._scaled(x).pow(2).sum(-1)

    def __call__(self, x0: torch.Tensor | None, v: torch.Tensor, t: torch.Tensor
                 ) -> torch.Tensor:
        # L(x0 + t v) = 1/2 |y0 + t yv|^2 with y = diag(1/a) R^T x: one matmul per set of
        # lines (cached: bisection calls again with the same v), then a quadratic in t.
        # The key holds v, a and R themselves (their memory is not reused by another
        # tensor) with their versions: a semi-axis changed in place or reassigned after a
        # first call is seen (y0 read the new axes, yv the old: a mixed, wrong loss).
        key = tuple((u, u._version) for u in (v, self.a, self.rotation) if u is not None)
        if self._cache is None or len(key) != len(self._cache[0]) or any(
                u is not w or i != j for (u, i), (w, j) in zip(key, self._cache[0])):
            self._cache = (key, self._scaled(v.double()))
        yv = self._cache[1]
        t = t.double()
        tt = t if t.dim() == 2 else t[:, None]
        q = yv.pow(2).sum(-1, keepdim=True) * tt.pow(2)
        if x0 is not None:
            y0 = self._scaled(x0.double())
            q = q + 2 * tt * (y0 * yv).sum(-1, keepdim=True) + y0.pow(2).sum(-1, keepdim=True)
        return (0.5 * q).reshape(t.shape)


class LpBall:
    """``{x : |x / a|_p < 1}``: the cutoff-1 region of ``L = |x / a|_p`` (p >= 1 or inf),
    ``log V = sum_i log(2 a_i Gamma(1 + 1/p)) - log Gamma(1 + n/p)``: between an
    ellipsoid (p = 2) and a box (p = inf)."""

    cutoff = 1.0

    def __init__(self, half_widths: torch.Tensor, p: float):
        self.a, self.p = half_widths.double(), float(p)
        self.n = len(self.a)

    @property
    def log_volume(self) -> float:
        if math.isinf(self.p):
            return float(torch.log(2 * self.a).sum())
        return (float(torch.log(2 * self.a).sum()) + self.n * math.lgamma(1 + 1 / self.p)
                - math.lgamma(1 + self.n / self.p))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x / self.a, self.p, dim=-1)

    def __call__(self, x0: torch.Tensor | None, v: torch.Tensor, t: torch.Tensor
                 ) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=torch.float64)
        step = max(1, 2**22 // (self.n * (t.shape[1] if t.dim() == 2 else 1)))
        for i in range(0, len(v), step):  # (chunk, T, n) points stay a few MB
            sl = slice(i, i + step)
            out[sl] = self.loss(_points(None if x0 is None else x0[sl].double(),
                                        v[sl].double(), t[sl].double()))
        return out


class Box(LpBall):
    """``{x : max_i |x_i| / a_i < 1}``: the cutoff-1 region of ``L = max_i |x_i| / a_i``."""

    def __init__(self, half_widths: torch.Tensor):
        super().__init__(half_widths, math.inf)

    def gaussian_log_mass(self, sigma: float) -> float:
        """``log P(x in box)``, ``x ~ N(0, sigma^2 I)``: ``sum_i log erf(a_i / (sigma sqrt 2))``."""
        return float(torch.log(torch.erf(self.a / (sigma * math.sqrt(2)))).sum())

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return (x / self.a).abs().amax(-1)


class QuadraticNet(nn.Module):
    """A user-written network whose basin is a known ellipsoid: the network-path oracle.

    One weight ``theta`` ``(1, n)``; on any input the logits are ``(q, 0)`` with
    ``q = 1/2 theta^T A theta``, so the NLL of label 1 is ``softplus(q)``. With the
    cutoff :attr:`cutoff` ``= softplus(1/2)`` the basin around ``theta = 0`` is
    ``{theta^T A theta < 1}``: the ellipsoid with semi-axes ``lambda_i(A)^-1/2``
    (:meth:`body`). Train on ``x = zeros(1, 1)``, ``y = ones(1)``; use directions of
    kind ``gaussian`` (the weight is 0, so filter units are undefined).
    """

    cutoff = math.log1p(math.exp(0.5))

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = a.double()  # a plain attribute: not a parameter, not a stacked buffer
        self.weight = nn.Parameter(torch.zeros(1, len(a), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight[0]
        q = 0.5 * (w @ self.a.to(w) @ w)
        return torch.stack([q.expand(x.shape[0]), torch.zeros_like(q).expand(x.shape[0])], -1)

    def body(self) -> Ellipsoid:
        lam, v = torch.linalg.eigh(self.a)
        return Ellipsoid(lam.rsqrt(), v)

    @staticmethod
    def data() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, dtype=torch.long)
