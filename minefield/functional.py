"""Stacked weights: many models of one architecture evaluated in one call.

Parameters live in plain dicts ``{name: tensor}`` whose tensors carry a leading
*member* dimension M: ``params["0.weight"]`` has shape ``(M, out, in)``. One
``nn.Module`` supplies the architecture; :func:`stacked_forward` runs all M
members at once through ``torch.func.functional_call`` under ``torch.func.vmap``
(batched matmuls / grouped convolutions underneath), instead of loading weights
into the module one model at a time.

The dict type and its operations (member count, one member, flatten) live in
:mod:`minefield.stacked`; they are re-exported here.

This one mechanism serves training many models together (sweeps, minefield
searches), and evaluating many perturbed points ``theta + t d`` (basin radii,
landscapes).

Example::

    >>> from minefield import ModelConfig, build_model, init_params
    >>> model = build_model(ModelConfig(widths=(8,)), (2,), 2)
    >>> p = stack([init_params(model, "glorot_uniform", torch.Generator().manual_seed(s))
    ...            for s in range(3)])
    >>> stacked_forward(model, p, torch.randn(5, 2)).shape
    torch.Size([3, 5, 1])
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, vmap

from .config import ConfigError
from .loss import logits_only
from .stacked import (  # noqa: F401 - the stack operations, re-exported from their home
    Params,
    Stacked,
    alone,
    check_single,
    covers,
    flatten,
    member,
    n_members,
    one,
    select,
    stack,
    unflatten,
)

__all__ = ["bn_mode", "stochastic_modules", "check_buffers", "Stacked", "stack", "member", "one",
           "alone", "select", "check_single", "n_members", "flatten", "unflatten", "is_weight",
           "stacked_forward", "single_forward", "channels_last_input", "buffers_like",
           "chunked_forward", "activation_elements", "mlp_fast_path", "mlp_workspace"]


def is_weight(name: str, per_model_shape: torch.Size | tuple[int, ...]) -> bool:
    """Weight matrices and conv kernels (ndim >= 2); biases and norm layers are not."""
    return len(per_model_shape) >= 2


def buffers_like(model: nn.Module, m: int, device=None, dtype: torch.dtype | None = None
                 ) -> Params:
    """The module's buffers (BatchNorm running stats) repeated for M members, on
    ``device``; floating ones in ``dtype`` if given (counters keep theirs)."""
    return {k: b.detach().to(device, dtype if dtype and b.is_floating_point() else b.dtype)
            .unsqueeze(0).repeat(m, *([1] * b.dim())) for k, b in model.named_buffers()}


def stochastic_modules(model: nn.Module) -> list[str]:
    """Names of the submodules that draw random numbers in training mode (dropout of
    any kind with ``p > 0``)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def check_buffers(model: nn.Module, buffers: Params | None, members: int,
                  batch: bool = False) -> None:
    """Raise ``ConfigError`` unless ``buffers`` are the model's (every name, ``members``
    rows each), or absent where that is safe: without buffers the module's own are
    used, which for a BatchNorm layer never updated (``num_batches_tracked == 0``: a
    fresh module, while the trained statistics sit in ``FitResult.buffers``) would
    evaluate every point with mean 0 and variance 1. ``batch``: batch statistics
    are used, so the running ones are not needed."""
    names = [k for k, _ in model.named_buffers()]
    if buffers:
        missing, extra = sorted(set(names) - set(buffers)), sorted(set(buffers) - set(names))
        if missing or extra:
            raise ConfigError(f"buffers do not match the model's: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
        bad = [k for k, v in buffers.items() if v.dim() == 0 or v.shape[0] != members]
        if bad:
            raise ConfigError(f"buffers must have {members} row(s), one per model; "
                              f"{bad[0]} has shape {tuple(buffers[bad[0]].shape)}")
    elif not batch:
        fresh = [n for n, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                 and m.num_batches_tracked is not None and int(m.num_batches_tracked) == 0]
        if fresh:
            raise ConfigError(f"BatchNorm layer {fresh[0]!r} has never-updated running "
                              "statistics and no buffers were given: pass the trained ones "
                              "(FitResult.buffers, load_run_model's) or bn='batch'")


def batch_statistics(model: nn.Module) -> bool:
    """True when a BatchNorm layer keeps no running statistics
    (``track_running_stats=False``): it normalises with its batch even in evaluation
    mode, so its outputs depend on which inputs share a forward pass, and inputs must
    not be split into chunks.

    >>> batch_statistics(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    False
    >>> batch_statistics(nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)))
    True
    """
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
               for m in model.modules())


