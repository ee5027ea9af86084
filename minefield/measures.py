"""Every curvature and sharpness measure of every member of a stack, by name.

One table for the ``minefield sharpness`` command and for the optional columns
of poison sweeps: :func:`measure_members` returns ``{column: (M,) values}``, the
main column of each measure named as in :data:`MEASURES`, plus its uncertainty
columns (``<name>_stderr``, ``<name>_ci_low``/``_ci_high``, ``<name>_residual``, and for
the worst cases ``<name>_spread``: best minus worst per-restart maximum, see
:class:`~minefield.sharpness.SharpnessEstimate`). A Lanczos ``_residual`` is not an
interval for the top eigenvalue: *some* eigenvalue lies within it of the value, and the
top one is never below the value, but a top eigenvalue the Krylov space has not resolved
yet can lie above value + residual (spectrum {1, 0.999, ...}, tol 1e-4: in 10 of 200
seeds, by up to 23 residuals).

=========================  ==============================================================
measure                    what (all on the mean training NLL; see the modules for maths)
=========================  ==============================================================
``lambda_max``             top Hessian eigenvalue, Lanczos (:mod:`minefield.curvature`)
``trace``                  Hessian trace, Hutch++ with a 95% interval
``ggn_lambda_max``         top eigenvalue of the Gauss-Newton matrix
``ggn_trace``              trace of the Gauss-Newton matrix
``fisher_trace``           trace of the empirical Fisher
``worst_l2``               max loss increase in an L2 ball of radius ``rho``
``worst_linf``             the same in an L-inf box of half-width ``rho_linf``
``asam``                   the same in ASAM's ``|w|``-scaled L2 ball, radius ``rho_adaptive``
``average``                mean loss increase under ``N(0, sigma^2 I)`` noise
``m_sharpness``            ``worst_l2`` averaged over data subsets of size ``m``
``pac_bayes_sigma``        largest noise std keeping the mean loss increase <= ``bound``
``pac_bayes_sigma_mag``    the same with noise ``sigma (|w| + eta)`` (magnitude-aware)
=========================  ==============================================================

Example::

    >>> import torch
    >>> from minefield import ModelConfig, build_model
    >>> from minefield.train import init_stack
    >>> model = build_model(ModelConfig(widths=(4,)), (2,), 2)
    >>> p = {k: v.double() for k, v in init_stack(model, "glorot_uniform", [0, 1]).items()}
    >>> x, y = torch.randn(20, 2), torch.randint(0, 2, (20,))
    >>> cols = measure_members(model, p, (x, y), SharpnessConfig(measures=("lambda_max",)))
    >>> sorted(cols), cols["lambda_max"].shape
    (['lambda_max', 'lambda_max_residual'], torch.Size([2]))
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError, _Config
from .curvature import hutchpp_trace, top_eigenvalues
from .data import Dataset, train_xy
from .functional import Params
from .hvp import CurvatureOperator, Objective, model_objective
from .sharpness import average_sharpness, m_sharpness, pac_bayes_sigma, worst_case_sharpness

__all__ = ["MEASURES", "SharpnessConfig", "check_measurable", "measure_members"]

Columns = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SharpnessConfig(_Config):
    """Which measures to compute and their settings (radii in parameter units, or
    fractions of ``|w| + eta`` for ``asam`` and ``pac_bayes_sigma_mag``).

    ``steps``/``restarts``: projected-ascent steps and random starts of the worst
    cases (8 by default: fewer miss the maximum on small MLPs, see
    :func:`~minefield.sharpness.worst_case_sharpness`); ``n_samples``: antithetic
    Gaussian pairs of ``average`` and the PAC-Bayes bisection;
    ``trace_rtol``/``trace_rank``/``max_probes``: the Hutch++ stopping rule;
    ``eig_tol``: Lanczos residual tolerance relative to lambda_max;
    ``bn``: BatchNorm policy; ``dtype``: float64 (exact, small nets) or float32.
    """

    measures: tuple[str, ...] = ("lambda_max", "trace", "ggn_lambda_max", "ggn_trace",
                                 "fisher_trace", "worst_l2", "worst_linf", "asam", "average",
                                 "m_sharpness", "pac_bayes_sigma", "pac_bayes_sigma_mag")
    rho: float = 0.05
    rho_linf: float = 0.001
    rho_adaptive: float = 0.05
    eta: float = 0.01
    steps: int = 10
    restarts: int = 8
    sigma: float = 0.002
    n_samples: int = 64
    m: int = 20
    bound: float = 0.1
    trace_rtol: float = 0.01
    trace_rank: int = 20
    max_probes: int = 2000
    eig_tol: float = 1e-4
    bn: str = "eval"
    dtype: str = "float64"
    seed: int = 0

    def _validate(self):
        if isinstance(self.measures, str):  # "lambda_max" or "lambda_max,trace"
            object.__setattr__(self, "measures",
                               tuple(t for t in self.measures.replace(",", " ").split()))
        elif not isinstance(self.measures, tuple):
            try:
                object.__setattr__(self, "measures", tuple(self.measures))
            except TypeError:
                raise ConfigError("measures must be a list of measure names, got "
                                  f"{self.measures!r}") from None
        unknown = [m if isinstance(m, str) else repr(m) for m in self.measures
                   if not isinstance(m, str) or m not in MEASURES]
        if unknown:
            raise ConfigError(f"unknown measure(s) {', '.join(unknown)}; choose from "
                              f"{', '.join(MEASURES)}")
        if not self.measures:
            raise ConfigError("no measures asked for")
        twice = [m for i, m in enumerate(self.measures) if m in self.measures[:i]]
        if twice:  # scored (and drawn) twice in a study
            raise ConfigError(f"measure {twice[0]} is given twice")
        for k in ("steps", "restarts", "m", "trace_rank", "n_samples", "max_probes", "seed"):
            v = getattr(self, k)  # 2.5 had failed deep inside torch
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or not 0 <= v < 2**63:
                raise ConfigError(f"{k} must be an integer in [0, 2**63), got {v!r}")
        for k in ("rho", "rho_linf", "rho_adaptive", "sigma", "bound", "trace_rtol",
                  "eig_tol", "eta"):
            if not isinstance(getattr(self, k), numbers.Real) or isinstance(getattr(self, k),
                                                                             bool):
                raise ConfigError(f"{k} must be a number, got {getattr(self, k)!r}")
        for k in ("rho", "rho_linf", "rho_adaptive", "sigma", "bound", "trace_rtol",
                  "eig_tol"):
            v = getattr(self, k)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{k} must be a finite number > 0, got {v}")
        for k in ("steps", "restarts", "m", "trace_rank"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.n_samples < 2 or self.max_probes < 2:
            raise ConfigError("n_samples and max_probes must be >= 2")
        if not (self.eta >= 0 and math.isfinite(self.eta)):
            raise ConfigError(f"eta must be a finite number >= 0, got {self.eta}")
        if self.bn not in ("eval", "batch"):
            raise ConfigError(f"bn must be 'eval' or 'batch', got {self.bn!r}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    def without_measures(self) -> dict:
        """The settings that change a measure's value (the list of measures does not)."""
        d = self.to_dict()
        d.pop("measures")
        return d


