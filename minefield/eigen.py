"""Top eigenvalues of every member's curvature by Lanczos with full reorthogonalisation.

Golub & Van Loan §10.1, the method of hessian-eigenthings rather than PyHessian's power
iteration. :func:`lanczos` runs B independent symmetric operators at once (one batched
product per step); each Ritz value ``theta`` of its tridiagonal matrix comes with its
residual ``r = |beta_m s_m|``: an eigenvalue lies in ``[theta - r, theta + r]`` (Parlett,
*The Symmetric Eigenvalue Problem*, Thm 4.5.1). :func:`top_eigenvalues` iterates until
``r <= tol * max|theta|`` for the top k of each member, then finds repeated eigenvalues
by deflated passes, member by member. Units: loss per squared parameter unit.

Example (a diagonal quadratic: its eigenvalues)::

    >>> import torch
    >>> from minefield.hvp import CurvatureOperator, Objective
    >>> a = torch.diag(torch.tensor([3.0, 3.0, 1.0, 0.5], dtype=torch.float64))
    >>> w = {"w": torch.zeros(1, 4, dtype=torch.float64)}
    >>> op = CurvatureOperator(Objective.from_function(w, lambda p: p["w"] @ a @ p["w"] / 2))
    >>> top_eigenvalues(op, k=3).values.round(decimals=8)
    tensor([[3., 3., 1.]], dtype=torch.float64)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ConfigError
from .hvp import CurvatureOperator
from .options import integers

__all__ = ["Eigen", "lanczos", "top_eigenvalues"]


def _orth(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``w - Q Q^T w`` twice (classical Gram-Schmidt, "twice is enough");
    ``w (B, n)``, ``q (B, j, n)`` orthonormal rows. Both products are batched
    row-vector times matrix (``(B, 1, n) x (B, n, j)``, ``(B, 1, j) x (B, j, n)``):
    MKL runs the matrix-times-column form ``(B, j, n) x (B, n, 1)`` of the first
    10-18x slower (B = 32, n = 3614)."""
    w = w.unsqueeze(1)
    for _ in range(2):
        w = torch.baddbmm(w, torch.bmm(w, q.transpose(1, 2)), q, alpha=-1)
    return w.squeeze(1)


