"""Preconditioners: a positive-definite curvature ``C`` that shapes proposals and chains.

A preconditioner describes an ellipsoid ``{x : x^T C x <= 1}`` guessed to look
like the basin (for a quadratic basin ``L = 1/2 x^T H x`` with cutoff ``c`` the
basin is exactly that ellipsoid with ``C = H / (2c)``; the scale of ``C`` never
matters below). It offers the three operations the volume estimators need:

- ``sample(k, g)``: ``x ~ N(0, C^-1)`` ``(k, n)``, i.e. ``x = T z`` with ``T T^T = C^-1``;
- ``quad(u)``: ``u^T C u`` per row;
- ``logdet``: ``log det C``; and ``apply(z) = T z`` for rounding a chain's coordinates.

*Shape* (``power`` p, :meth:`Preconditioner.with_power`): the guessed body need not be
an ellipsoid. With power ``p`` it is ``T B_p``, ``B_p`` the unit l_p ball (p = 2: the
ellipsoid; p = inf: the parallelotope ``T [-1, 1]^n``, a box when ``T`` is diagonal).
``sample`` then draws ``x = T z`` with ``z_i`` iid of density ``~ exp(-|z_i|^p)``
(uniform on ``[-1, 1]`` at p = inf), whose direction ``x / |x|`` has the density of
the directions of a uniform point of ``T B_p`` (any density that is a function of
``|z|_p`` gives the same directions), relative to the uniform direction

    p(u) / p_unif(u) = omega_n / (vol(T B_p) |T^-1 u|_p^n),
    vol(T B_p) = |det T| (2 Gamma(1 + 1/p))^n / Gamma(1 + n/p)

(``log_ratio`` returns the log of its inverse; at p = 2 it is the angular central
Gaussian of Tyler 1987, ``det(C)^1/2 (u^T C u)^-n/2``).

Three forms, all on plain tensors (any source of curvature plugs in):

- :meth:`Preconditioner.dense` ``(n, n)`` (e.g. the Hessian of a small net):
  Cholesky ``C = L L^T``, ``T = L^-T``;
- :meth:`Preconditioner.diagonal` ``(n,)`` (a Hutchinson diagonal, Adam's second
  moments, squared inverse axis radii);
- :meth:`Preconditioner.low_rank` ``C = diag(d) + V diag(lam) V^T`` (top-k
  eigenpairs plus a diagonal),
  via ``C = D^1/2 (I + W lam W^T) D^1/2``, ``W = D^-1/2 V = Q R``, ``R lam R^T = E mu E^T``
  (positive definite iff every ``mu > -1``):
  ``T = D^-1/2 (I + U ((1 + mu)^-1/2 - 1) U^T)`` with ``U = Q E``,
  ``log det C = sum log d + sum log(1 + mu)``.

Curvature of a real loss is not positive definite (flat and negative directions):
:func:`floor_curvature` clips eigenvalues or diagonal entries from below at a floor,
e.g. ``2 (c - L(theta)) / r_max^2``, the curvature whose quadratic reaches the cutoff
exactly at ``r_max`` (directions flatter than that are truncated at ``r_max`` anyway).

Example::

    >>> p = Preconditioner.diagonal(torch.tensor([1.0, 4.0], dtype=torch.float64))
    >>> p.logdet, p.quad(torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    (1.3862943611198906, tensor([4.], dtype=torch.float64))
"""

from __future__ import annotations

import math

import torch
from scipy.special import gammaincinv

from .config import ConfigError

__all__ = ["Preconditioner", "floor_curvature"]


