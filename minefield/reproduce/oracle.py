"""Check 9: the volume estimator against the closed form of a quadratic bowl."""

from __future__ import annotations

import math

import torch

from ..basin import find_radii, log10_volume
from .common import Check, Context, Section

__all__ = ["exp_volume_oracle"]


def exp_volume_oracle(ctx: Context) -> Section:
    """L = a/2 ||theta||^2 with unit directions: r = sqrt(2c/a), V = omega_n r^n exactly."""
    a, c, n, k = 3.0, 1.0, 3457, 500
    g = torch.Generator().manual_seed(0)
    d = torch.randn(k, n, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True)

    def loss_fn(ts: torch.Tensor) -> torch.Tensor:
        pts = ts.reshape(k, -1, 1) * d[:, None, :]  # (k, T, n): points theta + t d
        return (0.5 * a * pts.pow(2).sum(-1)).reshape(ts.shape)

    r, _ = find_radii(loss_fn, k, c, 1.0, 1e-6, "bisect", 100, "power", 5.0, 12, 0.0)
    r_true = math.sqrt(2 * c / a)
    ln_ball = n / 2 * math.log(math.pi) - math.lgamma(n / 2 + 1) + n * math.log(r_true)
    got = log10_volume(r, n)
    err = abs(got - ln_ball / math.log(10))
    sec = Section("oracle", "Check 9: the volume estimator on a quadratic bowl", [
        "pytest tests/test_basin.py"])
    sec.numbers.append(("max |r - sqrt(2c/a)|", f"{float((r - r_true).abs().max()):.2e}",
                        "0 (exact)"))
    sec.numbers.append((f"log10 V vs log10 of the {n}-ball", f"{got:.4f} vs "
                        f"{ln_ball / math.log(10):.4f}", "equal"))
    sec.checks.append(Check("9", "quadratic bowl: r = sqrt(2c/a), log V = log(omega_n r^n)",
                            err < 1e-2 and float((r - r_true).abs().max()) < 1e-5,
                            f"|error| in log10 V {err:.1e}"))
    return sec


