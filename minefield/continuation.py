"""The bad-minimum search's rules between checks: adaptive poison factor and continuation.

:func:`minefield.search.search_minima` trains a stack of members in segments of
``cfg.compact_every`` steps; at each check it reads the per-member log (train and
untraining-set accuracy, never the test set) and applies these rules
(:class:`~minefield.search_config.SearchConfig` documents the settings):

- **adaptive poison factor** (:func:`_adapt_betas`): from ``adapt_from`` until the first
  learning-rate milestone, a member whose true-label accuracy on the untraining set is
  above ``poison_cap`` gets ``beta <- min(beta + beta_step, beta_max)``;
- **continuation** past the schedule's end (``train.steps``), for at most
  ``extra_steps`` more steps with the learning rate replaying the schedule's tail
  (:func:`_segment`). A member below ``continue_below`` train accuracy lowers its
  ``beta`` by ``continue_beta_step`` per check and keeps its best check by train
  accuracy with untraining-set accuracy within ``max(poison_cap, its own at the end)``
  (:func:`_poison_limits`, :func:`_admissible`); a member still above ``poison_cap``
  (``dirty``, :func:`_continuation_modes`) raises its ``beta`` instead and keeps its
  check with the lowest untraining-set accuracy among those with train accuracy at
  least ``min(its own at the end, continue_below)``;
- **retries** after the last check (:func:`_failed`, :func:`_better`): a member still
  above ``poison_cap`` is searched again from its start moved by ``retry_jitter``
  (seeded by :func:`retry_seed`), and the attempt with the least untraining-set
  accuracy above the cap, then the best train accuracy, is kept.

All functions take and return ``(m,)`` tensors over the active members.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import TrainConfig
from .search_config import SearchConfig
from .train import TrainingDiverged


def _segment(tc: TrainConfig, cfg: SearchConfig, step: int, end: int) -> TrainConfig:
    """Training config of the segment ``[step, end)``; past ``cfg.steps`` (continuation)
    the learning rate replays the schedule's last ``cfg.extra_steps`` steps."""
    seg = tc.replace(steps=end, checkpoint_every=end)
    if step < cfg.steps:
        return seg
    return seg.replace(milestones=tuple(s + cfg.extra_steps for s in tc.milestones))


def _logged(history: list[dict[str, Any]], step: int, key: str, m: int,
            missing: float) -> torch.Tensor:
    """``(m,)`` float64: each member's ``key`` logged at ``step``; ``missing`` for a member
    absent from that log (it stopped earlier, at its target)."""
    acc = {r["member"]: r[key] for r in history if r["step"] == step}
    return torch.tensor([acc.get(i, missing) for i in range(m)], dtype=torch.float64)


def _trained_enough(cfg: SearchConfig, history: list[dict[str, Any]], step: int,
                    m: int) -> torch.Tensor:
    """``(m,)`` bool: members that need no continuation at ``step`` (train accuracy at
    least ``cfg.continue_below``, or continuation off)."""
    if cfg.continue_below is None or step >= cfg.steps + cfg.extra_steps:
        return torch.ones(m, dtype=torch.bool)
    return _logged(history, step, "train_acc", m, 1.0) >= cfg.continue_below - 1e-9


def _cap(cfg: SearchConfig) -> float:
    return 0.0 if cfg.poison_cap is None else cfg.poison_cap


def _poison_limits(cfg: SearchConfig, history: list[dict[str, Any]], step: int,
                   m: int) -> torch.Tensor:
    """``(m,)``: the untraining-set accuracy each member may reach while it continues:
    the larger of ``cfg.poison_cap`` and its own at the schedule's end (``step``)."""
    return _logged(history, step, "poison_acc", m, 0.0).clamp(min=_cap(cfg))


def _continuation_modes(cfg: SearchConfig, history: list[dict[str, Any]], step: int,
                        m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(floor (m,), dirty (m,) bool)`` at the schedule's end (``step``): members whose
    untraining-set accuracy is above ``cfg.poison_cap`` (``dirty``; only with continuation,
    a cap and ``cfg.continue_poison``) continue with a rising poison factor and must keep
    the train accuracy ``floor``, the smaller of their own and ``cfg.continue_below``."""
    acc = _logged(history, step, "train_acc", m, 1.0)
    if cfg.continue_below is None or cfg.poison_cap is None or not cfg.continue_poison:
        return acc, torch.zeros(m, dtype=torch.bool)
    dirty = _logged(history, step, "poison_acc", m, 0.0) > cfg.poison_cap + 1e-9
    return acc.clamp(max=cfg.continue_below), dirty


def _admissible(history: list[dict[str, Any]], step: int, limit: torch.Tensor) -> torch.Tensor:
    """``(m,)`` bool: members whose untraining-set accuracy at ``step`` is within ``limit``
    (a member missing from the log stopped earlier, at its target: admissible)."""
    return _logged(history, step, "poison_acc", len(limit), 0.0) <= limit + 1e-9


def _adapt_betas(cfg: SearchConfig, betas: torch.Tensor, active: torch.Tensor,
                 keep: torch.Tensor, history: list[dict[str, Any]], step: int) -> None:
    """Raise the poison factor of members still above ``cfg.poison_cap`` at ``step``.

    Only the untraining set's accuracy is looked at (never the test set), only in
    ``[cfg.adapt_from, cfg.adapt_until)``, and by ``cfg.beta_step`` up to ``cfg.beta_max``.
    """
    if cfg.poison_cap is None or not cfg.adapt_from <= step < cfg.adapt_until:
        return
    acc = _logged(history, step, "poison_acc", len(active), 0.0)
    over = [i for i in keep.tolist() if acc[i] > cfg.poison_cap + 1e-9]
    if over:
        idx = active[over]
        betas[idx] = torch.maximum(betas[idx], (betas[idx] + cfg.beta_step).clamp(max=cfg.beta_max))


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of a search's ``attempt``-th retry (its own, whatever the stack)."""
    return (seed * 1_000_033 + 7_919 * attempt) % (2**63 - 1)


def _search_diverged(step: int) -> TrainingDiverged:
    """A searched model's loss became NaN/inf: seeded, so a rerun diverges again."""
    return TrainingDiverged(f"loss became NaN/inf at step {step} (a searched model): "
                            "lower --lr or pass --clip")


def _failed(cfg: SearchConfig, metrics: dict[str, torch.Tensor]) -> list[int]:
    """Members whose untraining-set accuracy is still above ``cfg.poison_cap`` at the end
    (none without a cap)."""
    if cfg.poison_cap is None:
        return []
    return (metrics["poison_acc"] > cfg.poison_cap + 1e-9).nonzero().flatten().tolist()


def _better(cfg: SearchConfig, old: dict[str, torch.Tensor],
            new: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(m,)`` bool: attempts ``new`` better than ``old``: less untraining-set accuracy
    above the cap, or as little and more train accuracy."""
    over_old = (old["poison_acc"] - _cap(cfg)).clamp(min=0)
    over_new = (new["poison_acc"] - _cap(cfg)).clamp(min=0)
    tie = (over_new - over_old).abs() <= 1e-12
    return (over_new < over_old - 1e-12) | (tie & (new["train_acc"] > old["train_acc"] + 1e-12))