def _finite(x: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise ConfigError(f"{what} must be a tensor, got {type(x).__name__}")
    if not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{what} holds NaN or infinite values")
    return x.detach().double().cpu()


class Preconditioner:
    """A positive-definite curvature ``C`` (dense, diagonal or low rank plus diagonal)."""

    def __init__(self, kind: str, n: int, logdet: float, power: float = 2.0,
                 **parts: torch.Tensor):
        self.kind, self.n, self.logdet, self._p = kind, n, float(logdet), parts
        self.power = float(power)

    @property
    def isotropic(self) -> bool:
        """``C = c I``: e.g. every entry clipped to the floor, so the curvature it came
        from shaped nothing (a diagonal or dense ``C``; a low-rank one is never)."""
        if self.kind == "diagonal":
            d = self._p["d"]
            return bool(d.max() == d.min())
        if self.kind == "dense":
            c = self._p["c"]
            return bool(torch.equal(c, c[0, 0] * torch.eye(self.n, dtype=c.dtype)))
        return False

    def with_power(self, power: float) -> Preconditioner:
        """The same ``T`` with the proposal body ``T B_power`` (module docstring)."""
        power = float(power)
        if not power >= 1:  # NaN too
            raise ConfigError(f"preconditioner power must be >= 1 (or inf), got {power}")
        return Preconditioner(self.kind, self.n, self.logdet, power, **self._p)

    @classmethod
    def dense(cls, c: torch.Tensor) -> Preconditioner:
        c = _finite(c, "dense preconditioner")
        if c.dim() != 2 or c.shape[0] != c.shape[1] or c.shape[0] == 0:
            raise ConfigError(f"dense preconditioner must be square (n, n) with n >= 1, got "
                              f"{tuple(c.shape)}")
        if not torch.allclose(c, c.T, rtol=1e-8, atol=1e-12 * float(c.abs().max())):
            raise ConfigError("dense preconditioner must be symmetric")
        chol, info = torch.linalg.cholesky_ex(c)
        if int(info) != 0:
            raise ConfigError("dense preconditioner is not positive definite (Cholesky "
                              "failed); clip its eigenvalues with floor_curvature")
        return cls("dense", c.shape[0], 2 * float(chol.diagonal().log().sum()), c=c, chol=chol)

    @classmethod
    def diagonal(cls, d: torch.Tensor) -> Preconditioner:
        d = _finite(d, "diagonal preconditioner")
        if d.dim() != 1 or len(d) == 0:
            raise ConfigError(f"diagonal preconditioner must be a vector (n,), n >= 1, got "
                              f"{tuple(d.shape)}")
        if not bool((d > 0).all()):
            raise ConfigError("diagonal preconditioner is not positive definite (entries "
                              "<= 0); clip it with floor_curvature")
        return cls("diagonal", len(d), float(d.log().sum()), d=d)

    @classmethod
    def low_rank(cls, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor,
                 diagonal: torch.Tensor) -> Preconditioner:
        """``C = diag(diagonal) + V diag(eigenvalues) V^T``, ``V = eigenvectors`` ``(n, k)``;
        eigenvalues may be negative as long as ``C`` stays positive definite."""
        lam = _finite(eigenvalues, "low-rank eigenvalues")
        v = _finite(eigenvectors, "low-rank eigenvectors")
        d = cls.diagonal(diagonal)._p["d"]
        if lam.dim() != 1 or v.dim() != 2 or v.shape != (len(d), len(lam)):
            raise ConfigError(f"low-rank preconditioner needs eigenvectors (n, k) = "
                              f"({len(d)}, {len(lam)}), got {tuple(v.shape)}")
        w = v / d.sqrt()[:, None]  # C = D^1/2 (I + W diag(lam) W^T) D^1/2
        q, r = torch.linalg.qr(w)
        mu, e = torch.linalg.eigh((r * lam) @ r.T)
        if not bool((mu > -1).all()):
            raise ConfigError("low-rank preconditioner is not positive definite (an "
                              "eigenvalue of C is <= 0); clip them with floor_curvature")
        return cls("low_rank", len(d), float(d.log().sum() + mu.log1p().sum()), d=d, v=v,
                   lam=lam, u=q @ e, shrink=(1 + mu).rsqrt() - 1)

    def quad(self, u: torch.Tensor) -> torch.Tensor:
        """``u^T C u`` for every row of ``u`` ``(k, n)``."""
        u = u.double()
        p = self._p
        if self.kind == "dense":
            return (u @ p["chol"]).pow(2).sum(-1)
        q = (u.pow(2) * p["d"]).sum(-1)
        return q + ((u @ p["v"]).pow(2) * p["lam"]).sum(-1) if self.kind == "low_rank" else q

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """``T z`` per row (``T T^T = C^-1``): maps rounded coordinates to the body's."""
        z = z.double()
        p = self._p
        if self.kind == "dense":  # x = L^-T z  <=>  L^T x = z
            return torch.linalg.solve_triangular(p["chol"].T, z.T, upper=True).T
        if self.kind == "low_rank":
            z = z + ((z @ p["u"]) * p["shrink"]) @ p["u"].T
        return z / p["d"].sqrt()

    def unapply(self, x: torch.Tensor) -> torch.Tensor:
        """``T^-1 x`` per row (``|T^-1 x|^2 = x^T C x``)."""
        x = x.double()
        p = self._p
        if self.kind == "dense":
            return x @ p["chol"]
        z = x * p["d"].sqrt()
        if self.kind == "low_rank":  # T^-1 = (I + U ((1 + mu)^1/2 - 1) U^T) D^1/2
            grow = (1 + p["shrink"]).reciprocal() - 1
            z = z + ((z @ p["u"]) * grow) @ p["u"].T
        return z

    def sample(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """``k`` draws ``x = T z`` ``(k, n)``, ``z_i ~ exp(-|z_i|^power)`` (power 2:
        ``N(0, C^-1)`` up to scale; inf: uniform on ``[-1, 1]``)."""
        shape = (k, self.n)
        if self.power == 2:
            return self.apply(torch.randn(shape, generator=generator, dtype=torch.float64))
        u = torch.rand(shape, generator=generator, dtype=torch.float64)
        if math.isinf(self.power):
            return self.apply(2 * u - 1)
        sign = torch.randint(0, 2, shape, generator=generator).double() * 2 - 1
        # |z|^p ~ Gamma(1/p): by the inverse CDF, so the generator alone fixes the draws
        mag = torch.from_numpy(gammaincinv(1 / self.power, u.numpy())) ** (1 / self.power)
        return self.apply(sign * mag)

    def log_ratio(self, u: torch.Tensor) -> torch.Tensor:
        """``log(p_unif(u) / p(u))`` per unit row of ``u`` ``(k, n)``, ``p`` the density
        of :meth:`sample`'s directions (module docstring)."""
        n, q = self.n, self.power
        if q == 2:  # the angular central Gaussian
            return -0.5 * self.logdet + 0.5 * n * self.quad(u).log()
        z = self.unapply(u).abs()
        log_norm = z.amax(-1).log() if math.isinf(q) else (
            z.log().mul(q).logsumexp(-1) / q)
        log_vol_b = n * math.log(2) if math.isinf(q) else (
            n * math.log(2 * math.gamma(1 + 1 / q)) - math.lgamma(1 + n / q))
        log_omega = 0.5 * n * math.log(math.pi) - math.lgamma(0.5 * n + 1)
        return self.log_abs_det_t() + log_vol_b - log_omega + n * log_norm

    def log_abs_det_t(self) -> float:
        """``log |det T| = -1/2 log det C``: the volume factor from rounded coordinates."""
        return -0.5 * self.logdet

    def check(self, n: int) -> Preconditioner:
        if self.n != n:
            raise ConfigError(f"preconditioner is for n = {self.n} coordinates, the basin "
                              f"has n = {n}")
        return self


def floor_curvature(c: torch.Tensor, floor: float) -> torch.Tensor:
    """``c`` with eigenvalues (dense ``(n, n)``) or entries (diagonal ``(n,)``) raised to
    at least ``floor`` > 0, so it becomes a valid positive-definite preconditioner."""
    if not (floor > 0 and math.isfinite(floor)):
        raise ConfigError(f"curvature floor must be a positive number, got {floor}")
    c = _finite(c, "curvature")
    if c.dim() == 1:
        return c.clamp(min=floor)
    sym = 0.5 * (c + c.T)
    eye = torch.eye(len(c), dtype=c.dtype)
    if int(torch.linalg.cholesky_ex(sym - floor * eye)[1]) == 0:
        return sym  # every eigenvalue is above the floor already: no n^3 eigensolver
    lam, v = torch.linalg.eigh(sym)
    return (v * lam.clamp(min=floor)) @ v.T
