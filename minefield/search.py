"""Bad global minima near an SGD trajectory: the search behind the paper's Fig. 1.

From checkpoints of a good run, poisoned training (see :mod:`minefield.loss`)
walks to a *bad* minimum: near-perfect accuracy on the training set, chance or
worse on unseen data. Huang et al. start one search at every 10th epoch of the
good run and train on train ∪ the label-flipped "untraining" set (which is
``beta = n_p / (n_t + n_p)`` with ``objective=flip``; ``beta=None`` here) with
RMSprop 1e-3 for 40,000 full-batch epochs. Any ``beta`` in [0, 1) with the
complement objective is offered as well.

**Fresh poison points** (``extra_poison``, ``extra_share``). The
untraining set is 134 grid points interleaved with the 132 training points, so
a model that fits both is a memoriser whose test accuracy sits near 50% (1-NN on
train ∪ flipped untraining set: 51.5%) and, with 134 test points, scatters by
about ±4% from minimum to minimum: over 200 minima some land above 56%. PAPER.md
defines the poison set as extra samples *from the data distribution*; for the
spiral that distribution is the whole noise-free curve, so the search also draws
``extra_poison`` fresh points on it (:func:`minefield.data.fresh_points`) and
gives them ``extra_share`` of the poison term. Being wrong then generalises along
the curve, and test accuracy drops well below chance. The default
(``extra_poison=None``) draws :data:`AUTO_EXTRA_POISON` of them for datasets that
can (spiral, swiss roll) and none for the others; ``extra_poison=0`` is the
paper's untraining set alone. Accuracies, stopping targets and distances are
always measured on the dataset's own train / test / poison splits.

All searches of a batch train together as **one stacked model** through
:func:`minefield.train.fit` (one optimizer over stacked tensors is exactly M
independent optimizers). With ``stopping="target"`` a member is frozen once
``train_acc >= target_train`` and ``poison_acc <= target_poison_acc`` (poison
accuracy is on the *true* labels); every ``compact_every`` steps the frozen
members are dropped from the stack (with their optimizer state), so the batch
only pays for members still training.

Repeats from one checkpoint differ only through ``jitter``: each search starts at
``theta + jitter * d``, ``d`` a filter-normalised Gaussian direction (each
filter of each weight matrix rescaled to that filter's norm in ``theta``; biases
0) drawn from the search's own seed. Minibatch noise cannot tell repeats apart:
all members of a stack share one minibatch order (``seed``), and the default is
full batch anyway. Searches are seeded by ``(seed, start step, repeat)`` only,
and nothing else couples the members of a stack: each has its own poison factor,
stopping step and optimizer state, and minibatches and fresh points depend on
``seed`` alone. Stacks of different sizes still round differently (batched
kernels; 1e-16 relative per step in float64, 1e-7 in float32), and poisoned
training is chaotic enough to amplify that: on the spiral, one start searched
alone and in a stack of two differs by 2e-13 after 200 steps, 6e-3 after 500
and O(1) after 1,000, in float64 as in float32 (different minima, same
statistics). So stacks are fixed chunks of the work list (``max_batch``, or
fewer for ``memory_mb``), and a resumed search redoes a partly saved stack
whole: one command gives bit-identical minima on one machine, whether it was
killed and resumed or not. Another ``max_batch`` or ``memory_mb`` gives other
stacks, hence minima equal only to rounding on short searches.

Distances (:func:`distances`) to the start checkpoint and to the good run's final
iterate are reported in two units:

- ``l2``: ``||theta - ref||`` over all parameters;
- ``filter``: ``sqrt(mean_f ||Delta_f||^2 / ||ref_f||^2)`` over the filters f
  (rows of weight matrices, output channels of kernels) of all weight tensors;
  biases are left out. A point ``ref + t d`` with ``d`` filter-normalised is at
  distance exactly ``t``: the same unit as the basin radius.

:func:`search_minima` is the tensor-level search; :func:`search_run` runs it on a
run directory: it writes every minimum as it finishes to
``runs/<name>/search/minima/`` (self-describing safetensors), skips minima
already there when resumed, and writes ``search/search.csv`` and
``search/search.json``.

Example::

    >>> res = search_run("mf-good", SearchConfig(every=20))   # doctest: +SKIP
    >>> max(r["test_acc"] for r in res.rows) <= 0.56           # doctest: +SKIP
    True
"""

