"""A 2-D map of weight space: trajectory checkpoints and bad minima embedded together.

The paper's Fig. 1 flattens each model's weights (kernels only: the weight
matrices, biases dropped; 1,950 numbers for the spiral MLP), reduces them to 50
dimensions with PCA (``random_state=0``) and runs t-SNE (perplexity 30) on the
result. The SGD iterates then trace a path through a "minefield" of bad minima.
Here t-SNE is openTSNE's (random initialisation, seeded), so the map is a pure
function of the weights and the config.

:func:`embed_points` is the maths (array in, coordinates out); :func:`embed_run`
collects a run's trajectory and its search results, embeds them and (optionally)
saves ``runs/<name>/embed/embed.json``; :func:`load_embedding` reads it back.

Example::

    >>> x = torch.randn(60, 10, generator=torch.Generator().manual_seed(0))
    >>> embed_points(x, EmbedConfig(perplexity=10, n_iter=250)).shape
    torch.Size([60, 2])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, _Config
from .evaluate import evaluate_members, resolve_device
from .functional import Params, flatten, is_weight, stack
from .lock import locking
from .runs import DEFAULT_ROOT, Run, RunError, reading
from .train import load_run_model

__all__ = ["EmbedConfig", "EmbedResult", "weight_matrix", "embed_points", "embed_run",
           "load_embedding"]

EMBED_FILE = "embed/embed.json"


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

    def __post_init__(self):
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


@locking
def embed_run(run: Run | str | Path, cfg: EmbedConfig = EmbedConfig(), *,
              root: Path | str = DEFAULT_ROOT, device: str | torch.device = "auto",
              checkpoints: str = "searched", save: bool = True) -> EmbedResult:
    """Embed a run's trajectory with its bad minima (``search/minima``) in one t-SNE map.

    ``checkpoints="searched"`` embeds the trajectory checkpoints the search
    started from (the paper: every 10th epoch) plus the final iterate;
    ``"all"`` embeds the whole trajectory. Accuracies are recomputed from the
    weights. With ``save`` the result goes to ``runs/<name>/embed/embed.json``.

    Example::

        >>> res = embed_run("mf-good", EmbedConfig(perplexity=30))   # doctest: +SKIP
        >>> res.coords.shape                                          # doctest: +SKIP
        torch.Size([400, 2])
    """
    if checkpoints not in ("searched", "all"):
        raise ValueError(f"checkpoints must be 'searched' or 'all', got {checkpoints!r}")
    run = run if isinstance(run, Run) else Run.open(run, root)
    traj = run.trajectory()
    if not traj:
        raise RunError(f"run {run.name} has no trajectory checkpoints; train it first")
    minima = sorted(run.file("search", "minima").glob("*.safetensors"))
    if not minima:
        raise RunError(f"run {run.name} has no bad minima; run `minefield search` first")
    if save:
        run.lock()
    dev = resolve_device(device)
    model, _, _, data, _ = load_run_model(run, traj[-1], dev)
    names = [n for n, _ in model.named_parameters()]
    bad_cks = [run.load_checkpoint(p, dev) for p in minima]
    member = int(bad_cks[0].meta.get("search", {}).get("member", 0))
    with reading(run.file("search", "minima")):
        starts = [(ck.meta["row"]["start_checkpoint"], int(ck.meta["row"]["start_step"]))
                  for ck in bad_cks]
    if checkpoints == "searched":
        wanted = {name for name, _ in starts} | {traj[-1].name}
        traj = [p for p in traj if p.name in wanted]
    good_cks = [run.load_checkpoint(p, dev) for p in traj]
    for ck in good_cks + bad_cks:
        if any(n not in ck.params for n in names):
            raise RunError(f"checkpoint {ck.path.name} does not match the model of run "
                           f"{run.name}")
    good = stack([{n: ck.params[n][member] for n in names} for ck in good_cks])
    bad = stack([{n: ck.params[n][0] for n in names} for ck in bad_cks])
    both = {n: torch.cat([good[n], bad[n]]) for n in names}
    with torch.no_grad():
        metrics = evaluate_members(model, both, data)
    coords = embed_points(weight_matrix(both, cfg.kernels_only), cfg)
    res = EmbedResult(coords, ["trajectory"] * len(good_cks) + ["bad"] * len(bad_cks),
                      [ck.step for ck in good_cks]
                      + [step for _, step in starts],
                      metrics["train_acc"].cpu(), metrics["test_acc"].cpu(),
                      metrics["poison_acc"].cpu(), cfg, run.name)
    if save:
        run.write_json(EMBED_FILE, res.to_dict())
    return res


def load_embedding(run: Run | str | Path, root: Path | str = DEFAULT_ROOT) -> EmbedResult:
    """Read ``runs/<name>/embed/embed.json`` written by :func:`embed_run`."""
    run = run if isinstance(run, Run) else Run.open(run, root)
    if not run.exists(EMBED_FILE):
        raise RunError(f"run {run.name} has no embedding; run `minefield embed` first")
    return EmbedResult.from_dict(run.read_json(EMBED_FILE))
