"""The beta-weighted poisoned NLL of Huang et al. (2019), and accuracy.

    L(theta) = (1 - beta)/|D_t| sum_{D_t} -log p(y|x) + beta/|D_p| sum_{D_p} -log(1 - p(y|x))

D_p holds points from the data distribution with their *true* labels, so the
second term rewards being wrong on them: minimisers fit the training set while
generalising badly (a "bad" minimum). beta = 0 is ordinary training.

Logits have shape ``(..., N, C)``: ``C = 1`` is a binary sigmoid model, ``C = K``
a softmax model. Every term is computed from logits with log-sum-exp, never as
``log(1 - p)``, so values and gradients stay finite for any logit:

- binary: ``-log p(y|x) = softplus((1 - 2y) z)``, ``-log(1 - p(y|x)) = softplus((2y - 1) z)``;
- K classes: ``-log p_y = lse(z) - z_y``, ``-log sum_{k != y} p_k = lse(z) - lse(z_{-y})``.

Leading dimensions ``...`` (e.g. a stack of M models) are kept: the result has
shape ``...``. ``beta`` may be a float or a tensor broadcastable to ``...``.

Example::

    >>> z, y = torch.zeros(4, 1), torch.tensor([0, 1, 0, 1])
    >>> poisoned_nll(z, y)  # log 2
    tensor(0.6931)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .options import ConfigError

__all__ = ["nll", "complement_nll", "poisoned_nll", "accuracy", "predict", "check_labels",
           "logits_only"]


def _check(logits: torch.Tensor, y: torch.Tensor) -> None:
    if logits.dim() < 2 or logits.shape[-2] != y.shape[-1]:
        raise ValueError(f"logits (..., N, C) and labels (N,) disagree: "
                         f"{tuple(logits.shape)} vs {tuple(y.shape)}")


def check_labels(y: torch.Tensor, n_outputs: int | None = None) -> torch.Tensor:
    """``y`` as int64 class indices, or a one-line ``ConfigError``: integers in ``[0, C)``
    for a model of ``C = n_outputs`` logits (``C = 2`` for one logit, whose labels are a
    sigmoid's 0 and 1: ``softplus((1 - 2y) z)`` with any other ``y`` is the NLL of no
    distribution). ``n_outputs=None`` checks the type only.

    >>> check_labels(torch.tensor([0, 1], dtype=torch.uint8)).dtype
    torch.int64
    >>> check_labels(torch.tensor([-1, 1]), 1)
    Traceback (most recent call last):
    ...
    minefield.options.ConfigError: labels must be in [0, 2) for the model's 1 output(s), got -1..1
    """
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ConfigError(f"labels must be integer class indices, got {y.dtype}")
    y = y.long()
    if len(y) and n_outputs is not None:
        lo, hi, k = int(y.min()), int(y.max()), max(n_outputs, 2)
        if lo < 0 or hi >= k:
            raise ConfigError(f"labels must be in [0, {k}) for the model's {n_outputs} "
                              f"output(s), got {lo}..{hi}")
    return y


def nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-log p(y|x)``, shape ``logits.shape[:-1]``."""
    _check(logits, y)
    if logits.shape[-1] == 1:
        z = logits[..., 0]
        return F.softplus((1 - 2 * y.to(z.dtype)) * z)
    z_y = logits.gather(-1, y.expand(logits.shape[:-1]).unsqueeze(-1))[..., 0]
    return torch.logsumexp(logits, -1) - z_y


def complement_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-log(1 - p(y|x)) = -log sum_{k != y} p_k``, computed stably."""
    _check(logits, y)
    if logits.shape[-1] == 1:
        z = logits[..., 0]
        return F.softplus((2 * y.to(z.dtype) - 1) * z)
    mask = F.one_hot(y, logits.shape[-1]).bool().expand(logits.shape)
    others = logits.masked_fill(mask, float("-inf"))
    return torch.logsumexp(logits, -1) - torch.logsumexp(others, -1)


def poisoned_nll(
    logits_train: torch.Tensor,
    y_train: torch.Tensor,
    logits_poison: torch.Tensor | None = None,
    y_poison: torch.Tensor | None = None,
    beta: float | torch.Tensor = 0.0,
    flip: bool = False,
    poison_weight: torch.Tensor | None = None,
    poison_norm: float | None = None,
) -> torch.Tensor:
    """The poisoned objective, averaged over each set; shape ``logits.shape[:-2]``.

    ``flip=True`` uses cross-entropy on a flipped label instead of the complement
    (the authors' "untraining" set; identical for binary, ``(y+1) % K`` otherwise).
    ``poison_weight`` ``(N_p,)`` makes the poison term a weighted mean
    ``sum_i w_i l_i / sum_i w_i`` (default: the plain mean). ``poison_norm`` replaces
    that denominator (``sum_i w_i``, or ``N_p``): a part of a batch (m-SAM) then carries
    its own share of the whole batch's poison term.
    """
    clean = nll(logits_train, y_train).mean(-1)
    if logits_poison is None or y_poison is None or y_poison.numel() == 0:
        return clean if isinstance(beta, float) and beta == 0.0 else (1 - beta) * clean
    if flip and logits_poison.shape[-1] > 1:
        per = nll(logits_poison, (y_poison + 1) % logits_poison.shape[-1])
    else:
        per = complement_nll(logits_poison, y_poison)
    if poison_weight is None:
        bad = per.mean(-1) if poison_norm is None else per.sum(-1) / poison_norm
    else:
        if poison_weight.shape != per.shape[-1:]:
            raise ValueError(f"poison_weight must have shape ({per.shape[-1]},), one weight "
                             f"per poison point; got {tuple(poison_weight.shape)}")
        w = poison_weight.to(per.dtype)
        bad = (per * w).sum(-1) / (w.sum() if poison_norm is None else poison_norm)
    return (1 - beta) * clean + beta * bad


def predict(logits: torch.Tensor) -> torch.Tensor:
    """Predicted class per sample, shape ``logits.shape[:-1]``."""
    if logits.shape[-1] == 1:
        return (logits[..., 0] > 0).long()
    return logits.argmax(-1)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of correct predictions, shape ``logits.shape[:-2]``."""
    _check(logits, y)
    return (predict(logits) == y).to(logits.dtype).mean(-1)


def logits_only(out: object) -> torch.Tensor:
    """``out`` if a model's forward returned one tensor of logits ``(N, C)``, which every
    loss, radius and Hessian here reads; else one clear ``ConfigError`` (a tuple or dict
    of logits and features failed deep inside the engine with an AttributeError).

    >>> try:
    ...     logits_only({"logits": torch.zeros(2, 3)})
    ... except ConfigError as e:
    ...     print(str(e)[:44])
    the model's forward returns a dict, not a te
    """
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"the model's forward returns a {type(out).__name__}, not a tensor "
                          "of logits (N, C): wrap it in an nn.Module whose forward returns "
                          "only the logits")
    return out