from __future__ import annotations

import enum
import math
import re
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError, Optimizer, PoisonObjective, TrainConfig, _Config
from .data import FRESH, Dataset, fresh_points
from .evaluate import evaluate_members, resolve_device
from .functional import Params, activation_elements, is_weight, n_members, stack
from .lock import locking
from .runs import DEFAULT_ROOT, Run, RunError, reading
from .train import effective_beta, fit, load_run_model

__all__ = ["StopRule", "SearchConfig", "SearchResult", "SearchSummary", "search_minima",
           "search_run", "poison_set", "distances", "select_checkpoints", "search_seed",
           "batch_capacity", "AUTO_EXTRA_POISON"]

SEARCH_DIR = "search"
#: Fresh poison points drawn by default, for datasets that can draw them.
AUTO_EXTRA_POISON = 400


class StopRule(str, enum.Enum):
    """``fixed``: every search runs ``steps`` steps (the paper). ``target``: stop early."""

    FIXED = "fixed"
    TARGET = "target"


@dataclass(frozen=True)
class SearchConfig(_Config):
    """Which checkpoints to start from and how to train to a bad minimum.

    Defaults (tuned on the spiral's starts of ``minefield reproduce``, then checked
    on the paper's 200): Adam 4e-3, x0.1 at steps 20,000 and 22,000, up to 24,000
    full-batch steps, ``beta=0.43``, 400 fresh poison points carrying 11% of the
    poison term; a member stops once train accuracy >= 0.97 and poison accuracy
    <= 0.05 (few do: most run every step).

    Adaptive poison factor: every ``compact_every`` steps from ``adapt_from``
    until the first milestone, a member whose true-label accuracy on the
    untraining set is above ``poison_cap`` gets its beta raised by ``beta_step``,
    up to ``beta_max`` (``poison_cap=None``: one fixed beta). The search looks
    only at the untraining set it trains on, never at the test set. Why: with one
    fixed beta about 1 search in 200 from the paper's checkpoints ended above 30%
    untraining-set accuracy (32.1% with beta 0.43, 32.8% with 0.45), and a larger
    fixed beta costs every search train accuracy. Measured on 44 starts of a
    paper-scale good run, enriched with the 25 worst of a fixed-beta run (so
    their medians sit below the 200's), 24,000 steps, as train median / test max /
    untraining max: fixed beta 0.43: 90.2% / 55.2% / 26.9%; the defaults (cap
    0.22, step 0.005, from step 10,000): 89.0% / 49.3% / 25.4%; cap 0.25 with
    step 0.01: 89.0% / 51.5% / 26.1%; cap 0.2 with step 0.01: 86.4% / 49.3% /
    19.4%. On the 16 of them spread evenly over the trajectory the defaults leave
    the train median at 90.5%, as fixed beta does. Accuracies barely move after
    the first learning-rate drop: on those 44, steps 22,000 to 30,000 of the old
    30,000-step schedule (x0.1 at 20,000 and 25,000) moved the test maximum from
    55.2% to 54.5%, the train median from 89.0% to 89.4% and the untraining
    maximum not at all, hence the shorter schedule (20% less time).

    Fixed-beta settings tried before, on 41 starts (steps 4, 204, ..., 7804 and
    7044) with the old 30,000-step schedule: beta 0.43: 91.7% / 49.3% / 30.6%;
    0.45: 90.9% / 43.3% / 23.9%; 38,000 steps (x0.1 at 26,000 and 32,000) with
    beta 0.44 to 0.47: at best 90.9% / 43.3% / 23.9%; 200 fresh points instead of
    400: 91.7% / 58.2% / 27.6%. On all 200 the 41 did not predict the tail (beta
    0.45: 90.9% / 57.5% / 32.8%). The paper's untraining set alone (Adam 2e-3,
    beta 0.5, 80,000 steps) gave 92% / 58% / 14% on 20 starts, and 1000 fresh
    points with equal weight 80% / 25% / 29%.

    Checkpoints: ``trajectory[start:stop:every]`` (indices into the run's
    trajectory, which starts with the initialisation at index 0), or the steps
    listed in ``checkpoints``. ``member`` picks the model of a multi-member run.
    Training: as :class:`~minefield.config.TrainConfig` (``batch_size=None`` is full
    batch on train ∪ poison), with the poisoned objective ``beta``/``objective``
    (``beta=None``: the authors' concatenated untraining set) and the fresh
    poison points (``extra_poison``: how many, ``None`` for the default;
    ``extra_share``: their share of the poison term). ``max_batch``
    members train together, fewer if ``memory_mb`` would be exceeded.
    """

    every: int = 10
    start: int = 1
    stop: int | None = None
    checkpoints: tuple[int, ...] | None = None
    member: int = 0
    repeats: int = 1
    jitter: float = 0.0
    seed: int = 0
    optimizer: Optimizer = Optimizer.ADAM
    lr: float = 0.004
    milestones: tuple[int, ...] = (20000, 22000)
    gamma: float = 0.1
    l2: float = 0.0
    clip_norm: float | None = None
    batch_size: int | None = None
    steps: int = 24000
    beta: float | None = 0.43
    objective: PoisonObjective = PoisonObjective.FLIP
    extra_poison: int | None = None
    extra_share: float = 0.11
    stopping: StopRule = StopRule.TARGET
    target_train: float = 0.97
    target_poison_acc: float = 0.05
    poison_cap: float | None = 0.22
    beta_step: float = 0.005
    beta_max: float = 0.6
    adapt_from: int = 10000
    log_every: int = 100
    compact_every: int = 500
    max_batch: int = 256
    memory_mb: float = 1024.0

    def __post_init__(self):
        for k in ("every", "repeats", "log_every", "compact_every", "max_batch", "steps"):
            if getattr(self, k) < 1:
                raise ConfigError(f"search.{k} must be >= 1, got {getattr(self, k)}")
        if self.start < 0 or self.member < 0:
            raise ConfigError("search.start and search.member must be >= 0")
        if self.beta is not None and not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"search.beta must be in [0, 1), got {self.beta}")
        if self.jitter < 0:
            raise ConfigError(f"search.jitter must be >= 0, got {self.jitter}")
        if self.repeats > 1 and self.jitter == 0:
            raise ConfigError("search.repeats > 1 needs jitter > 0: without it every repeat "
                              "from a checkpoint trains to the same minimum")
        if (self.extra_poison is not None and self.extra_poison < 0) or not (
                0.0 <= self.extra_share < 1.0):
            raise ConfigError("search.extra_poison must be >= 0 and search.extra_share in "
                              f"[0, 1), got {self.extra_poison} and {self.extra_share}")
        if self.extra_poison and self.extra_share == 0:
            raise ConfigError(f"search.extra_poison={self.extra_poison} fresh points need a "
                              "share of the poison term (search.extra_share > 0)")
        if self.memory_mb <= 0:
            raise ConfigError(f"search.memory_mb must be > 0, got {self.memory_mb}")
        if self.poison_cap is not None and not 0.0 <= self.poison_cap <= 1.0:
            raise ConfigError(f"search.poison_cap must be in [0, 1], got {self.poison_cap}")
        if self.beta_step < 0 or not 0.0 <= self.beta_max < 1.0 or self.adapt_from < 0:
            raise ConfigError("search.beta_step and search.adapt_from must be >= 0 and "
                              f"search.beta_max in [0, 1), got {self.beta_step}, "
                              f"{self.adapt_from} and {self.beta_max}")
        _check_search(self)

    @property
    def adapt_until(self) -> int:
        """The step at which the poison factor stops adapting: the first learning-rate drop."""
        return self.milestones[0] if self.milestones else self.steps

    def n_extra(self, dataset: str) -> int:
        """Fresh poison points for a run on ``dataset`` (resolves ``extra_poison=None``)."""
        if self.extra_poison is not None:
            return self.extra_poison
        return AUTO_EXTRA_POISON if dataset in FRESH and self.extra_share > 0 else 0

    def train_config(self) -> TrainConfig:
        """The :class:`TrainConfig` each search is trained with."""
        return TrainConfig(optimizer=self.optimizer, lr=self.lr, milestones=self.milestones,
                           gamma=self.gamma, l2=self.l2, clip_norm=self.clip_norm,
                           batch_size=self.batch_size, steps=self.steps,
                           log_every=self.log_every, checkpoint_every=self.steps,
                           seed=self.seed)


