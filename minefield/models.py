"""Models by name, and seeded initialisation without touching the global RNG.

``MODELS`` maps a name to a builder ``(ModelConfig, input_shape, n_out) -> nn.Module``:

- ``mlp``: any hidden widths; the paper's swiss-roll net is widths
  ``(23, 16, 26, 32, 28, 31)`` (3614 parameters), the minefield net
  ``(25, 25, 25, 25)`` (2051 parameters), the circles net ``(100,) * 9``.
- ``cnn``: a small conv net for 8x8 digits.
- ``resnet20``: the paper's SVHN net, a pre-activation ResNet 6n+2 (n=3), widths
  16/32/64, leaky-ReLU 0.1, BN eps 1e-3 (269,722 parameters with 10 classes).
- ``resnet18``: the common CIFAR ResNet-18 (11.2M parameters).

Binary problems use one logit (sigmoid), as the paper does; K classes use K.
Modules are only *architectures* here: weights live in plain dicts of tensors
(see :mod:`minefield.functional`), so many models can share one module.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .options import Activation, Init, option

__all__ = ["MODELS", "INITS", "build_model", "init_params", "n_outputs", "ModelError"]


class ModelError(ValueError):
    """Unknown model or an architecture that does not fit the data."""


_ACT = {Activation.RELU: nn.ReLU, Activation.TANH: nn.Tanh,
        Activation.LEAKY_RELU: lambda: nn.LeakyReLU(0.1)}


def _mlp(cfg: ModelConfig, input_shape: tuple[int, ...], n_out: int) -> nn.Module:
    sizes = [math.prod(input_shape), *cfg.widths, n_out]
    layers: list[nn.Module] = [nn.Flatten()] if len(input_shape) > 1 else []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(_ACT[cfg.activation]())
    return nn.Sequential(*layers)


def _cnn(cfg: ModelConfig, input_shape: tuple[int, ...], n_out: int) -> nn.Module:
    if len(input_shape) != 3:
        raise ModelError(f"cnn needs image input (C, H, W), got shape {input_shape}")
    w = list(cfg.widths) if len(cfg.widths) == 2 else [16, 32]
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, w[0], 3, padding=1), nn.ReLU(),
        nn.Conv2d(w[0], w[1], 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * w[1], n_out),
    )


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, slope: float, eps: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.act = nn.LeakyReLU(slope)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        o = self.act(self.bn1(x))
        # Parameter-free shortcut as in the TF ResNet: average-pool, zero-pad channels.
        s = F.avg_pool2d(x, self.stride) if self.stride > 1 else x
        if self.pad:
            s = F.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        o = self.conv1(o)
        o = self.conv2(self.act(self.bn2(o)))
        return o + s


class _ResNet20(nn.Module):
    """Pre-activation ResNet 6n+2 as in the paper's SVHN code (n=3: 20 layers)."""

    def __init__(self, in_ch: int, n_out: int, widths=(16, 32, 64), n=3):
        super().__init__()
        slope, eps = 0.1, 1e-3
        self.stem = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(_PreActBlock(cin, w, 2 if (j == 0 and i > 0) else 1, slope, eps))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin, eps=eps)
        self.act = nn.LeakyReLU(slope)
        self.fc = nn.Linear(cin, n_out)

    def forward(self, x):
        x = self.act(self.bn(self.blocks(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        o = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(o)) + self.short(x))


class _ResNet18(nn.Module):
    def __init__(self, in_ch: int, n_out: int, widths=(64, 128, 256, 512)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                blocks.append(_BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, n_out)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def _image_channels(name: str, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 3:
        raise ModelError(f"{name} needs image input (C, H, W), got shape {input_shape}")
    return input_shape[0]


def _resnet20(cfg: ModelConfig, input_shape, n_out) -> nn.Module:
    widths = tuple(cfg.widths) if len(cfg.widths) == 3 else (16, 32, 64)
    return _ResNet20(_image_channels("resnet20", input_shape), n_out, widths)


def _resnet18(cfg: ModelConfig, input_shape, n_out) -> nn.Module:
    widths = tuple(cfg.widths) if len(cfg.widths) == 4 else (64, 128, 256, 512)
    return _ResNet18(_image_channels("resnet18", input_shape), n_out, widths)


MODELS: dict[str, Callable[[ModelConfig, tuple[int, ...], int], nn.Module]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "resnet20": _resnet20,
    "resnet18": _resnet18,
}


def n_outputs(n_classes: int, outputs: int | None = None) -> int:
    """Logits of a model for ``n_classes`` classes: by default one for binary problems
    (sigmoid), else one per class. ``outputs`` (``ModelConfig.outputs``) asks for a
    number: one per class, or for two classes also 1 (the loss reads a single column
    as a sigmoid logit and several as a softmax, :mod:`minefield.loss`).

    >>> n_outputs(2), n_outputs(2, outputs=2), n_outputs(10)
    (1, 2, 10)
    >>> n_outputs(10, outputs=2)
    Traceback (most recent call last):
        ...
    minefield.models.ModelError: model.outputs=2 does not fit 10 classes: give 10 (one per class)
    """
    if outputs is None:
        return 1 if n_classes == 2 else n_classes
    if outputs != n_classes and not (n_classes == 2 and outputs == 1):
        raise ModelError(f"model.outputs={outputs} does not fit {n_classes} classes: give "
                         f"{'1 (sigmoid) or 2 (softmax)' if n_classes == 2 else n_classes}"
                         f"{'' if n_classes == 2 else ' (one per class)'}")
    return outputs


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """The architecture named by ``cfg.name``, in eval mode, on the CPU.

    Its own parameters are zeros: draw weights with :func:`init_params`.
    """
    try:
        builder = MODELS[cfg.name]
    except KeyError:
        raise ModelError(
            f"unknown model {cfg.name!r}; choose from {', '.join(sorted(MODELS))}") from None
    # Built on the meta device so that construction draws nothing from the global
    # RNG; weights come from init_params, so the module's own are zeros.
    with torch.device("meta"):
        model = builder(cfg, tuple(input_shape), n_outputs(n_classes, cfg.outputs))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
    return model.eval()


# --- initialisation -------------------------------------------------------------------


def _fans(w: torch.Tensor) -> tuple[int, int]:
    rf = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    return w.shape[1] * rf, w.shape[0] * rf


def _glorot_normal(w, g):
    fi, fo = _fans(w)
    # Keras' glorot_normal is a normal truncated at 2 std, rescaled to keep the variance.
    std = math.sqrt(2.0 / (fi + fo)) / 0.87962566103423978
    return torch.nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std, generator=g), None


def _glorot_uniform(w, g):
    fi, fo = _fans(w)
    a = math.sqrt(6.0 / (fi + fo))
    return w.uniform_(-a, a, generator=g), None


def _he_normal(w, g):
    fi, _ = _fans(w)
    return w.normal_(0.0, math.sqrt(2.0 / fi), generator=g), None


def _torch_default(w, g):
    # nn.Linear / nn.Conv default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), ...);
    # biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    fi, _ = _fans(w)
    b = 1.0 / math.sqrt(fi)
    return w.uniform_(-b, b, generator=g), b


INITS = {Init.GLOROT_NORMAL: _glorot_normal, Init.GLOROT_UNIFORM: _glorot_uniform,
         Init.HE_NORMAL: _he_normal, Init.TORCH: _torch_default}


@torch.no_grad()
def init_params(model: nn.Module, scheme: Init | str, generator: torch.Generator
                ) -> dict[str, torch.Tensor]:
    """Fresh parameters for ``model``, drawn from ``generator`` (global RNG untouched).

    Weight matrices and kernels follow ``scheme``; biases are zero (Keras/TF
    convention) except for ``torch``, which draws them as PyTorch does; BatchNorm
    scales are one and shifts zero. Returns ``{name: tensor}`` in
    ``model.named_parameters()`` order.
    """
    fn = INITS[option(Init, scheme, "init")]
    out: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        mod_name, _, leaf = name.rpartition(".")
        mod = modules[mod_name]
        t = torch.empty(p.shape, dtype=torch.float32)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            t.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf == "weight":
            _, bias_bound = fn(t, generator)
            if bias_bound is not None and getattr(mod, "bias", None) is not None:
                out[f"{mod_name}.bias" if mod_name else "bias"] = torch.empty(
                    mod.bias.shape).uniform_(-bias_bound, bias_bound, generator=generator)
        elif name not in out:
            t.zero_()
        if name not in out:
            out[name] = t
    return {name: out[name] for name, _ in model.named_parameters()}
