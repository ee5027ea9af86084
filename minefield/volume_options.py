"""The options of a volume estimate, checked before anything is sampled.

One spelling per option (``--power 2.0`` and ``2`` are one result key), and a
:class:`~minefield.config.ConfigError` for an option the chosen estimator would not
read: it would change the result's key, never its numbers, so a study would count one
estimate twice under two names.

    >>> check_shape_options(Estimator.NAIVE, CurvatureKind.NONE, "2", 0.5, None)
    Traceback (most recent call last):
    ...
    minefield.options.ConfigError: volume.sigma is the gaussian estimator's; naive has none
"""

from __future__ import annotations

import dataclasses
import math

from .config import ConfigError
from .options import CurvatureKind, Estimator, option

__all__ = ["parse_power", "power_text", "check_shape_options", "check_owned_options",
           "parse_estimator", "OWNED_OPTIONS", "METHOD_OPTIONS"]


def parse_power(text: str | float, what: str = "power") -> float | str:
    """A proposal power: a number >= 1 (``"inf"`` too) or ``"auto"``; else ConfigError."""
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not value >= 1:
        raise ConfigError(f"{what} must be a number >= 1, 'inf' or 'auto', got {text!r}")
    return value


def power_text(power: float | str) -> str:
    """One spelling (one result key) per parsed power: ``"2.0"`` and ``"2"`` give ``"2"``.

    >>> [power_text(parse_power(t)) for t in ("2.0", "INF", "auto", "2.5")]
    ['2', 'inf', 'auto', '2.5']"""
    text = str(power) if power in ("auto", math.inf) else repr(float(power))
    return text.removesuffix(".0")


def check_shape_options(estimator: Estimator, preconditioner: CurvatureKind, power: str,
                        sigma: float | None, walk_length: int | None,
                        prefix: str = "volume.") -> None:
    """:class:`ConfigError` for a bad ``power`` / ``sigma`` / ``walk_length`` (of
    :class:`~minefield.basin.VolumeConfig`), or one the estimator would ignore: a proposal
    power shapes ``is`` and ``gaussian`` with a preconditioner, ``sigma`` is
    ``gaussian``'s, ``walk_length`` ``mcmc``'s (they used to change the result's key only).
    ``prefix`` starts each option's name in the messages."""
    shaped = estimator.value in ("is", "gaussian") and preconditioner is not CurvatureKind.NONE
    if parse_power(power, f"{prefix}power") != 2.0 and not shaped:
        raise ConfigError(f"{prefix}power {power!r} shapes the proposal of is or gaussian with "
                          f"a preconditioner; {estimator.value} with preconditioner "
                          f"'{preconditioner.value}' draws no such proposal")
    if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
        raise ConfigError(f"{prefix}sigma must be a positive number, got {sigma}")
    if sigma is not None and estimator is not Estimator.GAUSSIAN:
        raise ConfigError(f"{prefix}sigma is the gaussian estimator's; {estimator.value} has none")
    if walk_length is not None and not walk_length >= 1:
        raise ConfigError(f"{prefix}walk_length must be >= 1 (None: max(10, 2n)), "
                          f"got {walk_length}")
    if walk_length is not None and estimator is not Estimator.MCMC:
        raise ConfigError(f"{prefix}walk_length is mcmc's; {estimator.value} takes no walk")


#: options only one estimator reads; another refuses a value other than the default,
#: which would only change the result's key (``--method grid`` under ``is``, say)
OWNED_OPTIONS = {"method": "naive", "grid_points": "naive", "grid": "naive",
                 "grid_power": "naive", "bracket_points": "naive", "bracket_ratio": "naive",
                 "precision": "naive", "n_chains": "mcmc", "n_replicates": "mcmc"}


#: the naive estimator's options that only one radius method reads (``--grid-points 50``
#: under ``bisect`` gave the same radii under another key)
METHOD_OPTIONS = {"grid_points": "grid", "grid": "grid", "grid_power": "grid",
                  "bracket_points": "bisect", "bracket_ratio": "bisect"}


def check_owned_options(cfg) -> None:
    """:class:`ConfigError` when ``cfg`` (a :class:`~minefield.basin.VolumeConfig`) sets
    an option of :data:`OWNED_OPTIONS` that its estimator does not read, or one of
    :data:`METHOD_OPTIONS` that its radius method does not."""
    default = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name, owner in OWNED_OPTIONS.items():
        value = getattr(cfg, name)
        if cfg.estimator.value != owner and value != default[name]:
            raise ConfigError(f"volume.{name} {getattr(value, 'value', value)!r} is the "
                              f"{owner} estimator's option; {cfg.estimator.value} ignores it")
    for name, owner in METHOD_OPTIONS.items():
        value = getattr(cfg, name)
        if cfg.method.value != owner and value != default[name]:
            raise ConfigError(f"volume.{name} {getattr(value, 'value', value)!r} is the "
                              f"{owner} method's option; method {cfg.method.value} ignores it")


def parse_estimator(value: Estimator | str) -> Estimator:
    """``value`` as an :class:`Estimator`, or a :class:`ConfigError` naming the choices."""
    return option(Estimator, value, "estimator")
