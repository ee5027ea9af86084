"""Range checks shared by the stage configs: one-line :class:`ConfigError` s.

A config is checked when it is built (its ``_validate``), so a bad value is
refused before any file is written or any tensor allocated, from Python and
from the command line alike. ``where`` is the dotted field name the message
shows (``train.lr``).

Example::

    >>> positive("train.lr", float("nan"))
    Traceback (most recent call last):
    minefield.options.ConfigError: train.lr must be a finite number > 0, got nan
"""

from __future__ import annotations

import math
import os
from typing import Any

from .config import ConfigError

__all__ = ["finite", "positive", "non_negative", "at_least", "in_unit", "increasing_steps",
           "float32_schedule", "memory_limit_bytes", "check_memory", "model_size",
           "check_training_memory", "MAX_PARAMS", "FLOAT32_MAX", "fits_float32"]

#: Largest model accepted (parameters per member): 4 GB of float32 weights.
MAX_PARAMS = 10**9


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def finite(where: str, v: Any) -> None:
    """``v`` is a real number, not NaN or infinite (bools are not numbers here)."""
    if not _is_number(v) or not math.isfinite(v):
        raise ConfigError(f"{where} must be a finite number, got {v!r}")


def positive(where: str, v: Any) -> None:
    """``v`` is finite and > 0 (learning rates, clip norms, decay factors)."""
    if not _is_number(v) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{where} must be a finite number > 0, got {v!r}")


def non_negative(where: str, v: Any) -> None:
    """``v`` is finite and >= 0 (l2 coefficients, jitter)."""
    if not _is_number(v) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"{where} must be a finite number >= 0, got {v!r}")


def fits_float32(where: str, v: float) -> None:
    """``|v|`` fits a float32: a larger coefficient overflows the float32 tensor it fills
    (``connect --l2 1e300`` ended in a raw RuntimeError, "this is a bug")."""
    if abs(v) > FLOAT32_MAX:
        raise ConfigError(f"{where} = {v:.3g}: values above {FLOAT32_MAX:.3g} overflow float32")


def at_least(where: str, v: Any, low: int) -> None:
    """``v`` is an integer >= ``low``."""
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ConfigError(f"{where} must be an integer >= {low}, got {v!r}")


def in_unit(where: str, v: Any, closed: bool = True) -> None:
    """``v`` in [0, 1] (``closed``) or [0, 1)."""
    ok = _is_number(v) and 0.0 <= v and (v <= 1.0 if closed else v < 1.0)
    if not ok:
        raise ConfigError(f"{where} must be in [0, 1{']' if closed else ')'}, got {v!r}")


def increasing_steps(where: str, steps: Any) -> None:
    """Step counts: integers >= 0 in increasing order."""
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in steps):
        raise ConfigError(f"{where} must be step counts >= 0, got {tuple(steps)}")
    if list(steps) != sorted(steps):
        raise ConfigError(f"{where} must be increasing, got {tuple(steps)}")


#: ``torch.finfo(torch.float32).max``
FLOAT32_MAX = 3.4028234663852886e38


def float32_schedule(lr: float, gamma: float, n_milestones: int) -> None:
    """Every rate ``lr * gamma**k`` of the schedule (k = 0..n_milestones) fits a float32:
    a larger one overflows the optimiser's float32 tensors (a raw RuntimeError)."""
    for k in range(n_milestones + 1):
        try:
            rate = lr * gamma ** k
        except OverflowError:
            rate = math.inf
        if rate > FLOAT32_MAX:
            raise ConfigError(f"train.lr x train.gamma^{k} = {rate:.3g} after {k} "
                              f"milestone(s): rates above {FLOAT32_MAX:.3g} overflow float32")


def memory_limit_bytes() -> int:
    """80% of the machine's physical memory (what one command may plan to allocate)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 16 * 2**30
    return int(0.8 * total)


def check_memory(n_bytes: float, what: str, limit: int | None = None) -> None:
    """Refuse a plan that would need more than ``limit`` bytes (default: 80% of RAM).

    Example::

        >>> check_memory(2**40, "training 1 model", limit=2**30)
        Traceback (most recent call last):
        minefield.options.ConfigError: training 1 model needs about 1099.5 GB, more than the 1.1 GB this machine allows; use a smaller model or fewer members
    """  # noqa: E501
    limit = memory_limit_bytes() if limit is None else limit
    if n_bytes > limit:
        raise ConfigError(f"{what} needs about {n_bytes / 1e9:.1f} GB, more than the "
                          f"{limit / 1e9:.1f} GB this machine allows; use a smaller model or "
                          "fewer members")


def model_size(model_cfg: Any, input_shape: tuple[int, ...], n_classes: int
               ) -> tuple[int, int]:
    """``(parameters, activations per input point)`` of one model, without allocating it.

    The model is built and run on PyTorch's ``meta`` device, which records shapes
    only, so ``--widths 100000000`` costs nothing to size.

    Example::

        >>> from minefield.config import ModelConfig
        >>> model_size(ModelConfig(widths=(8,)), (2,), 2)  # 2*8+8 + 8+1; outputs 8, 8, 1
        (33, 17)
    """
    import torch

    from .models import MODELS, ModelError, n_outputs

    if model_cfg.name not in MODELS:
        raise ModelError(f"unknown model {model_cfg.name!r}; choose from "
                         f"{', '.join(sorted(MODELS))}")
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out[0].numel()

    with torch.device("meta"):
        model = MODELS[model_cfg.name](model_cfg, tuple(input_shape),
                                       n_outputs(n_classes, model_cfg.outputs))
        n_params = sum(p.numel() for p in model.parameters())
        leaves = [m for m in model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            model.eval()(torch.empty((1, *input_shape)))
        finally:
            for h in handles:
                h.remove()
    return n_params, total


def check_training_memory(model_cfg: Any, input_shape: tuple[int, ...], n_classes: int,
                          members: int, points: int, element_size: int = 4,
                          limit: int | None = None) -> int:
    """Refuse training that cannot fit; returns the estimated bytes.

    Per member: parameters, gradients, two optimizer moments, a frozen copy and a
    saved copy (6 x the parameters), plus about 3 x the activations of one forward
    pass on ``points`` points (forward values, their gradients, masks).

    Raises:
        ConfigError: more than :data:`MAX_PARAMS` parameters, or more memory than
            ``limit`` (default 80% of RAM); the message gives the numbers.
    """
    n_params, acts = model_size(model_cfg, input_shape, n_classes)
    if n_params > MAX_PARAMS:
        raise ConfigError(f"the model has {n_params:,} parameters, more than the "
                          f"{MAX_PARAMS:,} accepted; check model.widths")
    need = members * (6 * n_params + 3 * acts * points) * element_size
    check_memory(need, f"training {members} model(s) of {n_params:,} parameters on "
                       f"{points} points per step", limit)
    return need
