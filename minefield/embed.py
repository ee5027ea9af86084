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

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from .config import ConfigError, _Config
from .functional import Params, flatten, is_weight

__all__ = ["EmbedConfig", "EmbedResult", "TSNEMap", "weight_matrix", "fit_map", "embed_points"]


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


@dataclass(frozen=True)
class TSNEMap:
    """A fitted t-SNE map that new points can be added to (openTSNE's staged object, kept).

    openTSNE's ``TSNE.fit`` returns a ``TSNEEmbedding`` whose ``transform`` places
    new points into the existing map: each new point is initialised at the median
    of its ``k = 25`` nearest reference points' positions, then optimised against
    the fixed reference embedding alone (perplexity 5, 250 iterations, openTSNE's
    defaults for adding points; Poličar et al. 2019; the perplexity lowered to
    ``(N - 1) / 3`` for a map of N < 16 points, as the fit's). That object
    holds a kNN index and is not safely serialisable, so this class keeps what
    rebuilds it: the PCA (``mean``, ``components``), the reduced points t-SNE saw
    (``reference``), their map coordinates and the perplexity and seed. It is
    saved as plain tensors (safetensors, no pickle) by
    :func:`minefield.stages.embed_run`.

    Attributes:
        coords: ``(N, 2)`` float64 map of the fitted points.
        reference: ``(N, k)`` float64 PCA scores the map was fitted on.
        mean: ``(D,)`` PCA mean of the weight rows.
        components: ``(k, D)`` PCA axes; ``(0, D)`` when no PCA was applied
            (``k = D``, the rows are used as they are).
        perplexity: the perplexity used (after lowering for small N).
        seed: the seed of the fit (openTSNE ``random_state``).

    Example::

        >>> x = torch.randn(60, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> m = fit_map(x, EmbedConfig(perplexity=10, n_iter=100, pca_dims=5))
        >>> m.transform(x[:3] + 0.01).shape
        torch.Size([3, 2])
    """

    coords: torch.Tensor
    reference: torch.Tensor
    mean: torch.Tensor
    components: torch.Tensor
    perplexity: float
    seed: int

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Weight rows ``(n, D)`` to the PCA scores ``(n, k)`` the map was fitted on."""
        x = x.detach().cpu().double()
        if x.dim() != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"new points must be (n, {self.mean.shape[0]}) like the map's, "
                             f"got {tuple(x.shape)}")
        if self.components.shape[0] == 0:
            return x
        return (x - self.mean) @ self.components.T

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Place new weight rows ``(n, D)`` into the map: ``(n, 2)`` float64.

        The map's own points do not move (openTSNE optimises only the new points;
        its in-place centring of the reference is undone here). Each new point is
        placed independently of the other new points. Perplexity 5, openTSNE's, or
        ``(N - 1) / 3`` for a map of N < 16 points (as :func:`fit_map` lowers its own).
        """
        from openTSNE import TSNEEmbedding
        from openTSNE.affinity import PerplexityBasedNN

        z = self.project(x).numpy()
        ref = self.reference.numpy()
        affinities = PerplexityBasedNN(ref, perplexity=self.perplexity, random_state=self.seed,
                                       n_jobs=1)
        emb = TSNEEmbedding(self.coords.numpy().copy(), affinities, random_state=self.seed,
                            n_jobs=1)
        # transform centres the reference in place: shift the new points back by as much
        shift = (emb.max(0) + emb.min(0)) / 2
        # openTSNE's perplexity 5 (15 neighbours), lowered as the fit's is for a small map:
        # with fewer than 16 points every neighbour would weigh alike
        perplexity = min(5.0, (len(ref) - 1) / 3)
        new = np.asarray(emb.transform(z, perplexity=perplexity), dtype=np.float64) + shift
        return torch.from_numpy(new)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON metadata for a safetensors file (see :meth:`from_tensors`)."""
        return ({"coords": self.coords, "reference": self.reference, "mean": self.mean,
                 "components": self.components},
                {"perplexity": self.perplexity, "seed": self.seed})

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict[str, Any]) -> TSNEMap:
        """Rebuild a map saved with :meth:`to_tensors`; KeyError/ValueError when malformed."""
        n, d = t["reference"].shape[0], t["mean"].shape[0]
        if (t["coords"].shape != (n, 2) or t["components"].dim() != 2
                or t["components"].shape[1] != d
                or t["reference"].shape[1] != (t["components"].shape[0] or d)):
            raise ValueError("map tensors of inconsistent shapes")
        return cls(*(t[k].double() for k in ("coords", "reference", "mean", "components")),
                   float(meta["perplexity"]), int(meta["seed"]))


def fit_map(x: torch.Tensor, cfg: EmbedConfig = EmbedConfig()) -> TSNEMap:
    """PCA to ``min(pca_dims, N, D)`` dims, then t-SNE of ``(N, D)`` rows: a :class:`TSNEMap`.

    A perplexity too large for N points (openTSNE needs ``3 * perplexity < N``)
    is lowered to ``(N - 1) / 3``. ``fit_map(x, cfg).coords`` is
    :func:`embed_points`; the map can also place new points (:meth:`TSNEMap.transform`).
    """
    from openTSNE import TSNE
    from sklearn.decomposition import PCA

    n = x.shape[0]
    if x.dim() != 2 or n < 4:
        raise ValueError(f"need at least 4 points as an (N, D) matrix, got {tuple(x.shape)}")
    a = x.detach().cpu().double().numpy()
    k = min(cfg.pca_dims, n, a.shape[1])
    mean, comps = np.zeros(a.shape[1]), np.zeros((0, a.shape[1]))
    if k < a.shape[1]:
        pca = PCA(k, random_state=cfg.seed)
        a = pca.fit_transform(a)
        mean, comps = pca.mean_, pca.components_
    perplexity = min(cfg.perplexity, (n - 1) / 3)
    tsne = TSNE(2, perplexity=perplexity, n_iter=cfg.n_iter, initialization="random",
                random_state=cfg.seed, n_jobs=1, verbose=False)
    coords = torch.from_numpy(np.asarray(tsne.fit(a), dtype=np.float64))
    t = torch.from_numpy
    return TSNEMap(coords, t(np.ascontiguousarray(a, dtype=np.float64)),
                   t(np.asarray(mean, dtype=np.float64)), t(np.asarray(comps, dtype=np.float64)),
                   float(perplexity), cfg.seed)


def embed_points(x: torch.Tensor, cfg: EmbedConfig = EmbedConfig()) -> torch.Tensor:
    """PCA to ``min(pca_dims, N, D)`` dims, then t-SNE: ``(N, D)`` -> ``(N, 2)`` float64.

    The coordinates of :func:`fit_map` (use that to add points to the map later).

    Example::

        >>> x = torch.randn(60, 10, generator=torch.Generator().manual_seed(0))
        >>> embed_points(x, EmbedConfig(perplexity=10)).shape
        torch.Size([60, 2])
    """
    return fit_map(x, cfg).coords


@dataclass
class EmbedResult:
    """Coordinates ``(N, 2)`` and per-point labels: kind, step, accuracies.

    ``kind`` is ``"trajectory"``, ``"bad"`` (a bad minimum) or ``"added"`` (a
    point placed later into the fitted map, :meth:`TSNEMap.transform`). For a
    trajectory point ``step`` is its training step; for a bad minimum, the step of
    the checkpoint it started from. ``added`` names the checkpoint file of each
    added point, in order, and ``added_sha`` the sha256 of its tensors (16 hex): a file
    rewritten with other weights is a new point, not the old one.
    """

    coords: torch.Tensor
    kind: list[str]
    step: list[int]
    train_acc: torch.Tensor
    test_acc: torch.Tensor
    poison_acc: torch.Tensor
    config: EmbedConfig
    run: str = ""
    added: list[str] = field(default_factory=list)
    added_sha: list[str] = field(default_factory=list)

    def mask(self, kind: str) -> torch.Tensor:
        return torch.tensor([k == kind for k in self.kind], dtype=torch.bool)

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "config": self.config.to_dict(),
                "coords": self.coords.tolist(), "kind": self.kind, "step": self.step,
                "train_acc": self.train_acc.tolist(), "test_acc": self.test_acc.tolist(),
                "poison_acc": self.poison_acc.tolist(), "added": self.added,
                "added_sha": self.added_sha}

    def __post_init__(self):
        n = len(self.coords)  # a file edited by hand: one ValueError, not an IndexError later
        sizes = [len(v) for v in (self.kind, self.step, self.train_acc, self.test_acc,
                                  self.poison_acc)] + [self.kind.count("added")]
        if self.coords.shape != (n, 2) or sizes[:-1] != [n] * 5 or sizes[-1] != len(self.added):
            raise ValueError(f"lengths disagree: {n} coordinates, labels {sizes[:-1]}, "
                             f"{len(self.added)} files of {sizes[-1]} added points")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbedResult:
        t = torch.tensor
        return cls(t(d["coords"], dtype=torch.float64).reshape(-1, 2), list(d["kind"]),
                   list(d["step"]), t(d["train_acc"], dtype=torch.float64),
                   t(d["test_acc"], dtype=torch.float64), t(d["poison_acc"], dtype=torch.float64),
                   EmbedConfig.from_dict(d["config"]), d.get("run", ""),
                   list(d.get("added", [])),
                   [*d.get("added_sha", []), *[""] * (len(d.get("added", []))
                                                      - len(d.get("added_sha", [])))])

    def extend(self, coords: torch.Tensor, steps: list[int], metrics: dict[str, torch.Tensor],
               sources: list[str], shas: list[str] | None = None) -> EmbedResult:
        """A new result with points of kind ``"added"`` appended; the old rows unchanged."""
        cat = torch.cat
        return EmbedResult(cat([self.coords, coords.double()]), self.kind + ["added"] * len(steps),
                           self.step + list(steps),
                           cat([self.train_acc, metrics["train_acc"].double()]),
                           cat([self.test_acc, metrics["test_acc"].double()]),
                           cat([self.poison_acc, metrics["poison_acc"].double()]),
                           self.config, self.run, self.added + list(sources),
                           self.added_sha + list(shas or [""] * len(sources)))