@contextmanager
def bn_mode(model: nn.Module, batch: bool) -> Iterator[nn.Module]:
    """``model`` in evaluation mode except its BatchNorm layers, which use batch
    statistics when ``batch`` (``model.train(batch)`` would also switch dropout on);
    every submodule's own mode is restored on exit.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5))
    >>> with bn_mode(m, True):
    ...     [x.training for x in m]
    [False, True, False]
    >>> [x.training for x in m]
    [True, True, True]
    """
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.training = batch
        yield model
    finally:
        for m, was in saved:
            m.training = was


_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.LeakyReLU, nn.Identity)
_FAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hooked(mod: nn.Module | None = None) -> bool:
    """Whether ``mod`` has forward, pre-forward or backward hooks (``None``: global ones,
    for all): a backward hook may change the gradients, which the MLP node would skip."""
    if mod is None:  # asked at every training step: plain attributes, no names built
        g = nn.modules.module
        return bool(g._global_forward_hooks or g._global_forward_pre_hooks
                    or g._global_backward_hooks or g._global_backward_pre_hooks)
    return bool(mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks
                or mod._backward_pre_hooks)


def _layout(model: nn.Sequential) -> tuple:
    """What :func:`mlp_fast_path` depends on, cheap to read: each child's name, class,
    identity, its weight's and bias's identity, and whether hooks are set."""
    return (_hooked(model), _hooked(), *(
        (name, type(mod), id(mod), id(getattr(mod, "weight", None)),
         id(getattr(mod, "bias", None)), _hooked(mod)) for name, mod in model._modules.items()))


def mlp_fast_path(model: nn.Module) -> bool:
    """True when ``model`` is a plain MLP (``nn.Sequential`` of ``Linear``, elementwise
    activations and a leading ``Flatten``) that batched matmuls can run directly.

    Exact classes only: a subclass (an ``nn.ReLU`` whose ``forward`` is SiLU, a masked
    ``Linear``, a ``Sequential`` with its own ``forward``) may compute otherwise, and
    a ``Linear`` whose weight is tied to another layer's (absent from ``named_parameters``)
    or parametrised has no parameter of its own name. No forward, pre-forward or backward
    hook may be set (the model's, a layer's, a global one): the matmuls would skip it.

    >>> m = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> handle = m[1].register_forward_hook(lambda mod, inp, out: out * 0.5)
    >>> mlp_fast_path(m), handle.remove(), mlp_fast_path(m)
    (False, None, True)
    """
    if type(model) is not nn.Sequential:
        return False
    if torch.compiler.is_compiling():  # no cache: dynamo guarded its weak entries, which GC
        return _plain_mlp(model)  # dropped mid-compile once (an IndexError in a guard)
    layout, hit = _layout(model), _FAST.get(model)  # cached: a training step asks each time
    if hit is not None and hit[0] == layout:
        return hit[1]
    _FAST[model] = (layout, _plain_mlp(model))
    return _FAST[model][1]


def _plain_mlp(model: nn.Sequential) -> bool:
    names = dict(model.named_parameters())
    seen_linear = False
    for name, mod in model._modules.items():  # a reused module at each place (children(): once)
        if type(mod) is nn.Linear:
            if f"{name}.weight" not in names or (
                    mod.bias is not None and f"{name}.bias" not in names):
                return False
            seen_linear = True
        elif type(mod) is nn.Flatten:
            if seen_linear or (mod.start_dim, mod.end_dim) != (1, -1):
                return False
        elif type(mod) not in _ELEMENTWISE:
            return False
    from .graph_trace import hooked  # a hook would be skipped (the model's, a layer's, global)
    return seen_linear and not hooked(model)


def mlp_workspace(model: nn.Sequential, members: int, inputs: int,
                  like: torch.Tensor) -> list[torch.Tensor]:
    """Two flat buffers, each able to hold one hidden layer's ``(members, inputs, width)``
    activations: :func:`_mlp_forward` alternates between them (gradient-free use only)."""
    width = max(m.out_features for m in model if isinstance(m, nn.Linear))
    return [torch.empty(members * inputs * width, dtype=like.dtype, device=like.device)
            for _ in range(2)]


