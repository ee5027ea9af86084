"""A network's basin as a line-loss function, so every volume estimator runs on it.

:class:`NetworkLines` turns a model and one minimum ``theta`` into the line-loss
``f(x0, v, t) = L(theta + S (x0 + t v))`` of :mod:`minefield.volume`, evaluated
by the batched :func:`~minefield.engine.evaluate_points` (``L``: the mean train
NLL). ``x`` lives in the ``n`` perturbed coordinates of
:func:`~minefield.directions.n_perturbed` (``bias='exclude'``: weights only; ``'zero'``,
which counts coordinates it never moves, is refused), and ``S = diag(s)`` sets their
unit, following the direction kind (a filter that is exactly 0 has no unit: refused):

- ``gaussian``: ``s = 1``, plain Euclidean parameter space (volumes in parameter units);
- ``filter``: ``s_j = |theta_f| sqrt(n / size_f)`` for the filter ``f`` (output unit)
  holding coordinate ``j``: the linear counterpart of Li et al.'s filter
  normalisation (a uniform unit ``x`` direction maps to a direction whose filters have
  norm ``|theta_f|`` on average, not exactly, so radii are in about the paper's units);
  ``layer``: the same per tensor.

The ``naive`` estimator keeps the paper's exactly normalised directions
(:func:`minefield.basin.basin_radii`); the others report ``log V`` in ``x`` units.

Preconditioners for ``is``, ``gaussian`` and ``mcmc`` (:func:`network_curvature`),
all in ``x`` coordinates (``C_x = S C_theta S``) and floored at
``2 (c - L(theta)) / r_max^2`` (:func:`~minefield.precondition.floor_curvature`):
``hessian`` (dense, from :func:`minefield.curvature.dense_hessian`'s batched
Hessian-vector products, for ``n <= 6000``), ``hutchinson`` (the diagonal ``E[z * H z]``
over Rademacher ``z``, Bekas et al. 2007, :func:`minefield.curvature.hessian_diagonal`;
in ``x`` units ``diag_x = s_i^2 H_ii``), ``axes`` (``1 / (r_+ r_-)``
from the radii along each coordinate axis: no curvature at all, so it also sees a
flat-bottomed basin's walls) and a user-given diagonal (e.g. Adam's second moments,
the Fisher diagonal: ``curvature=``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call

from .config import ConfigError
from .curvature import dense_hessian, hessian_diagonal
from .directions import BiasPolicy, DirectionKind, DirectionSpec, _perturbed, check_units
from .engine import LOSSES, evaluate_points
from .functional import Params, bn_mode, buffers_like, check_single, member
from .options import CurvatureKind
from .precondition import Preconditioner, floor_curvature
from .volume import VolumeEstimate, ray_radii

if TYPE_CHECKING:
    from .basin import BasinResult

__all__ = ["NetworkLines", "CurvatureKind", "network_curvature", "adam_curvature",
           "basin_volume", "CoolingBlocks", "cooling_blocks", "merge_cooling_blocks",
           "estimate_result"]

MAX_DENSE = 6000


class NetworkLines:
    """The line-loss ``f(x0, v, t)`` of one minimum ``centre`` ``(1, ...)`` of ``model``."""

    def __init__(self, model: nn.Module, centre: Params, x: torch.Tensor, y: torch.Tensor,
                 spec: DirectionSpec = DirectionSpec(), buffers: Params | None = None,
                 memory_mb: float | None = None, bn: str = "eval"):
        self.model, self.centre, self.x, self.y = model, centre, x, y
        self.buffers, self.memory_mb, self.bn = buffers, memory_mb, bn
        theta = member(centre, 0)
        if spec.bias is BiasPolicy.ZERO:  # coordinates never moved have no extent
            raise ConfigError("directions.bias 'zero' is a convention of the naive estimator "
                              "(n counts coordinates it never moves): use 'exclude'")
        check_units(theta, spec.kind, spec.bias)
        self.keys = [k for k, v in theta.items() if _perturbed(v.shape, spec.bias)]
        scales = []
        for k in self.keys:
            t = theta[k].detach().double().cpu()
            if spec.kind is DirectionKind.GAUSSIAN:
                s = torch.ones_like(t)
            elif spec.kind is DirectionKind.LAYER or t.dim() < 2:
                rows = t.reshape(1, -1) if spec.kind is DirectionKind.LAYER else t.reshape(-1, 1)
                s = (rows.norm(dim=1, keepdim=True) / math.sqrt(rows.shape[1])).expand_as(rows)
            else:
                rows = t.reshape(t.shape[0], -1)
                s = (rows.norm(dim=1, keepdim=True) / math.sqrt(rows.shape[1])).expand_as(rows)
            scales.append(s.reshape(-1))
        self.scale = torch.cat(scales) if scales else torch.zeros(0, dtype=torch.float64)
        self.n = len(self.scale)
        if spec.kind is not DirectionKind.GAUSSIAN:  # a unit x moves each filter by ~|theta_f|
            self.scale = self.scale * math.sqrt(self.n)
        if self.n == 0:
            raise ConfigError("the model has no perturbed coordinates (bias 'exclude' and "
                              "no weights?)")
        self.shapes = {k: theta[k].shape for k in self.keys}
        self.log_det_scale = float(self.scale.log().sum())
        self.evaluations = 0

    def to_params(self, flat: torch.Tensor) -> Params:
        """``S flat`` ``(K, n)`` as parameter tensors ``(K, ...)`` (0 where not perturbed)."""
        v = flat.double() * self.scale.to(flat.device)
        out, i = {}, 0
        for k, c in self.centre.items():
            if k in self.shapes:
                size = self.shapes[k].numel()
                out[k] = v[:, i:i + size].reshape(len(v), *self.shapes[k]).to(c)
                i += size
            else:
                out[k] = torch.zeros(len(v), *c.shape[1:], dtype=c.dtype, device=c.device)
        return out

    def __call__(self, x0: torch.Tensor | None, v: torch.Tensor, t: torch.Tensor
                 ) -> torch.Tensor:
        """The loss at ``theta + S (x0 + t v)``, on the CPU: the estimators' maths (rays,
        chains, weights) lives there, whatever device the network runs on."""
        self.evaluations += t.numel()
        starts = None if x0 is None else self.to_params(x0)
        return evaluate_points(self.model, self.centre, self.to_params(v), t, self.x, self.y,
                               self.buffers, self.memory_mb, bn=self.bn,
                               starts=starts)[0].cpu()

    def loss_at(self, flat: torch.Tensor) -> torch.Tensor:
        """The (differentiable) train loss at ``theta + S flat``, ``flat`` ``(n,)``."""
        d = self.to_params(flat[None])
        params = {k: v + d[k][0] for k, v in member(self.centre, 0).items()}
        batch = self.bn == "batch"
        # batch statistics update whatever buffers they are given: never the module's
        bufs = member(self.buffers or (buffers_like(self.model, 1, self.x.device) if batch
                                       else {}), 0)
        with bn_mode(self.model, batch):
            logits = functional_call(self.model, {**params, **bufs}, (self.x.to(flat.dtype),))
        return LOSSES["nll"](logits, self.y).mean()


def network_curvature(lines: NetworkLines, kind: CurvatureKind | str, floor: float,
                      generator: torch.Generator, cutoff: float = math.nan,
                      r_max: float = 1.0, rtol: float = 1e-3, probes: int = 64,
                      given: Params | None = None) -> Preconditioner | None:
    """A preconditioner in ``x`` coordinates of ``kind`` (module docstring), or ``None``."""
    kind = CurvatureKind(kind)
    centre = {k: v.double() for k, v in lines.centre.items()}
    if kind is CurvatureKind.NONE:
        return None
    if kind is CurvatureKind.GIVEN:
        if given is None:
            raise ConfigError("preconditioner 'given' needs a curvature (e.g. Adam's "
                              "second moments)")
        missing = [k for k in lines.keys if k not in given]
        if missing:
            raise ConfigError(f"given curvature lacks {missing}")
        c = torch.cat([given[k].detach().double().reshape(-1).cpu() for k in lines.keys])
        if len(c) != lines.n:
            raise ConfigError(f"given curvature has {len(c)} entries, the basin n = {lines.n}")
        return Preconditioner.diagonal(floor_curvature(c * lines.scale**2, floor))
    if kind is CurvatureKind.AXES:
        eye = torch.eye(lines.n, dtype=torch.float64)
        r, _ = ray_radii(lines, torch.cat([eye, -eye]), cutoff, r_max, rtol)
        return Preconditioner.diagonal(floor_curvature(1 / (r[:lines.n] * r[lines.n:]), floor))
    if kind is CurvatureKind.HESSIAN and lines.n > MAX_DENSE:
        raise ConfigError(f"a dense Hessian of n = {lines.n} > {MAX_DENSE} coordinates is "
                          f"too large: use 'hutchinson'")
    # minefield.curvature's batched Hessian-vector products, in float64, over all
    # parameters; then the perturbed coordinates, in x units: C_x = S C_theta S
    model_dtype = next(lines.model.parameters()).dtype
    lines.model.double()
    try:
        data = (lines.x.double(), lines.y)
        bufs = ({k: b.double() if b.is_floating_point() else b for k, b in lines.buffers.items()}
                if lines.buffers else None)
        idx = _coordinates(lines)
        s = lines.scale
        if kind is CurvatureKind.HESSIAN:
            h = dense_hessian(lines.model, centre, data, buffers=bufs, bn=lines.bn)[0]
            h = h[idx][:, idx].cpu()  # the scale s and the preconditioner are CPU maths
            return Preconditioner.dense(floor_curvature(s[:, None] * h * s[None, :], floor))
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        d = hessian_diagonal(lines.model, centre, data, buffers=bufs, bn=lines.bn,
                             n_probes=probes, seed=seed)[0][idx].cpu()
        return Preconditioner.diagonal(floor_curvature(s**2 * d, floor))
    finally:
        lines.model.to(model_dtype)


def _coordinates(lines: NetworkLines) -> torch.Tensor:
    """Indices of the perturbed coordinates in :func:`~minefield.functional.flatten` order."""
    out, i = [], 0
    for k, v in lines.centre.items():
        size = math.prod(v.shape[1:])
        if k in lines.shapes:
            out.append(torch.arange(i, i + size))
        i += size
    return torch.cat(out)


def basin_volume(model: nn.Module, params: Params, data, cfg, buffers: Params | None = None,
                 bn: str = "eval", curvature: Params | None = None):
    """The basin of one model ``params`` ``(1, ...)`` with ``cfg.estimator`` (a
    :class:`~minefield.basin.VolumeConfig`): a :class:`~minefield.basin.BasinResult`
    whose ``diagnostics`` hold ESS, largest share, rays at ``r_max``, warnings.

    ``curvature``: a diagonal in parameter shapes for ``preconditioner='given'``.
    ``log10_volume`` is in the ``x`` units of the direction kind (module docstring).
    ``mcmc`` with ``cfg.mcmc_blocks`` > 1 runs its blocks here, one after another
    (:func:`cooling_blocks`), and merges them as a split run does.
    """
    from .volume import Estimator, star_volume

    if cfg.estimator is Estimator.MCMC:
        run = cooling_blocks(model, params, data, cfg, buffers, bn, curvature)
        return merge_cooling_blocks([run], cfg, bn)
    lines, centre_loss, cut, g, pre = _setup(model, params, data, cfg, buffers, bn, curvature)
    est = star_volume(lines, lines.n, cut, cfg.estimator, cfg.n_directions, g, cfg.r_max,
                      cfg.rtol, pre, cfg.sigma, centre_loss, power=cfg.proposal_power())
    return _result(est, lines.evaluations, lines.log_det_scale, centre_loss, cut, cfg, bn)


def _setup(model, params, data, cfg, buffers, bn, curvature):
    """The line-loss of ``params``, its centre loss, the cutoff, the generator (after the
    preconditioner drew from it) and the preconditioner: what every estimator starts from."""
    from .basin import CutoffKind
    from .data import train_xy as _xy

    x, y = _xy(data)
    centre = check_single(params, "the model (use basin_members for a stack)")
    lines = NetworkLines(model, centre, x, y, cfg.directions, buffers, cfg.memory_mb, bn)
    centre_loss = float(lines(None, torch.zeros(1, lines.n, dtype=torch.float64),
                              torch.zeros(1, dtype=torch.float64))[0])
    cut = cfg.cutoff * (centre_loss if cfg.cutoff_kind is CutoffKind.RELATIVE else 1.0)
    g = cfg.directions.generator()
    floor = 2 * max(cut - centre_loss, 1e-12) / cfg.r_max**2
    if not centre_loss < cut:  # no basin, every radius 0: no curvature to shape (the axes'
        # 1 / (r+ r-) is infinite), and log V = -inf whatever the proposal
        none = cfg.preconditioner is CurvatureKind.NONE
        return lines, centre_loss, cut, g, None if none else Preconditioner.diagonal(
            torch.full((lines.n,), floor, dtype=torch.float64))
    pre = network_curvature(lines, cfg.preconditioner, floor, g, cut, cfg.r_max, cfg.rtol,
                            cfg.probes, curvature)
    return lines, centre_loss, cut, g, pre


def estimate_result(est: VolumeEstimate, centre_loss: float, cutoff: float,
                    config: dict) -> BasinResult:
    """A :class:`~minefield.basin.BasinResult` of any estimator (radii: those of its rays,
    empty for mcmc). ``is`` and ``gaussian`` with a preconditioner draw their rays from its
    proposal, which favours the long axes: on a 20-d ellipsoid spanning a decade the mean
    radius along the Hessian's rays is 0.47, over uniform directions 0.22, and reweighting
    the rays to uniform directions left an ESS of 2-40 of 4,000-40,000 rays. There the
    mean, median and ``n mean log10 r`` are NaN, ``diagnostics["rays"]`` is
    ``"proposal"`` and a warning says why; the volume is unaffected."""
    from .basin import BasinResult

    r = torch.tensor(est.details.get("radii", []), dtype=torch.float64)
    shaped = config.get("preconditioner", "none") not in ("none", None)
    uniform = bool(len(r)) and not (shaped and est.estimator in ("is", "gaussian")
                                    and bool((r > 0).any()))  # all 0: no basin, any rays
    warns = list(est.warnings) + ([] if uniform or not len(r) else [
        "mean and median radius not reported: these rays follow the preconditioner's "
        "proposal, not uniform directions (the naive estimator gives them)"])
    diag = {"ess": est.ess, "n_samples": est.n_samples, "max_share": est.max_share,
            "n_at_r_max": est.n_at_r_max, "warnings": warns,
            **({"rays": "proposal"} if len(r) and not uniform else {}),
            **{k: v for k, v in est.details.items() if k not in ("radii", "ci_normal")}}
    if "ci_normal" in est.details:  # natural log in the estimate; log10 like the rest here
        diag["ci_log10_normal"] = [v / math.log(10) for v in est.details["ci_normal"]]
    return BasinResult(r, est.n, float(centre_loss), float(cutoff), est.log10_volume,
                       float(est.n * torch.log10(r).mean()) if uniform else math.nan,
                       float(r.mean()) if uniform else math.nan, est.ci_log10,
                       est.n_evaluations, dict(config), int(est.n_at_r_max), est.estimator,
                       diag)


def _result(est, evaluations: int, log_det_scale: float, centre_loss: float, cut: float,
            cfg, bn: str):
    from .basin import _warn_r_max

    est.n_evaluations = evaluations
    est.details["log_det_scale"] = log_det_scale  # natural log: + ln V in parameter units
    res = estimate_result(est, centre_loss, cut, {**cfg.to_dict(), "bn": bn})
    _warn_r_max(res, cfg.r_max, len(res.radii) or None)  # mcmc: of its start rays
    return res


@dataclass
class CoolingBlocks:
    """Some blocks of one model's ``mcmc`` estimate (:mod:`minefield.cooling_blocks`)
    and what merging them needs; JSON through :meth:`to_dict` (a task's result)."""

    parts: list[VolumeEstimate]  # in block order; n_evaluations: the block's own
    centre_loss: float
    cutoff: float
    overhead: int  # evaluations before the chains: the centre, the preconditioner
    log_det_scale: float

    def to_dict(self) -> dict:
        return {**asdict(self), "parts": [p.to_dict() for p in self.parts]}

    @classmethod
    def from_dict(cls, d: dict) -> CoolingBlocks:
        return cls(**{**d, "parts": [VolumeEstimate.from_dict(p) for p in d["parts"]]})


def cooling_blocks(model: nn.Module, params: Params, data, cfg, buffers: Params | None = None,
                   bn: str = "eval", curvature: Params | None = None,
                   blocks: Sequence[int] | None = None) -> CoolingBlocks:
    """Blocks ``blocks`` (default: all ``cfg.mcmc_blocks``) of the ``mcmc`` estimate of
    one model, each :func:`~minefield.cooling_blocks.cooling_block` on the same
    line-loss and preconditioner; a block's numbers depend on its index only."""
    from .cooling_blocks import cooling_block

    lines, centre_loss, cut, g, pre = _setup(model, params, data, cfg, buffers, bn, curvature)
    overhead, parts = lines.evaluations, []
    for j in range(cfg.mcmc_blocks) if blocks is None else blocks:
        start = lines.evaluations
        parts.append(cooling_block(lines, lines.n, cut, j, cfg.mcmc_blocks,
                                   cfg.directions.seed, cfg.n_chains, cfg.n_replicates, g,
                                   cfg.r_max, cfg.rtol, pre, cfg.walk_length))
        parts[-1].n_evaluations = lines.evaluations - start
    return CoolingBlocks(parts, centre_loss, cut, overhead, lines.log_det_scale)


def merge_cooling_blocks(runs: Sequence[CoolingBlocks], cfg, bn: str = "eval"):
    """One :class:`~minefield.basin.BasinResult` from the blocks of one model, given
    in block order (one run or several tasks'): the same numbers either way."""
    from .cooling_blocks import merge_blocks

    parts = [p for r in runs for p in r.parts]
    if len(parts) != cfg.mcmc_blocks:
        raise ConfigError(f"{len(parts)} blocks of an estimate in {cfg.mcmc_blocks}")
    est = merge_blocks(parts, cfg.rtol)
    r0 = runs[0]
    return _result(est, r0.overhead + sum(p.n_evaluations for p in parts), r0.log_det_scale,
                   r0.centre_loss, r0.cutoff, cfg, bn)


def adam_curvature(state: dict[str, torch.Tensor], keys: list[str], member: int,
                   batch_size: int = 1) -> Params:
    """``B v``: Adam's second moments ``v = exp_avg_sq`` of one member times the training
    batch size ``B``, per parameter, from a saved optimizer state (``opt.<i>.exp_avg_sq``:
    leaf ``i`` is ``keys[i]``, stacked over members) -- a ``given`` curvature for
    :func:`basin_volume`.

    Near a minimum a minibatch gradient of the mean loss has second moment
    ``E[g_j^2] ~ F_jj / B`` (the mean gradient ~ 0), so ``B v`` estimates the diagonal
    of the empirical Fisher of the mean loss (the scaling of Khan et al. 2018, "Fast
    and scalable Bayesian deep learning by weight-perturbation in Adam"). After
    full-batch training ``v`` holds squared full gradients, not a Fisher estimate.

    Example::

        >>> v = {"opt.0.exp_avg_sq": torch.tensor([[1e-4, 4e-4]])}
        >>> adam_curvature(v, ["w"], 0, batch_size=32)["w"]
        tensor([0.0032, 0.0128])
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    out = {}
    for i, k in enumerate(keys):
        name = f"opt.{i}.exp_avg_sq"
        if name not in state:
            raise ConfigError(f"the optimizer state has no {name}: was the run trained "
                              f"with Adam?")
        out[k] = batch_size * state[name][member]
    return out
