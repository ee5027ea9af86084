"""A stack of plain MLPs evaluated in homogeneous coordinates: each bias inside its matmul.

The engine's MLP path (:func:`minefield.functional._mlp_forward`) runs a layer as
``h <- act(b + h W^T)`` with one ``torch.baddbmm``, which first copies the
broadcast bias into the whole ``(M, N, out)`` output and then adds the matmul to
it. On a CPU that copy streams the layer's activations through memory once more:
18% of the swiss-roll MLP's evaluation time (1024 points, 200 inputs, 2 threads).
Appending a constant 1 to every hidden vector removes it:

.. math::

    [h \\mid 1] \\begin{bmatrix} W^\\top & 0 \\\\ b^\\top & 0 \\end{bmatrix}
    = [h W^\\top + b \\mid 0],

so one plain ``bmm`` writes the layer's output, one column wider. That extra column
is set to 1 before the next matmul reads it (a strided write of ``M N`` numbers, not
``M N out``): computed as ``0 h + 1`` it would be NaN wherever a unit overflowed to
``inf``, where the layers themselves can still give a finite value (a ReLU zeroing
``-inf``, a Tanh saturating). The augmented weights ``(M, out + 1, in + 1)`` are
written by the engine's point maker straight into :meth:`Workspace.views` (or copied
by :meth:`Workspace.pack`), a few percent of the activations' size. The values are
those of ``_mlp_forward`` up to the rounding of a sum's order (the bias joins the dot
product as its last term); no gradients (evaluation only). The swiss-roll MLP's
evaluation above ran 1.13-1.16x as fast as with the ``baddbmm`` layers (idle 2-core
Intel Xeon, 2026-12-02; ``benchmarks/bench_real.py``).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from minefield.functional import _mlp_forward, stack
    >>> model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    >>> p = stack([dict(model.named_parameters())] * 2)
    >>> x = torch.randn(5, 2, dtype=torch.float64)
    >>> work = Workspace(model, 2, 5, x)
    >>> bool(torch.allclose(forward(model, work.pack(p), x, work), _mlp_forward(model, p, x)))
    True
"""

from __future__ import annotations

import torch
from torch import nn

from .functional import Params

__all__ = ["Workspace", "fits", "forward"]


def _linears(model: nn.Sequential) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model._modules.items() if isinstance(m, nn.Linear)]


def fits(model: nn.Sequential, params: Params) -> bool:
    """Whether the stack ``params`` holds every ``Linear``'s tensors with the shapes of
    its ``in_features`` and ``out_features``, which size the :class:`Workspace`: a
    centre of other widths (which ``functional_call`` runs) would be written into views
    of the wrong shape (``out=`` resizes them) and read back scrambled."""
    for name, lin in _linears(model):
        want = {"weight": (lin.out_features, lin.in_features), "bias": (lin.out_features,)}
        for kind, shape in want.items():
            t = params.get(f"{name}.{kind}")
            if (t is None) != (kind == "bias" and lin.bias is None) or (
                    t is not None and tuple(t.shape[1:]) != shape):
                return False
    return True


class Workspace:
    """Reused buffers for chunks of at most ``members`` points on ``inputs`` inputs:
    the augmented weights of every ``Linear`` and two activation buffers
    ``(members, inputs, width + 1)`` that the hidden layers alternate between."""

    def __init__(self, model: nn.Sequential, members: int, inputs: int, like: torch.Tensor):
        kw = {"dtype": like.dtype, "device": like.device}
        lins = _linears(model)
        last = lins[-1][0]
        self.weights: dict[str, torch.Tensor] = {}
        for name, lin in lins:  # (a reused or tied Linear never comes here: mlp_fast_path)
            o = lin.out_features + (name != last)
            # a hidden layer's last row stays 0: it writes the column forward() sets to 1
            self.weights[name] = torch.zeros(members, o, lin.in_features + 1, **kw)
        width = max(m.out_features for _, m in lins) + 1
        self.acts = [torch.empty(members * inputs * width, **kw) for _ in range(2)]
        self.has_bias = {name: lin.bias is not None for name, lin in lins}
        self.n_out = {name: lin.out_features for name, lin in lins}

    def views(self, m: int) -> Params:
        """Where the parameters of a chunk of ``m`` points go, ``{name: view}``: a
        ``make`` that writes them there (``out=``) spares :meth:`pack` its copy."""
        out = {}
        for name, w in self.weights.items():
            o = self.n_out[name]
            out[f"{name}.weight"] = w[:m, :o, :-1]
            if self.has_bias[name]:
                out[f"{name}.bias"] = w[:m, :o, -1]
        return out

    @torch.no_grad()
    def pack(self, params: Params) -> dict[str, torch.Tensor]:
        """The augmented weights ``(m, out (+1), in + 1)`` of the stack ``params``
        (``m`` members, at most the workspace's): ``[[W, b], [0, 0]]`` per ``Linear``.
        Tensors already in place (:meth:`views`) are not copied."""
        m = params[next(iter(params))].shape[0]
        for name, view in self.views(m).items():
            if params[name].data_ptr() != view.data_ptr():
                view.copy_(params[name])
        return {name: w[:m] for name, w in self.weights.items()}


@torch.no_grad()
def forward(model: nn.Sequential, packed: dict[str, torch.Tensor], x: torch.Tensor,
            work: Workspace) -> torch.Tensor:
    """Logits ``(m, N, C)`` of a plain MLP (:func:`~minefield.functional.mlp_fast_path`)
    from :meth:`Workspace.pack`'s weights, ``x`` ``(N, ...)`` shared by every member."""
    m = packed[next(iter(packed))].shape[0]
    last = _linears(model)[-1][0]
    h, seen = x, False
    for name, mod in model._modules.items():
        if isinstance(mod, nn.Flatten):  # only before the first Linear (mlp_fast_path)
            h = h.flatten(1)
        elif isinstance(mod, nn.Linear):
            if not seen:  # the first layer: x and its constant column, shared
                h = torch.cat([h, h.new_ones(len(h), 1)], 1).expand(m, len(h), -1)
            else:  # whatever the activations made of it (tanh(1), NaN from 0 * inf)
                h[..., -1] = 1
            wt = packed[name].transpose(1, 2)  # (m, in + 1, out (+1)): a view
            if name == last:
                h = torch.bmm(h, wt)
            else:
                buf = work.acts[1] if h.data_ptr() == work.acts[0].data_ptr() else work.acts[0]
                h = torch.bmm(h, wt, out=buf[:m * h.shape[1] * wt.shape[2]].view(
                    m, h.shape[1], wt.shape[2]))
            seen = True
        elif not seen:  # before the first Linear: x itself, not to be overwritten
            h = _activate(mod, h.clone())
        else:
            h = _activate(mod, h)
    return h


def _activate(mod: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.ReLU):
        return h.relu_()
    if isinstance(mod, nn.LeakyReLU):
        return torch.nn.functional.leaky_relu(h, mod.negative_slope, inplace=True)
    if isinstance(mod, nn.Tanh):
        return h.tanh_()
    return h  # Identity
