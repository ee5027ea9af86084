"""Which networks the R-operator of :mod:`minefield.graph_hvp` can run: the traced plan.

:func:`graph_plan` traces a model with ``torch.fx`` and classifies every node as
the graph input, a convolution, a linear layer, BatchNorm with running
statistics, an activation (ReLU, leaky ReLU, Tanh), a parameter-free *linear* map
(sums of two tensors, average pooling, zero padding, means, flattening, views) or
the output; anything else (max pooling, sigmoid, adding a constant, circular
padding, data-dependent control flow) gives ``None``, and the caller falls back
to autograd. So does a layer whose parameters are not its own under its name (tied
to another layer's, or parametrised). A step is ``live`` when it depends on
parameters: only live inputs need back-propagated errors.

Example::

    >>> from torch import nn
    >>> [s.kind for s in graph_plan(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(),
    ...                                           nn.Flatten(), nn.Linear(8, 2)))]
    ['input', 'conv', 'act', 'map', 'linear', 'output']
    >>> graph_plan(nn.Sequential(nn.Linear(2, 2), nn.Sigmoid())) is None
    True
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from .functional import _hooked

__all__ = ["graph_plan"]

_ACT_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Tanh)
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.leaky_relu: "leaky_relu",
                  torch.tanh: "tanh"}
_LINEAR_MODULES = (nn.Flatten, nn.Identity, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_LINEAR_FUNCTIONS = {F.avg_pool2d, F.adaptive_avg_pool2d,
                     torch.flatten, torch.mean}
_LINEAR_METHODS = {"mean", "flatten", "view", "reshape", "contiguous", "add"}


class _Step:
    """One node of the traced forward: ``kind`` is input, conv, linear, bn, act, map
    (a parameter-free linear map) or output; ``live`` when it depends on parameters."""

    def __init__(self, node: fx.Node, kind: str, module: nn.Module | None = None,
                 act: str | None = None, slope: float = 0.0):
        self.node, self.name, self.kind = node, node.name, kind
        self.module, self.act, self.slope = module, act, slope
        self.inputs = [a.name for a in node.all_input_nodes]
        self.live = False


def graph_plan(model: nn.Module) -> list[_Step] | None:
    """The steps of ``model``'s traced forward, or ``None`` when ``torch.fx`` cannot trace
    it, it holds an operation outside the R-operator's rules above, or a hook is set."""
    if hooked(model):  # fx traces the forward without its hooks
        return None
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # any untraceable forward: the caller falls back to autograd
        return None
    steps: list[_Step] = []
    live: set[str] = set()
    names = dict(model.named_parameters()) | dict(model.named_buffers())
    for node in gm.graph.nodes:
        step = _classify(gm, node)
        if step is not None and step.module is not None and not owns(node.target,
                                                                      step.module, names):
            return None
        if step is None:
            return None
        step.live = step.kind in ("conv", "linear", "bn") or any(a in live for a in step.inputs)
        if step.live:
            live.add(step.name)
        steps.append(step)
    if sum(s.kind == "input" for s in steps) != 1 or steps[-1].kind != "output":
        return None
    return steps


def _classify(gm: fx.GraphModule, node: fx.Node) -> _Step | None:
    if node.op == "placeholder":
        return _Step(node, "input")
    if node.op == "output":
        return _Step(node, "output") if isinstance(node.args[0], fx.Node) else None
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Conv2d):
            ok = mod.padding_mode == "zeros" and not isinstance(mod.padding, str)
            return _Step(node, "conv", mod) if ok else None
        if isinstance(mod, nn.Linear):
            return _Step(node, "linear", mod)
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return _Step(node, "bn", mod) if mod.track_running_stats else None
        if isinstance(mod, _ACT_MODULES):
            return _Step(node, "act", mod, _act_name(mod), getattr(mod, "negative_slope", 0.0))
        if isinstance(mod, _LINEAR_MODULES):
            return _Step(node, "map", mod)
        return None
    if node.op == "call_function":
        if node.target in _ACT_FUNCTIONS:
            name = _ACT_FUNCTIONS[node.target]
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get(
                "negative_slope", 0.01)
            return _Step(node, "act", None, name, slope if name == "leaky_relu" else 0.0)
        if node.target in (operator.add, torch.add):  # linear only between two tensors
            ok = len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args)
            return _Step(node, "map") if ok else None
        if node.target in _LINEAR_FUNCTIONS:
            return _Step(node, "map")
        if node.target is F.pad:
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
            return _Step(node, "map") if mode == "constant" and not value else None
        return None
    if node.op == "call_method" and node.target in _LINEAR_METHODS:
        if node.target == "add" and not all(isinstance(a, fx.Node) for a in node.args):
            return None
        return _Step(node, "map")
    return None


def hooked(model: nn.Module) -> bool:
    """Whether calling ``model`` runs a forward, pre-forward or backward hook (its own, a
    submodule's or a global one): a path that computes the layers itself (this R-operator,
    the MLP matmuls of :func:`~minefield.functional.mlp_fast_path`, the sequential conv
    path) would skip it, so it is not taken."""
    return _hooked() or any(_hooked(m) for m in model.modules())


def owns(target: str, mod: nn.Module, names: dict[str, torch.Tensor]) -> bool:
    """Whether the tensors the R-operator reads under ``target`` (weight, bias, running
    statistics) are ``mod``'s own, listed by the model under that name. A parameter tied
    to another layer's is listed once, under its first owner, and a parametrised weight
    (``weight_norm``, ``parametrize``) is computed from tensors of other names: the
    R-operator would run such a layer without it, so the caller takes autograd instead."""
    if parametrize.is_parametrized(mod):
        return False
    return all(getattr(mod, k, None) is None or names.get(f"{target}.{k}") is getattr(mod, k)
               for k in ("weight", "bias", "running_mean", "running_var"))


def _act_name(mod: nn.Module) -> str:
    return {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh"}[type(mod)]