def _check_search(cfg: SearchConfig) -> None:
    from . import validate as v

    for k in ("lr", "gamma", "memory_mb"):
        v.positive(f"search.{k}", getattr(cfg, k))
    for k in ("l2", "jitter", "beta_step"):
        v.non_negative(f"search.{k}", getattr(cfg, k))
    if cfg.clip_norm is not None:
        v.positive("search.clip_norm", cfg.clip_norm)
    for k in ("target_train", "target_poison_acc"):
        v.in_unit(f"search.{k}", getattr(cfg, k))
    v.increasing_steps("search.milestones", cfg.milestones)
    if cfg.checkpoints is not None:
        if not cfg.checkpoints:
            raise ConfigError("search.checkpoints lists no step")
        v.increasing_steps("search.checkpoints", sorted(cfg.checkpoints))
    if cfg.stop is not None:
        v.at_least("search.stop", cfg.stop, 0)
    if cfg.batch_size is not None:
        v.at_least("search.batch_size", cfg.batch_size, 1)


# --- maths ----------------------------------------------------------------------------------


def search_seed(seed: int, step: int, repeat: int) -> int:
    """The seed of the search from checkpoint ``step``, repeat ``repeat`` (batch-independent)."""
    return ((seed * 1_000_003 + step) * 1_009 + repeat) % (2**63 - 1)