def _eig(kind: str) -> Callable[[Objective, SharpnessConfig], Columns]:
    def run(obj, cfg):
        e = top_eigenvalues(CurvatureOperator(obj, kind), 1, cfg.eig_tol, seed=cfg.seed)
        return {"": e.values[:, 0].double(), "_residual": e.residuals[:, 0].double()}
    return run


def _trace(kind: str) -> Callable[[Objective, SharpnessConfig], Columns]:
    def run(obj, cfg):
        op = CurvatureOperator(obj, kind)
        t = hutchpp_trace(op, min(cfg.trace_rank, op.n - 1), rtol=cfg.trace_rtol,
                          n_probes=cfg.max_probes, seed=cfg.seed)
        return {"": t.estimate, "_ci_low": t.ci[:, 0], "_ci_high": t.ci[:, 1],
                "_stderr": t.stderr}
    return run


def _est(e) -> Columns:
    spread = {} if e.spread is None else {"_spread": e.spread}
    return {"": e.value, "_stderr": e.stderr, **spread}


MEASURES: dict[str, Callable[[Objective, SharpnessConfig], Columns]] = {
    "lambda_max": _eig("hessian"),
    "trace": _trace("hessian"),
    "ggn_lambda_max": _eig("ggn"),
    "ggn_trace": _trace("ggn"),
    "fisher_trace": _trace("fisher"),
    "worst_l2": lambda o, c: _est(worst_case_sharpness(
        o, c.rho, "l2", steps=c.steps, restarts=c.restarts, seed=c.seed)),
    "worst_linf": lambda o, c: _est(worst_case_sharpness(
        o, c.rho_linf, "linf", steps=c.steps, restarts=c.restarts, seed=c.seed)),
    "asam": lambda o, c: _est(worst_case_sharpness(
        o, c.rho_adaptive, "l2", adaptive=True, eta=c.eta, steps=c.steps,
        restarts=c.restarts, seed=c.seed)),
    "average": lambda o, c: _est(average_sharpness(o, c.sigma, c.n_samples, seed=c.seed)),
    "m_sharpness": lambda o, c: _est(m_sharpness(
        o, c.rho, c.m, steps=c.steps, restarts=c.restarts, seed=c.seed)),
    "pac_bayes_sigma": lambda o, c: {"": pac_bayes_sigma(o, c.bound, c.n_samples,
                                                         seed=c.seed)},
    "pac_bayes_sigma_mag": lambda o, c: {"": pac_bayes_sigma(
        o, c.bound, c.n_samples, adaptive=True, eta=c.eta, hi=10.0, seed=c.seed)},
}