def _mlp_forward(model: nn.Sequential, params: Params, x: torch.Tensor,
                 work: list[torch.Tensor] | None = None,
                 record: list | None = None) -> torch.Tensor:
    """Logits ``(M, N, C)`` of a stacked plain MLP, weights ``(M, out, in)``.

    ``h <- act(b + h W^T)`` as one ``baddbmm`` per layer with the bias fused and the
    activation in place: on a CPU the separate bias add and activation of the
    ``vmap`` path cost as much as the matmuls (they stream (M, N, width) tensors
    through memory twice more). Same values as the ``vmap`` path up to rounding.
    ``work`` (:func:`mlp_workspace`, no autograd): the hidden layers are written into
    these two reused buffers instead of fresh tensors; a fresh multi-MB tensor per
    layer and chunk is first touched, page by page, by the bias copy, which cost the
    swiss-roll MLP's widest layer several times its matmul on a CPU. The weights are
    read through a transposed view: a transposed copy of every direction (the engine's
    former layout) cost more than it saved (idle 2-core CPU, 2026-11-30).
    ``record`` (a list) receives what a backward pass reads, in order:
    ``(name, input, weight)`` per ``Linear`` and ``(module, result)`` per activation
    after the first ``Linear`` (:mod:`minefield.mlpgrad`).
    """
    h = x  # (N, ...) shared by every member, then (M, N, width)
    own = False  # in place only on a Linear's fresh output (not x, not an activation's)
    last = max(i for i, m in enumerate(model) if isinstance(m, nn.Linear))
    for i, (name, mod) in enumerate(model._modules.items()):  # repeats included
        if isinstance(mod, nn.Linear):
            w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
            if h.dim() == 2:  # first layer: one input batch shared by every member
                h = h.expand(w.shape[0], *h.shape)
            wt = w.transpose(1, 2)  # (M, in, out): a view, which MKL reads as it is
            out = None
            if work is not None and i != last:
                n_out = h.shape[0] * h.shape[1] * wt.shape[2]
                buf = work[1] if h.data_ptr() == work[0].data_ptr() else work[0]
                out = buf[:n_out].view(h.shape[0], h.shape[1], wt.shape[2])
            if record is not None:
                record.append((name, h, w))
            h = (torch.bmm(h, wt, out=out) if b is None
                 else torch.baddbmm(b.unsqueeze(1), h, wt, out=out))
        elif isinstance(mod, nn.Flatten):
            h = h.flatten(1)
        elif isinstance(mod, nn.ReLU):
            h = h.relu_() if own else h.relu()
        elif isinstance(mod, nn.LeakyReLU):
            h = torch.nn.functional.leaky_relu(  # in place: its backward reads the result
                h, mod.negative_slope, inplace=own and mod.negative_slope >= 0)
        elif isinstance(mod, nn.Tanh):
            h = h.tanh_() if own else h.tanh()
        else:
            continue
        if record and not isinstance(mod, (nn.Linear, nn.Flatten)):  # after a Linear
            record.append((mod, h))
        own = isinstance(mod, nn.Linear)
    return h


def stacked_forward(model: nn.Module, params: Params, x: torch.Tensor,
                    buffers: Params | None = None, per_member_x: bool = False,
                    path: str = "auto") -> torch.Tensor:
    """Logits of every member: ``(M, N, C)``.

    ``x`` is ``(N, ...)`` shared by all members, or ``(M, N, ...)`` with
    ``per_member_x=True``. BatchNorm follows the module's mode: call
    ``model.train()`` to use batch statistics (updating the stacked ``buffers``
    in place), ``model.eval()`` (the default) to use the running statistics.
    ``path="auto"`` runs plain MLPs (:func:`mlp_fast_path`) given all their parameters
    (:func:`covers`) as batched matmuls, a stack of one as the plain module
    (:func:`single_forward`), the rest (all with ``path="vmap"``) by ``vmap``.
    """
    buffers = buffers or {}
    if path not in ("auto", "vmap"):
        raise ValueError(f"unknown forward path {path!r}; use auto or vmap")
    auto = path == "auto" and not per_member_x
    if auto and not buffers and mlp_fast_path(model) and covers(model, params):
        return _mlp_forward(model, params, x)
    if auto and n_members(params) == 1:
        return single_forward(model, params, x, buffers)

    def f(p, b, xx):
        return functional_call(model, (p, b), (xx,))

    in_b = 0 if buffers else None
    return vmap(f, in_dims=(0, in_b, 0 if per_member_x else None))(params, buffers, x)