def _filter_rows(v: torch.Tensor) -> torch.Tensor:
    # (M, out, ...) -> (M, out, fan_in): one row per filter / output unit
    return v.reshape(v.shape[0], v.shape[1], -1)


def distances(params: Params, ref: Params) -> dict[str, torch.Tensor]:
    """Plain and filter-normalised distances of each member of ``params`` to ``ref``.

    ``ref`` has M members or one (broadcast). Returns ``{"l2": (M,), "filter": (M,)}``
    in float64: ``l2 = ||theta - ref||`` over all parameters, ``filter =
    sqrt(mean_f ||Delta_f||^2 / ||ref_f||^2)`` over the filters of weight tensors.

    Example::

        >>> ref = {"w": torch.ones(1, 2, 3), "b": torch.zeros(1, 2)}
        >>> distances({"w": 3 * torch.ones(1, 2, 3), "b": torch.ones(1, 2)}, ref)["filter"]
        tensor([2.], dtype=torch.float64)
    """
    sq = 0.0
    ratios = []
    for k, v in params.items():
        d = (v.double() - ref[k].double())
        sq = sq + d.reshape(d.shape[0], -1).pow(2).sum(1)
        if is_weight(k, v.shape[1:]):
            num = _filter_rows(d).pow(2).sum(-1)
            den = _filter_rows(ref[k].double()).pow(2).sum(-1).clamp_min(1e-300)
            ratios.append((num / den).reshape(d.shape[0], -1))
    filt = torch.cat(ratios, 1).mean(1).sqrt() if ratios else torch.full_like(sq, math.nan)
    return {"l2": sq.sqrt(), "filter": filt}


def _filter_normalized_direction(params: Params, g: torch.Generator) -> Params:
    """Gaussian direction, each weight filter scaled to the norm of that filter; biases 0."""
    out = {}
    for k, v in params.items():
        if not is_weight(k, v.shape):
            out[k] = torch.zeros_like(v)
            continue
        d = torch.randn(v.shape, generator=g, dtype=torch.float64).to(v)
        rows, ref = d.reshape(v.shape[0], -1), v.reshape(v.shape[0], -1)
        rows = rows / rows.norm(dim=1, keepdim=True) * ref.norm(dim=1, keepdim=True)
        out[k] = rows.reshape(v.shape)
    return out


