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

The forward is ``_mlp_forward`` itself, recording what this backward reads. These are
the kernels, operands and layouts autograd runs for the same forward, so
the gradients are **bit-for-bit** autograd's (``tests/test_mlpgrad.py`` checks
``torch.equal`` in float32 and float64, with the search's and the sweep's training
options), in three fewer dispatched operations per layer (about 10% of the search's
training step; the stacked Adam's one read of its step counters saves another 10%;
counted in that test). Eager autograd only: under ``torch.compile`` the objective
keeps autograd's graph, which the compiler fuses anyway, and :func:`mlp_logits` hands
over to autograd's graph of the same forward wherever the node has no rule: under
``torch.func`` transforms (``grad``, ``vjp``, ``jvp``, ``jacrev``, ``vmap``, ...: the
node has no ``setup_context`` nor batching or forward-mode rule) and under
``torch.autocast`` (its backward would not cast). A second derivative through it
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

import torch
from torch import nn

from .functional import _mlp_forward
from .stacked import Params

__all__ = ["StackedMLP", "mlp_logits"]


def _act_backward(mod: nn.Module, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """What autograd runs for the activation whose result is ``out``: for one out of
    place (after another activation) autograd's leaky-ReLU backward reads the input, whose
    sign the result shares (slope >= 0), so the branch and the gradient are the same."""
    if isinstance(mod, nn.ReLU):
        return torch.ops.aten.threshold_backward(g, out, 0)
    if isinstance(mod, nn.LeakyReLU):
        return torch.ops.aten.leaky_relu_backward(g, out, mod.negative_slope, True)
    return torch.ops.aten.tanh_backward(g, out)


class StackedMLP(torch.autograd.Function):
    """``logits = mlp(x; W_1, b_1, ...)`` for ``(M, ...)`` stacked weights, ``x`` ``(N, ...)``
    shared by the members (no gradient); ``apply(model, names, x, *tensors)`` with the
    parameters ``dict(zip(names, tensors))``. The forward is
    :func:`~minefield.functional._mlp_forward` itself, which records the layer inputs and
    activation results the backward (module docstring) reads."""

    @staticmethod
    def forward(ctx, model, names, x, *tensors):
        record: list = []
        h = _mlp_forward(model, dict(zip(names, tensors)), x, record=record)
        ctx.keys, ctx.names = [r[0] for r in record], names  # a Linear's name or a module
        ctx.save_for_backward(*[t for r in record for t in r[1:]])
        return h

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True: the saved activations are constants
            raise RuntimeError("minefield.mlpgrad.StackedMLP has no second derivative (the "
                               "training objective's MLP node): differentiate "
                               "minefield.functional.stacked_forward instead")
        saved, grads = iter(ctx.saved_tensors), {}
        entries = [(key, next(saved), next(saved)) if isinstance(key, str) else
                   (key, next(saved)) for key in ctx.keys]
        for i in range(len(entries) - 1, -1, -1):  # entry 0: the first Linear, on x
            if not isinstance(entries[i][0], str):
                g = _act_backward(entries[i][0], g, entries[i][1])
                continue
            name, h, w = entries[i]
            grads[f"{name}.weight"] = torch.bmm(h.transpose(1, 2), g).transpose(1, 2)
            if f"{name}.bias" in ctx.names:
                grads[f"{name}.bias"] = g.sum(1)
            if i:
                g = torch.bmm(g, w)
        return (None, None, None, *[grads.get(n) for n in ctx.names])


def mlp_logits(model: nn.Sequential, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits ``(M, N, C)`` of a stacked plain MLP
    (:func:`~minefield.functional.mlp_fast_path`) through :class:`StackedMLP`: the values
    of :func:`~minefield.functional.stacked_forward`, one autograd node (autograd's graph
    instead where the node has no gradient to give, for inputs that require one, or no
    rule: under ``torch.func`` transforms and autocast; and a leaky ReLU of negative
    slope, whose input the result does not give back by its sign)."""
    if (x.requires_grad or torch._C._are_functorch_transforms_active()
            or torch.is_autocast_enabled(x.device.type)
            or any(type(m) is nn.LeakyReLU and m.negative_slope < 0 for m in model)):
        return _mlp_forward(model, params, x)
    return StackedMLP.apply(model, tuple(params), x, *params.values())
