"""Stacked parameters: the weights of M models of one architecture in one dict.

A stack maps each parameter name to a tensor with a leading *member*
dimension: ``p["0.weight"]`` is ``(M, out, in)``. :class:`Stacked` is that dict
with the operations every stage needs, so that no caller slices by hand:

=======================  =====================================================
``p.n_members``          M
``p.member(i)``          model i, per-model shapes (views)
``p.one(i)``             model i as a stack of one, ``(1, ...)`` (views)
``p.select(idx)``        the members ``idx`` (a slice, indices or a mask)
``p.check_single(what)`` ``p`` if M = 1, else ValueError naming ``what``
``p.flatten()``          ``(M, n_params)``, names in dict order
``p.unflatten(flat)``    ``(K, n_params)`` back to a K-member stack shaped as ``p``
``Stacked.of(models)``   stack per-model dicts
=======================  =====================================================

A :class:`Stacked` *is* a ``dict`` (``functional_call``, safetensors and every
function taking ``Params`` accept it) and a registered pytree node, so
``torch.func.vmap`` maps over it like a plain dict. The module-level functions
(:func:`member`, :func:`one`, ...) are the same operations on any dict of
stacked tensors (also stacked buffers and metrics) and return plain dicts: the
library passes plain dicts to ``torch.func``, whose ``jvp``/``vjp`` insist that
primals and tangents be of the same type.

Example::

    >>> p = Stacked.of([{"w": torch.zeros(2, 3), "b": torch.zeros(2)},
    ...                 {"w": torch.ones(2, 3), "b": torch.ones(2)}])
    >>> p.n_members, p.one(1)["w"].shape, p.member(1)["w"].shape, p.flatten().shape
    (2, torch.Size([1, 2, 3]), torch.Size([2, 3]), torch.Size([2, 8]))
    >>> torch.equal(p.unflatten(p.flatten())["w"], p["w"])
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.utils._pytree as pytree

__all__ = ["Params", "Stacked", "stack", "member", "one", "alone", "select", "check_single",
           "n_members", "flatten", "unflatten", "covers"]

Params = dict[str, torch.Tensor]


class Stacked(dict):
    """``{name: (M, *shape)}``: M models of one architecture (see the module docstring)."""

    @classmethod
    def of(cls, models: Sequence[Params]) -> Stacked:
        """Stack per-model dicts (same names and shapes) into M = ``len(models)`` members."""
        return cls({k: torch.stack([p[k] for p in models]) for k in models[0]})

    @property
    def n_members(self) -> int:
        """M, the leading member dimension."""
        return next(iter(self.values())).shape[0]

    def member(self, i: int) -> Params:
        """Model ``i`` with its own shapes (views, no copy)."""
        return {k: v[i] for k, v in self.items()}

    def one(self, i: int) -> Stacked:
        """Model ``i`` as a stack of one member, ``(1, ...)`` (views, no copy)."""
        return Stacked({k: v[i:i + 1] for k, v in self.items()})

    def select(self, idx: slice | torch.Tensor | Sequence[int]) -> Stacked:
        """The members ``idx``: a slice (views), index tensor or boolean mask (copies)."""
        return Stacked({k: v[idx] for k, v in self.items()})

    def check_single(self, what: str = "params") -> Stacked:
        """``self`` if it holds exactly one member ``(1, ...)``, else ValueError."""
        if self.n_members != 1:
            raise ValueError(f"{what} must be a single member (1, ...), got {self.n_members} "
                             "members")
        return self

    def flatten(self) -> torch.Tensor:
        """``(M, n_params)``: each member's tensors concatenated in dict order."""
        m = self.n_members
        return torch.cat([v.reshape(m, -1) for v in self.values()], 1)

    def unflatten(self, flat: torch.Tensor) -> Stacked:
        """Inverse of :meth:`flatten`: ``(K, n_params)`` into K members shaped as ``self``.

        Raises:
            ValueError: ``flat`` is not ``(K, n_params)`` for this layout.
        """
        sizes = [math.prod(v.shape[1:]) for v in self.values()]
        if flat.dim() != 2 or flat.shape[1] != sum(sizes):
            raise ValueError(f"expected (K, {sum(sizes)}) flat parameters, got "
                             f"{tuple(flat.shape)}")
        out, i = Stacked(), 0
        for (k, v), n in zip(self.items(), sizes):
            out[k] = flat[:, i:i + n].reshape(flat.shape[0], *v.shape[1:])
            i += n
        return out