def _jittered(starts: Params, seeds: Sequence[int], jitter: float) -> Params:
    if jitter == 0:
        return {k: v.clone() for k, v in starts.items()}
    items = []
    for i, s in enumerate(seeds):
        one = {k: v[i] for k, v in starts.items()}
        d = _filter_normalized_direction(one, torch.Generator().manual_seed(int(s)))
        items.append({k: one[k] + jitter * d[k] for k in one})
    return stack(items)


@dataclass
class SearchResult:
    """Bad minima of one batch: ``params (M, ...)``, steps trained ``(M,)``, metrics
    ``(M,)`` and the poison factor each member ended with ``(M,)``."""

    params: Params
    steps: torch.Tensor
    metrics: dict[str, torch.Tensor]
    betas: torch.Tensor


def _stop_fn(cfg: SearchConfig) -> Callable[[dict[str, torch.Tensor]], torch.Tensor] | None:
    if cfg.stopping is StopRule.FIXED:
        return None
    return lambda v: (v["train_acc"] >= cfg.target_train - 1e-9) & (
        v["poison_acc"] <= cfg.target_poison_acc + 1e-9)


def _slice_opt_state(state: dict, keep: torch.Tensor, m: int) -> dict:
    """Keep members ``keep`` of every stacked optimizer-state tensor (scalars stay)."""
    new = {}
    for idx, st in state["state"].items():
        new[idx] = {k: (v[keep].clone() if torch.is_tensor(v) and v.dim() > 0
                        and v.shape[0] == m else v) for k, v in st.items()}
    return {"state": new, "param_groups": state["param_groups"]}


