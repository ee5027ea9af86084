"""A 2-D map of weight space: trajectory checkpoints and bad minima embedded together.

The paper's Fig. 1 flattens each model's weights (kernels only: the weight
matrices, biases dropped; 1,950 numbers for the spiral MLP), reduces them to 50
dimensions with PCA (``random_state=0``) and runs t-SNE (perplexity 30) on the
result. The SGD iterates then trace a path through a "minefield" of bad minima.
Here t-SNE is openTSNE's (random initialisation, seeded), so the map is a pure
function of the weights and the config.

:func:`embed_points` is the maths (array in, coordinates out);
:func:`minefield.stages.embed_run` collects a run's trajectory and its search
results, embeds them and saves ``runs/<name>/embed/embed.json``.

Example::

    >>> x = torch.randn(60, 10, generator=torch.Generator().manual_seed(0))
    >>> embed_points(x, EmbedConfig(perplexity=10, n_iter=250)).shape
    torch.Size([60, 2])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .config import ConfigError, _Config
from .functional import Params, flatten, is_weight

__all__ = ["EmbedConfig", "EmbedResult", "weight_matrix", "embed_points"]


@dataclass(frozen=True)
class EmbedConfig(_Config):
    """PCA to ``pca_dims`` then t-SNE to 2-D.

    ``kernels_only`` keeps weight matrices / conv kernels and drops biases (the
    paper); ``False`` embeds all parameters. ``n_iter`` counts the optimisation
    iterations after openTSNE's 250 early-exaggeration iterations.
    """

    kernels_only: bool = True
    pca_dims: int = 50
    perplexity: float = 30.0
    n_iter: int = 750
    seed: int = 0
    _section: ClassVar[str] = "embed"

    def _validate(self):
        if self.pca_dims < 2:
            raise ConfigError(f"embed.pca_dims must be >= 2, got {self.pca_dims}")
        if not self.perplexity > 0 or self.perplexity == float("inf"):
            raise ConfigError(f"embed.perplexity must be > 0, got {self.perplexity}")
        if self.n_iter < 1:
            raise ConfigError(f"embed.n_iter must be >= 1, got {self.n_iter}")


def weight_matrix(params: Params, kernels_only: bool = True) -> torch.Tensor:
    """``(M, D)`` rows of flattened weights; kernels only (ndim >= 2) or everything."""
    if kernels_only:
        params = {k: v for k, v in params.items() if is_weight(k, v.shape[1:])}
        if not params:
            raise ValueError("kernels_only=True but the model has no weight matrices")
    return flatten(params)


def embed_points(x: torch.Tensor, cfg: EmbedConfig = EmbedConfig()) -> torch.Tensor:
    """PCA to ``min(pca_dims, N, D)`` dims, then t-SNE: ``(N, D)`` -> ``(N, 2)`` float64.

    A perplexity too large for N points (openTSNE needs ``3 * perplexity < N``)
    is lowered to ``(N - 1) / 3``.

    Example::

        >>> x = torch.randn(60, 10, generator=torch.Generator().manual_seed(0))
        >>> embed_points(x, EmbedConfig(perplexity=10)).shape
        torch.Size([60, 2])
    """
    from openTSNE import TSNE
    from sklearn.decomposition import PCA

    n = x.shape[0]
    if x.dim() != 2 or n < 4:
        raise ValueError(f"need at least 4 points as an (N, D) matrix, got {tuple(x.shape)}")
    a = x.detach().cpu().double().numpy()
    k = min(cfg.pca_dims, n, a.shape[1])
    if k < a.shape[1]:
        a = PCA(k, random_state=cfg.seed).fit_transform(a)
    perplexity = min(cfg.perplexity, (n - 1) / 3)
    tsne = TSNE(2, perplexity=perplexity, n_iter=cfg.n_iter, initialization="random",
                random_state=cfg.seed, n_jobs=1, verbose=False)
    return torch.from_numpy(np.asarray(tsne.fit(a), dtype=np.float64))


@dataclass
class EmbedResult:
    """Coordinates ``(N, 2)`` and per-point labels: kind (trajectory/bad), step, accuracies.

    For a trajectory point ``step`` is its training step; for a bad minimum, the
    step of the checkpoint it started from.
    """

    coords: torch.Tensor
    kind: list[str]
    step: list[int]
    train_acc: torch.Tensor
    test_acc: torch.Tensor
    poison_acc: torch.Tensor
    config: EmbedConfig
    run: str = ""

    def mask(self, kind: str) -> torch.Tensor:
        return torch.tensor([k == kind for k in self.kind], dtype=torch.bool)

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "config": self.config.to_dict(),
                "coords": self.coords.tolist(), "kind": self.kind, "step": self.step,
                "train_acc": self.train_acc.tolist(), "test_acc": self.test_acc.tolist(),
                "poison_acc": self.poison_acc.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbedResult:
        t = torch.tensor
        return cls(t(d["coords"], dtype=torch.float64).reshape(-1, 2), list(d["kind"]),
                   list(d["step"]), t(d["train_acc"], dtype=torch.float64),
                   t(d["test_acc"], dtype=torch.float64), t(d["poison_acc"], dtype=torch.float64),
                   EmbedConfig.from_dict(d["config"]), d.get("run", ""))