def single_forward(model: nn.Module, params: Params, x: torch.Tensor,
                   buffers: Params | None = None) -> torch.Tensor:
    """A stack of one member run as the plain module: logits ``(1, N, C)``.

    No ``vmap``: each layer is the ordinary kernel (one convolution, not a grouped
    one), so one model trains and evaluates as fast as ``nn.Module`` code. The
    member's views ``params[k][0]`` carry gradients back to the stack, and
    BatchNorm in training mode updates ``buffers[k][0]`` in place, as the stacked
    path does. Same values as the ``vmap`` path up to rounding.
    """
    p = {k: v.squeeze(0) for k, v in params.items()}  # a view whose backward is one too
    b = {k: v[0] for k, v in (buffers or {}).items()}
    if channels_last_input(model, x):
        x = x.contiguous(memory_format=torch.channels_last)
    return logits_only(functional_call(model, (p, b), (x,))).unsqueeze(0)


def channels_last_input(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`single_forward` hands a conv net its images channels-last.

    A fixed rule, measured on this project's 2-core CPU (``benchmarks/bench_real.py``,
    training row): on a CPU, oneDNN's channels-last kernels trained ResNet-20 1.2x
    faster than the default NCHW layout (batch 32) and the small digits CNN 1.04-1.10x;
    so a CPU conv net takes channels-last input when gradients are on (training), and
    when it has BatchNorm (evaluation too: the engine's ``loop_cl`` rule). A layout only
    changes the rounding, not the values (tested to 1e-12 in float64). On CUDA the
    layout stays NCHW until it is measured there (``benchmarks/gpu.sh``).
    """
    if x.dim() != 4 or x.device.type != "cpu":
        return False
    mods = list(model.modules())
    if not any(isinstance(m, nn.Conv2d) for m in mods):
        return False
    return torch.is_grad_enabled() or any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                          for m in mods)


_ACT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def activation_elements(model: nn.Module, sample: torch.Tensor, largest: bool = False) -> int:
    """Elements of all intermediate outputs for one model and one input point (with
    ``largest=True``: of the largest single output).

    Used to size chunks: a forward pass of ``M`` members on ``N`` points keeps
    about ``M * N * activation_elements`` floats alive, and one layer's working set is
    about ``N * activation_elements(largest=True)`` floats.
    """
    # keyed on the module (weakly; an id() is reused once it is freed) and parameter shapes
    cache = _ACT_CACHE.setdefault(model, {})
    key = (tuple(sample.shape[1:]), tuple(p.shape for p in model.parameters()))
    if key not in cache:
        sizes = []

        def hook(_m, _i, out):
            if isinstance(out, torch.Tensor):
                sizes.append(out[0].numel())

        leaves = [m for m in model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with torch.no_grad(), bn_mode(model, False):
                w = next(model.parameters())  # the module's own device and dtype
                s = sample[:2].detach().to(w.device)  # 2: BatchNorm1d on batch stats refuses 1
                logits_only(model(s.to(w.dtype) if s.is_floating_point() else s))
        finally:
            for h in handles:
                h.remove()
        cache[key] = (max(sum(sizes), 1), max(sizes, default=1))
    return cache[key][1 if largest else 0]


def chunked_forward(model: nn.Module, params: Params, x: torch.Tensor,
                    buffers: Params | None = None, memory_mb: float = 512.0,
                    point_chunk: int | None = None):
    """Yield ``(member_slice, point_slice, logits)`` covering all members and points.

    Members and points are chunked so that one forward pass keeps about
    ``memory_mb`` of activations alive; on a GPU raise it, on a small CPU lower it.
    """
    m, n = n_members(params), x.shape[0]
    per = activation_elements(model, x) * x.element_size()
    budget = memory_mb * 2**20
    pts = point_chunk or max(1, min(n, int(budget // per)))
    if batch_statistics(model):  # each chunk would be normalised on its own
        pts = n
    mem = max(1, min(m, int(budget // (per * pts))))
    for i in range(0, m, mem):
        sl = slice(i, min(m, i + mem))
        p = select(params, sl)
        b = select(buffers, sl) if buffers else None
        for j in range(0, n, pts):
            ps = slice(j, min(n, j + pts))
            yield sl, ps, stacked_forward(model, p, x[ps], b)