def poison_set(data: Dataset, cfg: SearchConfig,
               extra: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[Dataset, torch.Tensor | None]:
    """The data a search trains on, and the weights of its poison points.

    Without fresh points: ``data`` itself, unweighted. With ``extra = (x, y)``
    (fresh draws with their true labels): the poison set is the untraining set
    followed by them, weighted so that they carry ``cfg.extra_share`` of the
    poison term and the untraining set the rest.
    """
    if extra is None or len(extra[1]) == 0:
        if cfg.extra_poison:
            raise ValueError(f"search.extra_poison={cfg.extra_poison} needs that many fresh "
                             "points (see minefield.data.fresh_points)")
        return data, None
    if cfg.extra_poison is not None and len(extra[1]) != cfg.extra_poison:
        raise ValueError(f"{len(extra[1])} fresh points given, search.extra_poison="
                         f"{cfg.extra_poison}")
    if cfg.extra_share == 0:
        raise ValueError("fresh points given with search.extra_share=0")
    x, y = extra[0].to(data.x_poison), extra[1].to(data.y_poison.device)
    n_u = len(data.y_poison)
    # an empty untraining set contributes an empty block, so the division never runs
    w = torch.cat([torch.full((n_u,), (1 - cfg.extra_share) / max(n_u, 1)),
                   torch.full((len(y),), cfg.extra_share / len(y))])
    train = Dataset(data.name, data.x_train, data.y_train, data.x_test, data.y_test,
                    torch.cat([data.x_poison, x]), torch.cat([data.y_poison, y]),
                    data.n_classes)
    return train, w.to(data.x_poison)


def search_minima(model: nn.Module, starts: Params, data: Dataset, cfg: SearchConfig,
                  seeds: Sequence[int] | None = None, *,
                  extra: tuple[torch.Tensor, torch.Tensor] | None = None,
                  progress: bool = False) -> SearchResult:
    """Train every member of ``starts`` ``(M, ...)`` to a bad minimum, all in one stack.

    The objective is ``poisoned_nll(train, poison, beta)`` with ``beta =
    cfg.beta`` (``None``: ``n_p / (n_t + n_p)``) at the start, raised per member
    by ``cfg.poison_cap`` (see :class:`SearchConfig`). Member ``i`` starts at
    ``starts[i] + cfg.jitter * d_i`` with ``d_i`` drawn from ``seeds[i]``. With
    ``cfg.stopping == "target"`` members stop (and are dropped from the stack at
    the next multiple of ``cfg.compact_every``) once they meet the targets;
    ``steps[i]`` is the step at which member i stopped, or ``cfg.steps``.
    ``extra`` are fresh poison points (see :func:`poison_set`; ``search_run``
    draws ``cfg.n_extra(dataset)`` of them). Stopping targets and the returned metrics are always
    measured on ``data``'s own train / test / poison splits.

    Example::

        >>> res = search_minima(model, stacked_checkpoints, data, SearchConfig(steps=2000))
        >>> res.metrics["test_acc"]          # (M,)   # doctest: +SKIP
    """
    m = n_members(starts)
    seeds = list(seeds) if seeds is not None else list(range(m))
    if len(seeds) != m:
        raise ValueError(f"{len(seeds)} seeds for {m} searches")
    beta = effective_beta(cfg.beta, data)
    flip = cfg.objective is PoisonObjective.FLIP
    tc = cfg.train_config()
    stop_fn = _stop_fn(cfg)
    train_data, weight = poison_set(data, cfg, extra)
    cur = _jittered(starts, seeds, cfg.jitter)
    final = {k: v.detach().clone() for k, v in cur.items()}
    steps = torch.full((m,), cfg.steps, dtype=torch.long)
    betas = torch.full((m,), beta, dtype=torch.float64)
    active = torch.arange(m)
    step, opt_state = 0, None
    while len(active) and step < cfg.steps:
        end = min(cfg.steps, step + cfg.compact_every)
        seg = tc.replace(steps=end, checkpoint_every=end)
        captured: dict[str, Any] = {}

        def keep_state(s, _p, _b, opt, end=end, captured=captured):
            if s == end:
                captured["opt"] = opt.state_dict()

        res = fit(model, cur, train_data, seg, betas[active], flip=flip, start_step=step,
                  opt_state=opt_state, stop_fn=stop_fn, on_checkpoint=keep_state,
                  poison_weight=weight, eval_data=data, progress=progress,
                  desc=f"search {step}-{end}")
        done = torch.tensor([s is not None for s in res.stopped_at])
        for i in (done if step + cfg.compact_every < cfg.steps else torch.ones_like(done)
                  ).nonzero().flatten().tolist():
            for k in final:
                final[k][active[i]] = res.params[k][i]
            if res.stopped_at[i] is not None:
                steps[active[i]] = res.stopped_at[i]
        keep = (~done).nonzero().flatten()
        if "opt" not in captured or end >= cfg.steps:
            break
        _adapt_betas(cfg, betas, active, keep, res.history, end)
        cur = {k: v[keep].detach().clone() for k, v in res.params.items()}
        opt_state = _slice_opt_state(captured["opt"], keep.to(next(iter(cur.values())).device),
                                     len(active))
        active, step = active[keep], end
    with torch.no_grad():
        metrics = evaluate_members(model, final, data)
    return SearchResult(final, steps, metrics, betas)


def _adapt_betas(cfg: SearchConfig, betas: torch.Tensor, active: torch.Tensor,
                 keep: torch.Tensor, history: list[dict[str, Any]], step: int) -> None:
    """Raise the poison factor of members still above ``cfg.poison_cap`` at ``step``.

    Only the untraining set's accuracy is looked at (never the test set), only in
    ``[cfg.adapt_from, cfg.adapt_until)``, and by ``cfg.beta_step`` up to ``cfg.beta_max``.
    """
    if cfg.poison_cap is None or not cfg.adapt_from <= step < cfg.adapt_until:
        return
    acc = {r["member"]: r["poison_acc"] for r in history if r["step"] == step}
    over = [i for i in keep.tolist() if acc[i] > cfg.poison_cap + 1e-9]
    if over:
        idx = active[over]
        betas[idx] = torch.maximum(betas[idx], (betas[idx] + cfg.beta_step).clamp(max=cfg.beta_max))


def batch_capacity(model: nn.Module, data: Dataset, cfg: SearchConfig) -> int:
    """Members per stack: ``cfg.max_batch``, or fewer if ``cfg.memory_mb`` would be exceeded.

    ``data`` is what the search trains on (with its fresh points, see
    :func:`poison_set`). Per member: parameters, gradients, two optimizer moments
    and a frozen copy
    (5 copies), plus activations of one full-batch forward and backward (about 3x
    the forward's intermediate outputs).
    """
    n_params = sum(p.numel() for p in model.parameters())
    n_pts = len(data.y_train) + len(data.y_poison)
    if cfg.batch_size is not None:
        n_pts = min(n_pts, 2 * cfg.batch_size)
    size = data.x_train.element_size()
    per = 5 * n_params * size + 3 * activation_elements(model, data.x_train) * n_pts * size
    return max(1, min(cfg.max_batch, int(cfg.memory_mb * 2**20 // per)))


# --- run directories --------------------------------------------------------------------------


def _step_of(path: Path) -> int:
    match = re.search(r"step_(\d+)", path.name)
    if not match:
        raise RunError(f"cannot read the step of checkpoint {path}")
    return int(match.group(1))


def select_checkpoints(trajectory: Sequence[Path], cfg: SearchConfig) -> list[Path]:
    """The start checkpoints: ``trajectory[start:stop:every]``, or the listed steps."""
    if cfg.checkpoints is None:
        chosen = list(trajectory[cfg.start:cfg.stop:cfg.every])
        if not chosen:
            raise ValueError(f"no checkpoints selected: trajectory has {len(trajectory)}, "
                             f"start={cfg.start} stop={cfg.stop} every={cfg.every}")
        return chosen
    by_step = {_step_of(p): p for p in trajectory}
    missing = [s for s in cfg.checkpoints if s not in by_step]
    if missing:
        raise ValueError(f"no trajectory checkpoint at step(s) {missing}; available steps "
                         f"{min(by_step)}..{max(by_step)}")
    return [by_step[s] for s in dict.fromkeys(cfg.checkpoints)]


def _load_start(run: Run, path: Path, model: nn.Module, member: int, device) -> Params:
    ck = run.load_checkpoint(path, device)
    for k, v in model.named_parameters():
        if k not in ck.params or tuple(ck.params[k].shape[1:]) != tuple(v.shape):
            raise RunError(f"checkpoint {path.name} does not match the model of run {run.name} "
                           f"(parameter {k})")
    if member >= n_members(ck.params):
        raise ValueError(f"member {member} asked for, checkpoint {path.name} has "
                         f"{n_members(ck.params)}")
    return {k: ck.params[k][member] for k, _ in model.named_parameters()}


@dataclass
class SearchSummary:
    """Everything ``search/search.json`` holds: one row per bad minimum, aggregates, timing."""

    rows: list[dict[str, Any]]
    stats: dict[str, float]
    path: Path
    new: int
    seconds: float


def _stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    if not rows:
        return {"n": 0}
    col = {k: [r[k] for r in rows] for k in ("train_acc", "test_acc", "poison_acc")}
    return {"n": len(rows), "train_acc_min": min(col["train_acc"]),
            "train_acc_median": statistics.median(col["train_acc"]),
            "test_acc_max": max(col["test_acc"]), "test_acc_median":
            statistics.median(col["test_acc"]), "poison_acc_max": max(col["poison_acc"]),
            "steps_median": statistics.median(r["steps"] for r in rows)}


@locking
def search_run(run: Run | str | Path, cfg: SearchConfig = SearchConfig(), *,
               root: Path | str = DEFAULT_ROOT, device: str | torch.device = "auto",
               force: bool = False, progress: bool = False,
               on_batch: Callable[[int, int], None] | None = None) -> SearchSummary:
    """Search bad minima from checkpoints of ``run``; resumable, results in ``run/search/``.

    Minima already saved by an interrupted search with the same config are kept
    and not redone; a different config raises :class:`RunError` unless ``force``
    (which deletes the old search). ``on_batch(done, total)`` reports progress.

    Example::

        >>> s = search_run("mf-good", SearchConfig(every=10), device="cpu")  # doctest: +SKIP
        >>> s.stats["test_acc_max"], s.stats["train_acc_median"]           # doctest: +SKIP
    """
    t0 = time.perf_counter()
    run = run if isinstance(run, Run) else Run.open(run, root)
    traj = run.trajectory()
    if not traj:
        raise RunError(f"run {run.name} has no trajectory checkpoints; train it first")
    dev = resolve_device(device)
    run.lock()
    model, final_params, _, data, run_cfg = load_run_model(run, traj[-1], dev)
    n_extra = cfg.n_extra(run_cfg.data.name)
    extra = fresh_points(run_cfg.data, n_extra, cfg.seed) if n_extra else None
    if cfg.member >= n_members(final_params):
        raise ValueError(f"member {cfg.member} asked for, run {run.name} has "
                         f"{n_members(final_params)}")
    final = {k: v[cfg.member:cfg.member + 1] for k, v in final_params.items()}
    chosen = select_checkpoints(traj, cfg)
    record = {"search": cfg.to_dict(), "run": run.name, "final_checkpoint": traj[-1].name,
              "extra_poison": n_extra}
    if run.exists(f"{SEARCH_DIR}/config.json"):
        if force:
            shutil.rmtree(run.file(SEARCH_DIR))
        elif (run.read_json(f"{SEARCH_DIR}/config.json") != record
              and any(run.file(SEARCH_DIR, "minima").glob("*.safetensors"))):
            raise RunError(f"run {run.name} already has a search with a different config; "
                           "use --force to redo it")
    run.write_json(f"{SEARCH_DIR}/config.json", record)
    work = [(p, _step_of(p), r) for p in chosen for r in range(cfg.repeats)]

    def rel(step: int, rep: int) -> str:
        return f"{SEARCH_DIR}/minima/start_{step:08d}_r{rep:02d}.safetensors"

    todo = [w for w in work if not run.exists(rel(w[1], w[2]))]
    cap = batch_capacity(model, poison_set(data, cfg, extra)[0], cfg)
    # Stacks are fixed chunks of the whole work list, and a chunk with any minimum
    # missing is redone whole: rounding depends on the stack a member trains in, and
    # this chaotic objective amplifies it (see the module docstring), so a resumed
    # search trains every member in the stack it would have had without the kill.
    chunks = [work[b:b + cap] for b in range(0, len(work), cap)]
    for b, chunk in enumerate(chunks):
        if all(run.exists(rel(s, r)) for _, s, r in chunk):
            continue
        starts = stack([_load_start(run, p, model, cfg.member, dev) for p, _, _ in chunk])
        seeds = [search_seed(cfg.seed, s, r) for _, s, r in chunk]
        res = search_minima(model, starts, data, cfg, seeds, extra=extra, progress=progress)
        d_start, d_final = distances(res.params, starts), distances(res.params, final)
        for i, (p, s, r) in enumerate(chunk):
            row = {"start_checkpoint": p.name, "start_step": s, "repeat": r, "seed": seeds[i],
                   "steps": int(res.steps[i]), "beta": float(res.betas[i]),
                   **{k: float(v[i]) for k, v in res.metrics.items()},
                   "dist_start_l2": float(d_start["l2"][i]),
                   "dist_start_filter": float(d_start["filter"][i]),
                   "dist_final_l2": float(d_final["l2"][i]),
                   "dist_final_filter": float(d_final["filter"][i])}
            one = {k: v[i:i + 1] for k, v in res.params.items()}
            if run.exists(rel(s, r)):
                continue
            run.save_checkpoint(rel(s, r), one, {}, {"kind": "bad_minimum", "step": row["steps"],
                                                    "row": row, "search": cfg.to_dict(),
                                                    "run": run.name})
        if on_batch:
            on_batch(sum(len(c) for c in chunks[:b + 1]), len(work))
    with reading(run.file(SEARCH_DIR, "minima")):
        rows = [dict(run.load_checkpoint(rel(s, r)).meta["row"]) for _, s, r in work]
    stats = _stats(rows)
    seconds = time.perf_counter() - t0
    run.write_csv(f"{SEARCH_DIR}/search.csv", rows)
    run.write_json(f"{SEARCH_DIR}/search.json",
                   {**record, "stats": stats, "rows": rows, "new": len(todo),
                    "seconds": seconds, "batch": cap, "device": str(dev)})
    return SearchSummary(rows, stats, run.file(SEARCH_DIR), len(todo), seconds)
