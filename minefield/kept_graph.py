"""Hessian-vector products of any stack through one kept gradient graph (reverse mode).

For a model no exact R-operator covers (:mod:`minefield.pearlmutter`,
:mod:`minefield.graph_hvp`), the gradient ``g = d(sum_m L_m)/dP`` of the summed
loss of all members is built once with its graph kept (``create_graph``). Slot m of
``g`` is member m's own gradient (the members do not interact), so

    H v = d<g, v>/dP,

one more backward pass through the kept graph per product (Pearlmutter 1994:
reverse-over-reverse, about two gradients' cost). A block of c vectors goes through
*one* backward with the vectors as a vmapped batch
(``torch.autograd.grad(..., is_grads_batched=True)``): the dense Hessian of an
``n``-parameter module is ``n / c`` backward calls instead of ``n``. Where an op of the
graph has no batching rule the batched call raises, and :meth:`KeptGraph.products`
falls back to one backward per vector for good.

Example (a quadratic ``w^T A w / 2``: every product is ``A v``)::

    >>> import torch
    >>> from minefield.hvp import Objective
    >>> a = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> obj = Objective.from_function({"w": torch.zeros(1, 2, dtype=torch.float64)},
    ...                               lambda p: p["w"] @ a @ p["w"] / 2)
    >>> KeptGraph(obj).products(torch.eye(2, dtype=torch.float64)[None])[0]
    tensor([[2., 1.],
            [1., 3.]], dtype=torch.float64)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.func import vmap

from .functional import _mlp_forward, covers, mlp_fast_path
from .stacked import member, unflatten

if TYPE_CHECKING:
    from .hvp import Objective

__all__ = ["KeptGraph", "check_second_derivatives"]


def check_second_derivatives(model: torch.nn.Module) -> None:
    """Refuse (``ConfigError``) a model holding an op whose second derivative torch gets
    wrong, before any Hessian of it is reported: ``torch._weight_norm`` (behind both
    ``torch.nn.utils.weight_norm`` and ``parametrizations.weight_norm``), whose double
    backward is not symmetric (a 4-unit tanh MLP: 20% off central differences in
    float64; symmetrising hid it). Gauss-Newton and Fisher need first derivatives only."""
    from torch.nn.utils import parametrizations
    from torch.nn.utils.weight_norm import WeightNorm

    from .options import ConfigError
    for name, mod in model.named_modules():
        pars = getattr(mod, "parametrizations", {})
        if (any(isinstance(h, WeightNorm) for h in mod._forward_pre_hooks.values())
                or any(isinstance(f, parametrizations._WeightNorm)
                       for plist in pars.values() for f in plist)):
            raise ConfigError(f"layer {name!r} uses torch's weight_norm, whose second "
                              "derivative torch computes wrongly: its Hessian would be wrong; "
                              "write the norm in plain operations (g * v / v.norm(dim=1, "
                              "keepdim=True)) or use kind='ggn' / 'fisher'")


class KeptGraph:
    """The leaves and the gradient graph of ``objective``; products through it.
    ``losses`` holds the ``(M,)`` losses met on the way (the caller checks them)."""

    def __init__(self, objective: Objective):
        obj = self.objective = objective
        self.m = obj.n_members
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in obj.params.items()}
        with torch.enable_grad():
            if (obj.model is not None and not obj.buffers and mlp_fast_path(obj.model)
                    and covers(obj.model, leaves)):
                # plain MLPs: the engine's batched matmuls, (M, N, C) logits at once
                losses = sum(obj.weight * obj.per_sample(
                    _mlp_forward(obj.model, leaves, x), y).sum(-1) for x, y in obj.chunks)
            elif self.m == 1:  # plain autograd: no vmap overhead on convolutions
                b = {k: (v[0] if obj._bdim == 0 else v) for k, v in obj.buffers.items()}
                losses = obj.member_loss(member(leaves, 0), b)[None]
            else:
                losses = vmap(obj.member_loss, in_dims=(0, obj._bdim))(leaves, obj.buffers)
            # a parameter the forward never uses (an auxiliary head): gradient 0, no graph
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()), create_graph=True,
                                        allow_unused=True, materialize_grads=True)
        self.losses = losses.detach()
        self.leaves = list(leaves.values())
        self.live = [i for i, g in enumerate(grads) if g.requires_grad]  # with a graph
        self.grads = [grads[i] for i in self.live]
        self.batched: bool | None = None  # False once a batched backward has failed

    def _grad(self, outs: list[torch.Tensor], c: int | None) -> list[torch.Tensor]:
        """The backward of the kept gradients against ``outs`` (``c`` of them batched, or
        one); 0 for a leaf no kept gradient depends on."""
        if not self.grads:  # the gradient is constant: a zero Hessian
            return [torch.zeros(*(() if c is None else (c,)), *leaf.shape, dtype=leaf.dtype,
                                device=leaf.device) for leaf in self.leaves]
        with torch.enable_grad():
            return torch.autograd.grad(self.grads, self.leaves, grad_outputs=outs,
                                       retain_graph=True, is_grads_batched=c is not None,
                                       allow_unused=True, materialize_grads=True)

    def product(self, v: torch.Tensor) -> torch.Tensor:
        """``(M, n) -> (M, n)``: one backward pass."""
        vd = list(unflatten(v, self.objective.params).values())
        hv = self._grad([vd[i] for i in self.live], None)
        return torch.cat([h.reshape(self.m, -1) for h in hv], 1).detach()

    def batched_products(self, v: torch.Tensor) -> torch.Tensor:
        """``(M, c, n) -> (M, c, n)`` in one backward pass, the c vectors as a vmapped batch.

        Raises:
            RuntimeError: an op of the graph has no batching rule.
        """
        c, vt, outs, o = v.shape[1], v.transpose(0, 1), [], 0
        for leaf in self.leaves:  # (c, M, ...) slices of the vectors, one per leaf
            size = leaf[0].numel()
            outs.append(vt[:, :, o:o + size].reshape(c, *leaf.shape))
            o += size
        hv = self._grad([outs[i] for i in self.live], c)
        return torch.cat([h.reshape(c, self.m, -1) for h in hv], 2).transpose(0, 1).detach()

    def products(self, v: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """``(M, K, n) -> (M, K, n)``, ``chunk`` vectors per batched backward (all by
        default); one backward per vector once a batched one has failed."""
        k = v.shape[1]
        chunk = chunk or k
        if self.batched is not False:
            try:
                return torch.cat([self.batched_products(v[:, i:i + chunk])
                                  for i in range(0, k, chunk)], 1)
            except RuntimeError:  # an op without a batching rule
                self.batched = False
        return torch.stack([self.product(v[:, i]) for i in range(k)], 1)
