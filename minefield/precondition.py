"""Preconditioners: a positive-definite curvature ``C`` that shapes proposals and chains.

A preconditioner describes an ellipsoid ``{x : x^T C x <= 1}`` guessed to look
like the basin (for a quadratic basin ``L = 1/2 x^T H x`` with cutoff ``c`` the
basin is exactly that ellipsoid with ``C = H / (2c)``; the scale of ``C`` never
matters below). It offers the three operations the volume estimators need:

- ``sample(k, g)``: ``x ~ N(0, C^-1)`` ``(k, n)``, i.e. ``x = T z`` with ``T T^T = C^-1``;
- ``quad(u)``: ``u^T C u`` per row;
- ``logdet``: ``log det C``; and ``apply(z) = T z`` for rounding a chain's coordinates.

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

    def __init__(self, kind: str, n: int, logdet: float, **parts: torch.Tensor):
        self.kind, self.n, self.logdet, self._p = kind, n, float(logdet), parts

    @classmethod
    def dense(cls, c: torch.Tensor) -> Preconditioner:
        c = _finite(c, "dense preconditioner")
        if c.dim() != 2 or c.shape[0] != c.shape[1]:
            raise ConfigError(f"dense preconditioner must be square (n, n), got {tuple(c.shape)}")
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
        if d.dim() != 1:
            raise ConfigError(f"diagonal preconditioner must be a vector (n,), got "
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

    def sample(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """``k`` draws of ``N(0, C^-1)`` ``(k, n)``."""
        return self.apply(torch.randn(k, self.n, generator=generator, dtype=torch.float64))

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
    lam, v = torch.linalg.eigh(0.5 * (c + c.T))
    return (v * lam.clamp(min=floor)) @ v.T
