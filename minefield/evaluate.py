"""Loss and accuracy of stacked models on every split of a dataset.

``evaluate_members`` runs all M members of a stack on train, test and poison in
chunked, batched forward passes and returns one ``(M,)`` tensor per metric:

- ``{split}_loss``: mean ``-log p(y|x)`` on true labels (poison too: a bad
  minimum has a *high* poison loss);
- ``{split}_acc``: accuracy against true labels (for poison: how often the model
  is right on points it was trained to get wrong);
- ``weight_norm``: the L2 norm of all parameters.

``isolated=True`` evaluates each member on its own (a stack of one in fresh
storage): the numbers, and so decisions taken from them such as stopping, are
then bit-for-bit the same in any stack (see :func:`minefield.step.isolated`).
"""

from __future__ import annotations

import torch
from torch import nn

from .data import Dataset
from .functional import (
    Params,
    alone,
    bn_mode,
    check_buffers,
    chunked_forward,
    flatten,
    n_members,
    one,
)
from .loss import nll, predict

__all__ = ["SPLITS", "evaluate_members", "evaluate_split", "resolve_device"]

SPLITS = ("train", "test", "poison")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available here")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


@torch.no_grad()
def evaluate_split(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor,
                   buffers: Params | None = None, memory_mb: float = 256.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss (M,), acc (M,))`` of every member on ``(x, y)``."""
    m = n_members(params)
    dev = next(iter(params.values())).device
    loss = torch.zeros(m, dtype=torch.float64, device=dev)
    correct = torch.zeros(m, dtype=torch.float64, device=dev)
    if len(y) == 0:
        nan = torch.full((m,), float("nan"), dtype=torch.float64, device=dev)
        return nan, nan.clone()
    with bn_mode(model, False):  # every submodule's own mode restored after
        for ms, ps, logits in chunked_forward(model, params, x, buffers, memory_mb):
            yy = y[ps]
            loss[ms] += nll(logits, yy).sum(-1).double()
            correct[ms] += (predict(logits) == yy).sum(-1).double()
    return loss / len(y), correct / len(y)


def evaluate_members(model: nn.Module, params: Params, data: Dataset,
                     buffers: Params | None = None, splits=SPLITS, *, isolated: bool = False
                     ) -> dict[str, torch.Tensor]:
    """Every metric of every member: ``{"train_loss": (M,), "train_acc": (M,), ...}``.

    ``isolated=True``: one member at a time, each bit-for-bit independent of the stack.
    """
    if isolated:
        rows = [evaluate_members(model, alone(params, i), data, one(buffers, i), splits)
                for i in range(n_members(params))]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    check_buffers(model, buffers, n_members(params))
    out: dict[str, torch.Tensor] = {}
    for s in splits:
        x, y = data.split(s)
        out[f"{s}_loss"], out[f"{s}_acc"] = evaluate_split(model, params, x, y, buffers)
    out["weight_norm"] = flatten(params).double().norm(dim=1)
    return out