# vmap, grad and functional_call see a Stacked as the dict it is (values in key order)
pytree.register_pytree_node(
    Stacked,
    lambda s: (list(s.values()), list(s.keys())),
    lambda values, keys: Stacked(zip(keys, values)),
    serialized_type_name="minefield.stacked.Stacked",
    flatten_with_keys_fn=lambda s: ([(pytree.MappingKey(k), v) for k, v in s.items()],
                                    list(s.keys())),
)


def stack(items: Sequence[Params]) -> Params:
    """Stack per-model dicts into one dict with a leading member dimension."""
    return dict(Stacked.of(items))


def member(params: Params, i: int) -> Params:
    """The ``i``-th model of a stack (views, no copy)."""
    return Stacked(params).member(i)


def n_members(params: Params) -> int:
    """M, the leading member dimension of a stack."""
    return Stacked(params).n_members


def one(params: Params | None, i: int) -> Params | None:
    """Member ``i`` as a stack of one, ``(1, ...)`` (views); ``None`` (no buffers) stays None."""
    return None if params is None else dict(Stacked(params).one(i))


def alone(params: Params, i: int) -> Params:
    """Member ``i`` as a stack of one ``(1, ...)`` in fresh storage (a copy, not a view).

    Fresh tensors start on the allocator's 64-byte boundary, so kernels see member
    ``i`` at the same alignment whatever its position in the stack (BLAS results
    can depend on alignment; see :func:`minefield.step.isolated`).

    Example::

        >>> p = {"w": torch.arange(6.0).reshape(3, 2)}
        >>> a = alone(p, 1)
        >>> a["w"], a["w"].data_ptr() != p["w"][1].data_ptr()
        (tensor([[2., 3.]]), True)
    """
    return {k: v[i:i + 1].clone() for k, v in params.items()}


def select(params: Params, idx: slice | torch.Tensor | Sequence[int]) -> Params:
    """The members ``idx`` of a stack (see :meth:`Stacked.select`)."""
    return dict(Stacked(params).select(idx))


def check_single(params: Params, what: str = "params") -> Params:
    """``params`` if it is a stack of one member ``(1, ...)``, else ValueError."""
    Stacked(params).check_single(what)
    return params


def flatten(params: Params) -> torch.Tensor:
    """``(M, n_params)`` view of a stack, in dict order."""
    return Stacked(params).flatten()


def unflatten(flat: torch.Tensor, like: Params) -> Params:
    """Inverse of :func:`flatten`: ``(M, n_params)`` into a dict shaped as ``like``."""
    return dict(Stacked(like).unflatten(flat))


def covers(model, params: Params) -> bool:
    """Whether ``params`` holds every parameter of the ``nn.Module`` ``model``.

    ``functional_call`` runs a name left out as the module's own tensor (a frozen layer
    kept out of the stack stays fixed, as on the engine's ``vmap`` path); the paths that
    compute the layers themselves (the MLP matmuls, the sequential conv path, the
    R-operators) would read a missing bias as none, so they take only complete stacks.

    >>> from torch import nn
    >>> m = nn.Sequential(nn.Linear(2, 1))
    >>> covers(m, dict(m.named_parameters())), covers(m, {"0.weight": m[0].weight})
    (True, False)
    """
    return all(k in params for k, _ in model.named_parameters())
