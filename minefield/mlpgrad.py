"""The stacked plain-MLP forward as one autograd node, with its backward written out.

Training a stack of small MLPs (the bad-minimum search: 200 MLPs of 2k parameters)
is bound by per-operation overhead, not arithmetic: every ``aten`` call costs a few
microseconds of dispatch on a CPU, and a kernel launch plus its Python on a GPU.
Autograd records each layer of :func:`minefield.functional._mlp_forward` as several
nodes (the transposed weight view, the bias ``unsqueeze``, the fused ``baddbmm``, the
in-place activation) and replays each in the backward pass with its bookkeeping
(views, broadcasts reduced by ``sum_to``, layout copies). :class:`StackedMLP` is one
node: its backward is, per layer (``h_out = act(b + h W^T)``, weights ``(M, out, in)``,
``g = dL/dh_out``)::

    g     <- act'(g)                      (threshold / leaky / tanh backward on h_out)
    dL/db  = sum_n g                      (M, out)
    dL/dW  = (h^T g)^T                    (M, out, in), one bmm
    dL/dh  = g W                          (M, N, in), one bmm (not for the first layer)

These are the kernels, operands and layouts autograd runs for the same forward, so
the gradients are **bit-for-bit** autograd's (``tests/test_mlpgrad.py`` checks
``torch.equal`` in float32 and float64, with the search's and the sweep's training
options), in three fewer dispatched operations per layer (about 10% of the search's
training step; the stacked Adam's one read of its step counters saves another 10%;
counted in that test). Eager only: under ``torch.compile`` the objective keeps
autograd's graph, which the compiler fuses anyway. A second derivative through it
(``create_graph=True``) raises instead of silently treating the activations as
constants; the curvature code never comes here (only
:func:`minefield.step.poisoned_objective`, the training objective, uses it).

Example::

    >>> import torch
    >>> from minefield import ModelConfig, build_model
    >>> from minefield.train import init_stack
    >>> model = build_model(ModelConfig(widths=(8,)), (2,), 3)
    >>> p = {k: v.requires_grad_() for k, v in init_stack(model, "torch", [0, 1]).items()}
    >>> logits = mlp_logits(model, p, torch.randn(5, 2))
    >>> logits.shape, logits.grad_fn.name()
    (torch.Size([2, 5, 3]), 'StackedMLPBackward')
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .functional import _layout, _mlp_forward
from .stacked import Params

__all__ = ["StackedMLP", "mlp_logits"]


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layers(model: nn.Sequential, params: Params) -> tuple | None:
    """``(("linear", (weight name, bias name or None)) | ("act", module) | ("flatten",
    None), ...)`` in order: the plan :class:`StackedMLP` runs, cached per model; None
    when an activation follows another (the second would overwrite the first's
    result in place, which its backward reads: autograd refuses that, so this node
    does not take it either)."""
    key = (tuple(params), _layout(model))  # a swapped or added child is planned again
    hit = _PLANS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    plan: list[tuple[str, object]] = []
    for name, mod in model.named_children():
        if isinstance(mod, nn.Linear):
            bias = f"{name}.bias" if f"{name}.bias" in params else None
            plan.append(("linear", (f"{name}.weight", bias)))
        elif isinstance(mod, nn.Flatten):
            plan.append(("flatten", None))
        elif isinstance(mod, (nn.ReLU, nn.LeakyReLU, nn.Tanh)):
            if plan and plan[-1][0] == "act":
                plan = None
                break
            plan.append(("act", mod))
    out = tuple(plan) if plan is not None else None
    _PLANS[model] = (key, out)
    return out


def _act_backward(mod: nn.Module, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """What autograd runs for the in-place activation whose result is ``out``."""
    if isinstance(mod, nn.ReLU):
        return torch.ops.aten.threshold_backward(g, out, 0)
    if isinstance(mod, nn.LeakyReLU):
        return torch.ops.aten.leaky_relu_backward(g, out, mod.negative_slope, True)
    return torch.ops.aten.tanh_backward(g, out)


class StackedMLP(torch.autograd.Function):
    """``logits = mlp(x; W_1, b_1, ...)`` for ``(M, ...)`` stacked weights, ``x`` ``(N, ...)``
    shared by the members (no gradient); ``apply(plan, x, *tensors)`` with the weights
    and biases in plan order. See the module docstring for the backward."""

    @staticmethod
    def forward(ctx, plan, x, *tensors):
        h, own, k = x, False, 0
        saved: list[torch.Tensor] = []  # per linear: its input, its weight (M, out, in)
        outs: list[torch.Tensor | None] = []  # per activation: its (in-place) result
        for kind, what in plan:
            if kind == "linear":
                w = tensors[k]
                b = tensors[k + 1] if what[1] is not None else None
                k += 1 + (b is not None)
                if h.dim() == 2:  # the first layer: one input batch shared by every member
                    h = h.expand(w.shape[0], *h.shape)
                saved += [h, w]
                wt = w.transpose(1, 2)
                h = torch.bmm(h, wt) if b is None else torch.baddbmm(b.unsqueeze(1), h, wt)
                own = True
            elif kind == "flatten":
                h = h.flatten(1)
            else:
                mod = what
                if isinstance(mod, nn.ReLU):
                    h = h.relu_() if own else h.relu()
                elif isinstance(mod, nn.LeakyReLU):
                    h = torch.nn.functional.leaky_relu(h, mod.negative_slope, inplace=own)
                else:
                    h = h.tanh_() if own else h.tanh()
                outs.append(h if own else None)
        ctx.plan = plan
        ctx.save_for_backward(*saved, *[o for o in outs if o is not None])
        ctx.has_out = [o is not None for o in outs]
        return h

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True: the saved activations are constants
            raise RuntimeError("minefield.mlpgrad.StackedMLP has no second derivative (the "
                               "training objective's MLP node): differentiate "
                               "minefield.functional.stacked_forward instead")
        stored = ctx.saved_tensors
        n_lin = sum(kind == "linear" for kind, _ in ctx.plan)
        lin = list(stored[:2 * n_lin])
        outs_iter = iter(stored[2 * n_lin:])
        outs = [next(outs_iter) if has else None for has in ctx.has_out]
        grads: list[torch.Tensor | None] = []
        li, ai = n_lin, len(outs)
        for kind, what in reversed(ctx.plan):
            if kind == "act":
                ai -= 1
                if g is None:
                    continue
                if outs[ai] is None:  # an activation of the shared input: no gradient left
                    g = None
                    continue
                g = _act_backward(what, g, outs[ai])
            elif kind == "linear":
                li -= 1
                h, w = lin[2 * li], lin[2 * li + 1]
                gw = torch.bmm(h.transpose(1, 2), g).transpose(1, 2)
                gb = g.sum(1) if what[1] is not None else None
                grads = [gw] + ([gb] if gb is not None else []) + grads
                g = torch.bmm(g, w) if li > 0 else None
        return (None, None, *grads)


def mlp_logits(model: nn.Sequential, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits ``(M, N, C)`` of a stacked plain MLP
    (:func:`~minefield.functional.mlp_fast_path`) through :class:`StackedMLP`: the values
    of :func:`~minefield.functional.stacked_forward`, one autograd node (autograd's graph
    instead where the node has no gradient to give: inputs that require one)."""
    plan = _layers(model, params) if not x.requires_grad else None
    if plan is None:
        return _mlp_forward(model, params, x)
    tensors = []
    for kind, what in plan:
        if kind == "linear":
            tensors.append(params[what[0]])
            if what[1] is not None:
                tensors.append(params[what[1]])
    return StackedMLP.apply(plan, x, *tensors)
