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
:func:`minefield.train.fit` (one optimizer over stacked tensors is exactly M independent
optimizers, bit for bit). With ``stopping="target"`` a member is frozen once ``train_acc
>= target_train`` and ``poison_acc <= target_poison_acc`` (poison accuracy is on the
*true* labels); every ``compact_every`` steps the frozen members are dropped from the
stack (with their optimizer state), so the batch only pays for members still training.

Repeats from one checkpoint differ only through ``jitter``: each search starts at
``theta + jitter * d``, ``d`` a filter-normalised Gaussian direction (each filter of each
weight matrix rescaled to that filter's norm in ``theta``; biases 0) drawn from the
search's own seed. Minibatch noise cannot tell repeats apart: all members of a stack
share one minibatch order (``seed``), and the default is full batch anyway.

**A minimum does not depend on its stack.** Searches are seeded by ``(seed,
start step, repeat)`` only; each member has its own poison factor, stopping step
and optimizer state; minibatches and fresh points depend on ``seed`` alone. That
makes members independent mathematically, but batched kernels would still round
a member differently in stacks of different sizes (BLAS takes gemv for a
one-output layer of a stack of one and batched gemm for more, and its results
depend on the memory alignment of a member's slice; vectorised ``softplus``
computes a tensor's last elements in scalar code), and the poisoned dynamics
amplify one rounding difference to O(1) within a few thousand steps (the
issue's 2,000-step search: 1,600 vs 2,000 steps, test accuracy 0.396 vs 0.433
with ``max_batch`` 1 vs 2). So by default (``cfg.isolate``) every member is
computed on kernels shaped for one model (:func:`minefield.step.isolated`:
objective, clipping norms, logged metrics, final metrics, distances), and the
stacked optimizer's elementwise updates are exact per element: a member's
trajectory is bit-for-bit the same in float64 and float32 whatever ``max_batch``
or ``memory_mb`` group it with, and a search killed at any point resumes to
the same minima with any grouping. ``isolate=False`` runs one batched pass per
stack instead (faster on many cores or a GPU; stacks are then fixed chunks so
one command still repeats itself exactly).

Distances (:func:`distances`) to the start checkpoint and to the good run's final
iterate are reported in two units:

- ``l2``: ``||theta - ref||`` over all parameters;
- ``filter``: ``sqrt(mean_f ||Delta_f||^2 / ||ref_f||^2)`` over the filters f
  (rows of weight matrices, output channels of kernels) of all weight tensors;
  biases are left out. A point ``ref + t d`` with ``d`` filter-normalised is at
  distance exactly ``t``: the same unit as the basin radius.

:func:`search_minima` is the tensor-level search (its example runs three
searches on two blobs); :func:`minefield.stages.search_run` runs it on a run
directory and owns the files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .config import PoisonObjective
from .continuation import (  # noqa: F401 - _segment is tested from here
    _adapt_betas,
    _admissible,
    _better,
    _cap,
    _continuation_modes,
    _failed,
    _logged,
    _poison_limits,
    _search_diverged,
    _segment,
    _trained_enough,
    retry_seed,
)
from .data import Dataset
from .directions import distances
from .evaluate import evaluate_members
from .functional import activation_elements, is_weight
from .options import StopRule
from .search_config import AUTO_EXTRA_POISON, SEARCH_TRAIN, SearchConfig
from .stacked import Params, member, n_members, select, stack
from .train import TrainingDiverged, effective_beta, fit

__all__ = ["StopRule", "SearchConfig", "SEARCH_TRAIN", "SearchResult", "search_minima",
           "poison_set", "distances", "search_seed", "batch_capacity", "AUTO_EXTRA_POISON"]
# --- maths ----------------------------------------------------------------------------------


def search_seed(seed: int, step: int, repeat: int) -> int:
    """The seed of the search from checkpoint ``step``, repeat ``repeat`` (batch-independent)."""
    return ((seed * 1_000_003 + step) * 1_009 + repeat) % (2**63 - 1)


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
        one = member(starts, i)
        d = _filter_normalized_direction(one, torch.Generator().manual_seed(int(s)))
        items.append({k: one[k] + jitter * d[k] for k in one})
    return stack(items)


@dataclass
class SearchResult:
    """Bad minima of one batch: ``params (M, ...)``, steps trained ``(M,)``, metrics
    ``(M,)``, the poison factor each member ended with ``(M,)`` and the attempt kept
    ``(M,)`` (0: the first; see ``SearchConfig.retries``)."""

    params: Params
    steps: torch.Tensor
    metrics: dict[str, torch.Tensor]
    betas: torch.Tensor
    attempts: torch.Tensor

    def part(self, idx: slice | Sequence[int]) -> SearchResult:
        """The members ``idx``, in that order."""
        cut = idx if isinstance(idx, slice) else torch.as_tensor(list(idx), dtype=torch.long)
        return SearchResult(select(self.params, cut), self.steps[cut],
                            {k: v[cut.to(v.device) if torch.is_tensor(cut) else cut]
                             for k, v in self.metrics.items()},
                            self.betas[cut], self.attempts[cut])


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
                  progress: bool = False, speculate: bool | None = None) -> SearchResult:
    """Train every member of ``starts`` ``(M, ...)`` to a bad minimum, all in one stack.

    The objective is ``poisoned_nll(train, poison, beta)`` with ``beta =
    cfg.beta`` (``None``: ``n_p / (n_t + n_p)`` with ``n_t`` the points ``cfg.train``
    fits, ``b_p / (b_t + b_p)`` with its ``poison_batch_size``) at the start, raised per member
    by ``cfg.poison_cap`` (see :class:`SearchConfig`). Member ``i`` starts at
    ``starts[i] + cfg.jitter * d_i`` with ``d_i`` drawn from ``seeds[i]``. With
    ``cfg.stopping == "target"`` members stop (and are dropped from the stack at
    the next multiple of ``cfg.compact_every``) once they meet the targets;
    ``steps[i]`` is the step at which member i stopped, or ``cfg.steps``.
    ``extra`` are fresh poison points (see :func:`poison_set`; ``search_run``
    draws ``cfg.n_extra(dataset)`` of them). Members still above ``cfg.poison_cap`` at
    the end are searched again (``cfg.retries``); ``speculate`` trains every first retry
    alongside its search instead (see :func:`_speculates`; default: on CUDA for batched
    searches). Stopping targets and the returned
    metrics are always measured on ``data``'s own train / test / poison splits.

    Example::

        >>> from minefield import DataConfig, ModelConfig, build_model, load_dataset
        >>> from minefield.train import init_stack
        >>> data = load_dataset(DataConfig("blobs"))
        >>> model = build_model(ModelConfig(widths=(8,)), (2,), 2)
        >>> starts = init_stack(model, "glorot_uniform", [0, 1, 2])   # 3 searches, one stack
        >>> res = search_minima(model, starts, data, SearchConfig.make(lr=0.05, steps=200,
        ...                                                            milestones=()))
        >>> res.metrics["test_acc"].shape, res.steps.tolist()
        (torch.Size([3]), [200, 200, 200])
    """
    m = n_members(starts)
    seeds = list(seeds) if seeds is not None else list(range(m))
    if len(seeds) != m:
        raise ValueError(f"{len(seeds)} seeds for {m} searches")

    def retry_starts(idx: Sequence[int], attempt: int) -> Params:
        return _jittered(select(starts, list(idx)), [retry_seed(seeds[i], attempt) for i in idx],
                         max(cfg.jitter, cfg.retry_jitter))

    first, spare, res = _jittered(starts, seeds, cfg.jitter), None, None
    if _speculates(speculate, cfg, model, data, extra, first):
        try:
            both = _search_stack(model, {k: torch.cat([v, retry_starts(range(m), 1)[k]])
                                         for k, v in first.items()}, data, cfg, extra, progress)
            res, spare = both.part(slice(0, m)), both.part(slice(m, 2 * m))
        except TrainingDiverged:  # maybe a spare that would never have run: sequentially
            pass
    if res is None:
        res = _search_stack(model, first, data, cfg, extra, progress)
    for attempt in range(1, cfg.retries + 1):
        failed = _failed(cfg, res.metrics)
        if not failed:
            break
        again = (spare.part(failed) if attempt == 1 and spare is not None else
                 _search_stack(model, retry_starts(failed, attempt), data, cfg, extra, progress))
        won = _better(cfg, {k: v[failed] for k, v in res.metrics.items()}, again.metrics)
        idx = [i for i, w in zip(failed, won.tolist()) if w]  # members whose retry won
        for mine, theirs in ((res.params, again.params), (res.metrics, again.metrics)):
            for k, v in mine.items():
                v[idx] = theirs[k][won.to(theirs[k].device)]
        res.steps[idx], res.betas[idx] = again.steps[won.cpu()], again.betas[won.cpu()]
        res.attempts[idx] = attempt
    return res


def _speculates(speculate: bool | None, cfg: SearchConfig, model: nn.Module, data: Dataset,
                extra: tuple[torch.Tensor, torch.Tensor] | None, first: Params) -> bool:
    """Whether the first retry of every search trains alongside it (``speculate``; None:
    on CUDA, for batched searches with retries, when twice the stack fits the memory
    budget). A retry starts only after its search has failed at the end of the schedule,
    so retries double the searches' sequential steps; on a GPU a small stack twice as
    large costs about as much per step, and the spare attempts of searches that did not
    fail are dropped. Each search's result is the one it gets without speculation
    (bit for bit with ``cfg.isolate``); a divergence in the doubled stack, perhaps of a
    spare that would never have run, reruns the searches without it."""
    if speculate is not None:
        return speculate and cfg.retries > 0 and cfg.poison_cap is not None
    if cfg.isolate or not cfg.retries or cfg.poison_cap is None:
        return False
    if next(iter(first.values())).device.type != "cuda":
        return False
    twice = 2 * n_members(first)  # the memory budget decides, not max_batch's chunking
    return batch_capacity(model, poison_set(data, cfg, extra)[0],
                          replace(cfg, max_batch=twice)) >= twice


def _search_stack(model: nn.Module, cur: Params, data: Dataset, cfg: SearchConfig,
                  extra: tuple[torch.Tensor, torch.Tensor] | None, progress: bool
                  ) -> SearchResult:
    """One attempt of :func:`search_minima` for every member of ``cur`` (the starts, moved
    already), in one stack."""
    m = n_members(cur)
    train_data, weight = poison_set(data, cfg, extra)
    # concat: the poison rows' share of the batch train.* draws, fresh points included
    beta = effective_beta(cfg.beta, train_data, cfg.train)
    flip = cfg.objective is PoisonObjective.FLIP
    tc = cfg.train_config()
    stop_fn = _stop_fn(cfg)
    final = {k: v.detach().clone() for k, v in cur.items()}
    steps = torch.full((m,), cfg.steps, dtype=torch.long)
    betas = torch.full((m,), beta, dtype=torch.float64)
    active = torch.arange(m)
    step, opt_state = 0, None
    horizon = cfg.steps + cfg.extra_steps
    limit = torch.ones(m, dtype=torch.float64)  # poison accuracy a continuation may reach
    floor = torch.zeros(m, dtype=torch.float64)  # train accuracy a continuation must keep
    dirty = torch.zeros(m, dtype=torch.bool)  # continuing to lower its poison accuracy
    best = torch.full((m,), -2.0, dtype=torch.float64)  # score of the kept state
    kept_betas = betas.clone()  # the poison factor each kept state was trained with
    while len(active) and step < horizon:
        end = min(cfg.steps if step < cfg.steps else horizon, step + cfg.compact_every)
        seg = _segment(tc, cfg, step, end)
        captured: dict[str, Any] = {}

        def keep_state(s, _p, _b, opt, _div, end=end, captured=captured):
            if s == end:
                captured["opt"] = opt.state_dict()

        try:
            res = fit(model, cur, train_data, seg, betas[active], flip=flip, start_step=step,
                      opt_state=opt_state, stop_fn=stop_fn, on_checkpoint=keep_state,
                      poison_weight=weight, eval_data=data, progress=progress,
                      desc=f"search {step}-{end}", isolated=cfg.isolate,
                      compile_horizon=horizon - step)
        except TrainingDiverged as e:  # every member: its "last good checkpoint" is not one
            raise _search_diverged(e.step) from None
        if any(d is not None for d in res.diverged_at):  # a search needs every member
            raise _search_diverged(min(d for d in res.diverged_at if d is not None))
        done = torch.tensor([s is not None for s in res.stopped_at])
        write = done.clone()
        if end >= cfg.steps:
            n = len(active)
            if end == cfg.steps:  # the schedule's end: what each continuation must keep
                limit[active] = _poison_limits(cfg, res.history, end, n)
                floor[active], dirty[active] = _continuation_modes(cfg, res.history, end, n)
            d = dirty[active]
            acc = _logged(res.history, end, "train_acc", n, 1.0)
            poison = _logged(res.history, end, "poison_acc", n, 0.0)
            # a member keeps its best admissible check: by train accuracy within its poison
            # limit, or (dirty) by untraining-set accuracy above its train floor
            ok = torch.where(d, acc >= floor[active] - 1e-9,
                             _admissible(res.history, end, limit[active]))
            met = torch.where(d, poison <= _cap(cfg) + 1e-9,
                              _trained_enough(cfg, res.history, end, n))
            done |= met | ~ok
            score = torch.where(d, -poison, acc)
            write = ok & (score >= best[active] - 1e-12)
            best[active] = torch.where(write, score, best[active])
        for i in write.nonzero().flatten().tolist():
            for k in final:
                final[k][active[i]] = res.params[k][i]
            stopped = res.stopped_at[i]
            steps[active[i]] = stopped if stopped is not None else end
            kept_betas[active[i]] = betas[active[i]]
        keep = (~done).nonzero().flatten()
        if "opt" not in captured or end >= horizon or not len(keep):
            break
        _adapt_betas(cfg, betas, active, keep, res.history, end)
        if end >= cfg.steps:  # poison factor down for train accuracy, up (dirty) against poison
            idx = active[keep]
            up = torch.maximum(betas[idx],  # as the adaptive rule: up to beta_max
                               (betas[idx] + cfg.continue_beta_step).clamp(max=cfg.beta_max))
            down = (betas[idx] - cfg.continue_beta_step).clamp(min=0.0)
            betas[idx] = torch.where(dirty[idx], up, down)
        cur = {k: v.detach().clone() for k, v in select(res.params, keep).items()}
        opt_state = _slice_opt_state(captured["opt"], keep.to(next(iter(cur.values())).device),
                                     len(active))
        active, step = active[keep], end
    with torch.no_grad():
        metrics = evaluate_members(model, final, data, isolated=cfg.isolate)
    return SearchResult(final, steps, metrics, kept_betas, torch.zeros(m, dtype=torch.long))


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
    if cfg.train.batch_size is not None:
        n_pts = min(n_pts, 2 * cfg.train.batch_size)
    size = data.x_train.element_size()
    per = 5 * n_params * size + 3 * activation_elements(model, data.x_train) * n_pts * size
    return max(1, min(cfg.max_batch, int(cfg.memory_mb * 2**20 // per)))