def check_measurable(cfg: SharpnessConfig, n_train: int) -> None:
    """Refuse, before anything is computed, measures that ``n_train`` training points
    cannot give: ``m_sharpness`` needs ``m <= n_train``.

    Raises:
        ConfigError: ``cfg.m`` larger than the training set with ``m_sharpness`` asked.
    """
    if "m_sharpness" in cfg.measures and cfg.m > n_train:
        raise ConfigError(f"m_sharpness: m must be in [1, {n_train}] (the number of training "
                          f"points), got {cfg.m}")


def _check_fits(model: nn.Module, params: Params, buffers: Params | None,
                x: torch.Tensor, y: torch.Tensor) -> None:
    """One clear error for data that do not fit the model (input shape, labels)."""
    from torch.func import functional_call

    first = {k: v[0] for k, v in params.items()}  # member 0 is enough for shapes
    w0 = next(iter(first.values()))
    own = {k: v[0] for k, v in buffers.items()} if buffers else dict(model.named_buffers())
    bufs = {k: v.to(w0.device, w0.dtype if v.is_floating_point() else v.dtype)
            for k, v in own.items()}
    was = model.training
    model.eval()  # one input through BatchNorm: its running statistics
    try:
        with torch.no_grad():
            out = functional_call(model, {**first, **bufs}, (x[:2].to(w0),))
    except RuntimeError as e:
        raise ConfigError(f"the data do not fit the model: inputs of shape "
                          f"{tuple(x.shape[1:])} ({str(e).splitlines()[0][:120]})") from None
    finally:
        model.train(was)
    k = max(out.shape[-1], 2)  # one output: a binary logit, labels 0 and 1
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ConfigError(f"labels must be in [0, {k}) for the model's {out.shape[-1]} "
                          f"output(s), got {int(y.min())}..{int(y.max())}")


def measure_members(model: nn.Module, params: Params,
                    data: Dataset | tuple[torch.Tensor, torch.Tensor],
                    cfg: SharpnessConfig = SharpnessConfig(), buffers: Params | None = None,
                    done: dict[str, list[float]] | None = None,
                    on_measure: Callable[[str, Columns], None] | None = None) -> Columns:
    """Every measure of ``cfg.measures`` for every member of ``params`` ``(M, ...)``:
    ``{column: (M,) float64}``. Columns already in ``done`` are reused, not recomputed;
    ``on_measure(name, columns)`` is called after each new measure (to save progress).

    The curvature columns depend on the stack: Lanczos starts (``lambda_max``) and
    Hutch++ probes (the traces) are drawn as one block for all M members, and a trace
    stops when every member meets ``cfg.trace_rtol``, so the same member alone or in
    another stack gets another estimate within its interval (``trace`` 3.305 in a
    stack of 3, 3.331 alone; ``lambda_max`` near it, see the module docstring). Measure each member
    as a stack of one (:func:`~minefield.stacked.alone`, as an isolated sweep or study
    does) for numbers of its own. The sharpness columns (``worst_*``, ``asam``,
    ``average``, ``m_sharpness``, ``pac_bayes_*``) start every member from the same
    draws, so they do not depend on the stack (bit for bit: a stack of 3 and alone).

    Raises:
        NonFiniteLoss: some member's loss is NaN or infinite (checked first).
        ConfigError: e.g. a BatchNorm model in training mode under ``bn="eval"``, data
            that do not fit the model (input shape, labels outside its outputs), or
            ``m`` larger than the training set (:func:`check_measurable`): all before
            any measure is computed.
    """
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    p = {k: v.to(dtype) for k, v in params.items()}
    x, y = train_xy(data)
    check_measurable(cfg, len(y))
    obj = model_objective(model, p, data, buffers, cfg.bn)
    _check_fits(model, p, buffers, x, y)
    obj.check_finite()
    out: Columns = {k: torch.tensor(v, dtype=torch.float64) for k, v in (done or {}).items()}
    for name in cfg.measures:
        if name in out:
            continue
        cols = {name + suffix: v.detach().double().cpu()
                for suffix, v in MEASURES[name](obj, cfg).items()}
        out.update(cols)
        if on_measure is not None:
            on_measure(name, cols)
    return out