def lanczos(apply, v0: torch.Tensor, n_iter: int, generator: torch.Generator | None = None,
            check=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lanczos with full reorthogonalisation on B independent symmetric operators at once.

    ``apply(V (B, n)) -> (B, n)`` applies operator b to row b; ``v0`` ``(B, n)``
    starts. Returns ``(alpha (B, j), beta (B, j), Q (B, j, n), n_done)`` with
    ``H Q^T = Q^T T + beta_j q_{j+1} e_j^T``, ``T = tridiag(beta[:-1], alpha, beta[:-1])``.
    An exhausted Krylov space (``beta ~ 0``) restarts from a fresh random vector
    orthogonal to Q with a zero coupling, so T stays exact. ``check(alpha, beta)``,
    called after every iteration, may return True to stop early.
    """
    b, n = v0.shape
    g = generator or torch.Generator().manual_seed(0)
    # Q grows by doubling: most runs stop long before n_iter (300 x n would be wasted)
    q = torch.zeros(b, min(n_iter, 16), n, dtype=v0.dtype, device=v0.device)
    alpha = torch.zeros(b, n_iter, dtype=torch.float64)
    beta = torch.zeros(b, n_iter, dtype=torch.float64)
    q[:, 0] = v0 / v0.norm(dim=1, keepdim=True)
    j = 0
    for j in range(n_iter):
        w = apply(q[:, j])
        alpha[:, j] = (w * q[:, j]).sum(1).double()
        hq = w.norm(dim=1).double()  # |H q_j|: what rounding in w is relative to
        w = _orth(w, q[:, :j + 1])
        beta[:, j] = w.norm(dim=1).double()
        if j + 1 == n_iter or (check is not None and check(alpha[:, :j + 1], beta[:, :j + 1])):
            break
        # exhausted: w is rounding of H q_j. Relative to the largest |eigenvalue| seen
        # instead, float32 cut real couplings below 1.2e-4 of it (lambda_max 0.748 for 1
        # beside an eigenvalue of -1e4; a spectral density of 6 nodes where 80 were due)
        tiny = beta[:, j] <= 1e3 * torch.finfo(v0.dtype).eps * hq.clamp(min=1e-30)
        if bool(tiny.any()):
            fresh = torch.randn(b, n, generator=g).to(v0)
            fresh = _orth(fresh, q[:, :j + 1])
            w = torch.where(tiny[:, None].to(w.device), fresh, w)
            beta[:, j] = torch.where(tiny, 0.0, beta[:, j])
        if j + 1 == q.shape[1]:
            q = torch.cat([q, torch.zeros(b, min(q.shape[1], n_iter - q.shape[1]), n,
                                          dtype=q.dtype, device=q.device)], 1)
        q[:, j + 1] = w / w.norm(dim=1, keepdim=True)
    return alpha[:, :j + 1], beta[:, :j + 1], q[:, :j + 1], j + 1


def _ritz(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs ``(theta (B, j) ascending, S (B, j, j))`` of the tridiagonal matrices."""
    t = torch.diag_embed(alpha) + torch.diag_embed(beta[:, :-1], 1) + \
        torch.diag_embed(beta[:, :-1], -1)
    return torch.linalg.eigh(t)


@dataclass
class Eigen:
    """Top-k Ritz values ``(M, k)`` (descending), their residual bounds ``(M, k)``
    (*an* eigenvalue lies within ``+- residual``; the top one is ``>=`` the top value but
    may lie above ``value + residual`` when the Krylov space has not resolved it from a
    close second), optional Ritz vectors ``(M, k, n)``."""

    values: torch.Tensor
    residuals: torch.Tensor
    vectors: torch.Tensor | None
    n_iter: int


def top_eigenvalues(op: CurvatureOperator, k: int = 1, tol: float = 1e-4,
                    max_iter: int | None = None, which: str = "largest", seed: int = 0,
                    vectors: bool = False) -> Eigen:
    """The ``k`` largest (or, with ``which="smallest"``, most negative) eigenvalues
    of every member's matrix by Lanczos, stopped when every residual bound is
    ``<= tol * max|theta|`` or after ``max_iter`` (default ``min(n, 300)``) products.

    Repeated eigenvalues: one Krylov space sees each eigenspace once, so for spectrum
    ``{5, 5, 5, 3, 2.5, ...}`` a single pass gives ``[5, 3, 2.5]`` with tiny
    residuals (each is an eigenvalue; the copies are missing). With ``k > 1`` and a
    converged pass, further passes on ``P H P`` (``P`` projects out the Ritz vectors
    found) add the copies until none enters the top ``k``, and the residuals are then
    ``||H v - theta v||`` of the returned vectors; ``n_iter`` counts every pass.
    A pass stopped by ``max_iter`` is returned as it is (multiplicities unchecked).

    Raises:
        ConfigError: ``k < 1`` or ``k`` larger than the number of parameters, or
            ``tol`` not a finite number > 0 (``tol <= 0`` would never stop early).
    """
    integers(k=k, seed=seed, **({} if max_iter is None else {"max_iter": max_iter}))
    if not (tol > 0 and math.isfinite(tol)):
        raise ConfigError(f"tol must be a finite number > 0, got {tol}")
    if not 1 <= k <= op.n:
        raise ConfigError(f"k={k} eigenvalues asked for, but the model has {op.n} parameters "
                          f"(need 1 <= k <= {op.n})")
    if which not in ("largest", "smallest"):
        raise ConfigError(f"which must be 'largest' or 'smallest', got {which!r}")
    max_iter = min(op.n, 300 if max_iter is None else max_iter)  # 0 was read as None
    if max_iter < k:
        raise ConfigError(f"max_iter={max_iter} Lanczos steps cannot give k={k} eigenvalues")
    g = torch.Generator().manual_seed(int(seed))
    sign = 1.0 if which == "largest" else -1.0

    def top(alpha, beta):
        theta, s = _ritz(alpha, beta)
        idx = (theta * sign).argsort(1, descending=True)[:, :k]
        return theta.gather(1, idx), (beta[:, -1:] * s[:, -1, :]).abs().gather(1, idx), s, idx

    def done(th, res, scale=None):  # (M,): residuals <= tol * max|theta| (of the top k)
        scale = th.abs().amax(1, keepdim=True) if scale is None else scale
        return (res <= tol * scale.clamp(min=1e-30)).all(1)

    def run(apply, basis, n_iter, first=k, scale=None, mask=None):  # orthogonal to ``basis``
        v0 = torch.randn(op.m, op.n, generator=g).to(dtype=op.dtype, device=op.device)
        v0 = v0 if basis is None else _orth(v0, basis)  # until the top ``first`` converge
        alpha, beta, q, n = lanczos(apply, v0, n_iter, g, lambda a, b: a.shape[1] >= first
                                    and bool(done(*(t[:, :first] for t in top(a, b)[:2]),
                                                  scale)[mask].all()))
        theta, res, s, idx = top(alpha, beta)
        sk = s.gather(2, idx[:, None, :].expand(-1, s.shape[1], -1))  # (M, j, k)
        return theta, res, torch.einsum("mjk,mjn->mkn", sk.to(q), q), n

    theta, res, vec, n_done = run(op.matvec, None, max_iter)
    converged = done(theta, res)  # each member's first pass, on its own
    active = converged & (k > 1)
    if bool(active.any()):
        # A Krylov space holds one vector of each eigenspace: a repeated eigenvalue shows
        # once. Each further pass runs on P H P - shift (I - P), P projecting out every
        # vector found so far, converges its top value and keeps it while it enters the
        # top k: one more copy per pass. (The top Ritz value is <= the top eigenvalue, so
        # one above the k-th found surely enters; one below is trusted as the first
        # pass's values are.) Each member goes on while its own copies enter.
        once, vals, vecs = (theta, res, vec), theta, vec  # the first pass
        scale = theta.abs().amax(1, keepdim=True)  # the first pass's rule, the same tol
        # P H P would be 0 on the found span: 0 is the extreme value searched for when
        # fewer than k eigenvalues lie beyond it, and rounding would find it. Sent to
        # -shift (beyond the other end of each member's spectrum) it is never found; a
        # shift shared by the stack (and + 1) had cost a small member 125x its tolerance.
        shift = (sign * 2 * scale).to(dtype=op.dtype, device=op.device)
        for _ in range(k - 1):
            basis = torch.linalg.qr(vecs.transpose(1, 2)).Q.transpose(1, 2)  # (M, j, n)
            n_iter = min(max_iter, op.n - basis.shape[1])
            if n_iter < 1:
                break
            kth = (vals * sign).topk(k, dim=1).values[:, -1]

            def deflated(x, b=basis):
                px = _orth(x, b)
                return _orth(op.matvec(px), b) - shift * (x - px)

            th, r, v, n = run(deflated, basis, n_iter, 1, scale, active)
            n_done += n
            keep = active & done(th[:, :1], r[:, :1], scale)  # a converged copy is trusted
            new = torch.where(keep, th[:, 0], torch.full_like(th[:, 0], -sign * math.inf))
            vals, vecs = torch.cat([vals, new[:, None]], 1), torch.cat([vecs, v[:, :1].to(vecs)], 1)
            active = keep & (th[:, 0] * sign > kth + tol * scale[:, 0])  # it entered
            if not bool(active.any()):
                break
        idx = (vals * sign).argsort(1, descending=True)[:, :k]
        theta = vals.gather(1, idx)
        vec = vecs.gather(1, idx.to(vecs.device)[..., None].expand(-1, -1, vecs.shape[2]))
        # residuals of H itself, ||H v - theta v|| (v unit): an eigenvalue lies within
        hv = torch.stack([op.matvec(vec[:, i]) for i in range(k)], 1)
        res = (hv - theta[..., None].to(hv) * vec).norm(dim=2).double().cpu()  # as theta
        was = ~converged  # unconverged first passes are returned as they are
        theta, res = torch.where(was[:, None], once[0], theta), torch.where(
            was[:, None], once[1], res)
        vec = torch.where(was.to(vec.device)[:, None, None], once[2], vec)
    return Eigen(theta, res, vec if vectors else None, n_done)
