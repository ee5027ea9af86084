"""Sequential conv nets at many points, one point at a time, the first convolution shared.

The engine's looped paths run each perturbed point ``theta + t d`` of a conv net as
one ordinary forward pass over the data. For an ``nn.Sequential`` that starts with a
convolution, that pass can skip work a module call repeats for every point:

- the first convolution's input is the data itself, the same for every point, so its
  patches are unfolded once (im2col, ``U`` of shape ``(N Ho Wo, C_in kh kw)``) and
  each point's first layer is one matrix product
  ``y = U W^T + b`` (``W`` reshaped to ``(C_out, C_in kh kw)``), written into one
  buffer reused by every point. A convolution with few input channels (1 for the
  8x8 digits) reaches a fraction of the matmul speed, and a fresh multi-MB output
  per point is faulted in page by page on a CPU (glibc returns freed blocks of its
  adaptive mmap threshold to the OS);
- the product's rows are ``(n, h, w)`` and its columns the channels, i.e. the
  channels-last layout, which the following convolutions read as a view;
- activations act in place on tensors made here, never on the data.

Everything else (later convolutions through their own ``_conv_forward``, linear
layers, parameter-free pooling / flattening / dropout in eval mode) is the module's
own arithmetic, so values agree with a module call up to rounding (summation order
of the first layer). Gradient-free use only (the in-place activations).

Example::

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
    ...                     nn.Linear(64, 3)).double()
    >>> seq_conv_path(net)
    True
    >>> p = {k: v.detach()[None].repeat(2, *[1] * v.dim()) for k, v in net.named_parameters()}
    >>> x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    >>> with torch.no_grad():
    ...     out = seq_conv_logits(net, p, x)
    >>> out.shape, bool(torch.allclose(out[1], net(x)))
    (torch.Size([2, 5, 3]), True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .graph_trace import hooked, owns
from .stacked import Params, n_members

__all__ = ["seq_conv_path", "seq_conv_logits"]

_IN_PLACE = {nn.ReLU: torch.relu_, nn.Tanh: torch.tanh_}


def _plain_conv(mod: nn.Module) -> bool:
    """A convolution the shared unfold reproduces: 2-D, one group, zero padding given
    as numbers (not ``'same'``)."""
    return (type(mod) is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros"
            and isinstance(mod.padding, tuple))


def seq_conv_path(model: nn.Module) -> bool:
    """True when ``model`` is an ``nn.Sequential`` whose first child is a plain
    ``Conv2d`` (one group, numeric zero padding) and whose other children are
    ``Conv2d`` / ``Linear`` layers or modules with neither parameters nor buffers
    (activations, pooling, ``Flatten``, ``Dropout``): :func:`seq_conv_logits` can run
    it. A parameter-free module may sit at several places (``act = nn.ReLU()`` reused);
    a layer may not, nor share its weight or bias with another. No hook may be set: it
    would be skipped."""
    if type(model) is not nn.Sequential or not len(model) or not _plain_conv(model[0]):
        return False
    if hooked(model):
        return False
    names = dict(model.named_parameters())
    for name, mod in model._modules.items():  # a reused module at each place it sits
        if type(mod) in (nn.Conv2d, nn.Linear):  # subclasses may compute otherwise
            if not owns(name, mod, names):
                return False
        elif list(mod.parameters()) or list(mod.buffers()):
            return False
    return True


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _unfolded(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(U (N Ho Wo, C_in kh kw), Ho, Wo)``: the first layer's patches, rows in
    ``(n, h, w)`` order."""
    u = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (N, CKK, L)
    ho, wo = (_out_size(x.shape[2 + i], conv.kernel_size[i], conv.stride[i], conv.padding[i],
                        conv.dilation[i]) for i in range(2))
    return u.transpose(1, 2).reshape(-1, u.shape[1]), ho, wo


def _layer(name: str, mod: nn.Module, p: Params, i: int, h: torch.Tensor) -> torch.Tensor:
    """Member ``i``'s layer ``name`` applied to ``h`` (made here, so activations may
    overwrite it)."""
    if type(mod) in (nn.Conv2d, nn.Linear):
        b = p.get(f"{name}.bias")
        b = None if b is None else b[i]
        w = p[f"{name}.weight"][i]
        return mod._conv_forward(h, w, b) if type(mod) is nn.Conv2d else F.linear(h, w, b)
    if type(mod) in _IN_PLACE:
        return _IN_PLACE[type(mod)](h)
    if type(mod) is nn.LeakyReLU:
        return F.leaky_relu(h, mod.negative_slope, inplace=True)
    return mod(h)


def seq_conv_logits(model: nn.Sequential, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Outputs ``(M, N, ...)`` of every member of the stack ``params`` on ``x``
    ``(N, C, H, W)``, each member run alone, the first convolution as one product
    with the patches of ``x`` unfolded once (see the module docstring).

    ``model``: accepted by :func:`seq_conv_path`. Call under ``torch.no_grad()``.
    """
    first_name, first = next(iter(model._modules.items()))
    u, ho, wo = _unfolded(first, x)
    w0, b0 = params[f"{first_name}.weight"], params.get(f"{first_name}.bias")
    c_out = w0.shape[1]
    work = u.new_empty(u.shape[0], c_out)  # the first layer's output, reused by every member
    rest = list(model._modules.items())[1:]  # a reused module at each place (children(): once)
    out = []
    for i in range(n_members(params)):
        wt = w0[i].reshape(c_out, -1).t()
        h = (torch.mm(u, wt, out=work) if b0 is None
             else torch.addmm(b0[i], u, wt, out=work))
        h = h.view(len(x), ho, wo, c_out).permute(0, 3, 1, 2)  # NCHW shape, channels last
        for name, mod in rest:
            h = _layer(name, mod, params, i, h)
        # a net whose output is still the shared buffer (conv only) must not be overwritten
        out.append(h.clone() if h.untyped_storage().data_ptr() == work.data_ptr() else h)
    return torch.stack(out)
