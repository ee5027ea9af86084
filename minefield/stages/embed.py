"""``minefield embed`` as one call: a run's trajectory and bad minima in one t-SNE map.

Saved as ``runs/<name>/embed/embed.json`` (keyed by the embed config).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..embed import EmbedConfig, EmbedResult, embed_points, weight_matrix
from ..evaluate import evaluate_members, resolve_device
from ..functional import stack
from ..lock import locking
from ..options import EmbedCheckpoints, option
from ..runs import DEFAULT_ROOT, Run, RunError, reading
from .train import load_run_model

__all__ = ["EMBED_FILE", "embed_run", "load_embedding"]

EMBED_FILE = "embed/embed.json"


@locking
def embed_run(run: Run | str | Path, cfg: EmbedConfig = EmbedConfig(), *,
              root: Path | str = DEFAULT_ROOT, device: str | torch.device = "auto",
              checkpoints: EmbedCheckpoints | str = "searched", save: bool = True,
              force: bool = False) -> EmbedResult:
    """Embed a run's trajectory with its bad minima (``search/minima``) in one t-SNE map.

    ``checkpoints="searched"`` embeds the trajectory checkpoints the search
    started from (the paper: every 10th epoch) plus the final iterate;
    ``"all"`` embeds the whole trajectory. Accuracies are recomputed from the
    weights. With ``save`` the result goes to ``runs/<name>/embed/embed.json``,
    keyed by ``cfg`` and ``checkpoints``: the same key reuses it, another
    refuses without ``force``.

    Example (skipped by doctest: needs a run)::

        >>> res = embed_run("mf-good", EmbedConfig(perplexity=30))  # doctest: +SKIP
        >>> res.coords.shape                                          # doctest: +SKIP
        torch.Size([400, 2])
    """
    run = run if isinstance(run, Run) else Run.open(run, root)
    checkpoints = option(EmbedCheckpoints, checkpoints, "checkpoints")
    traj = run.trajectory()
    if not traj:
        raise RunError(f"run {run.name} has no trajectory checkpoints; train it first")
    minima = sorted(run.file("search", "minima").glob("*.safetensors"))
    if not minima:
        raise RunError(f"run {run.name} has no bad minima; run `minefield search` first")
    # the map depends on the search that made the minima, and on which minima there are
    key = {"embed": cfg.to_dict(), "checkpoints": checkpoints.value,
           "search": run.read_json("search/config.json") if run.exists("search/config.json")
           else None, "minima": [p.name for p in minima]}
    if save:
        run.lock()
        if run.resume(EMBED_FILE, key, force):
            return load_embedding(run)
    dev = resolve_device(device)
    model, _, _, data, _ = load_run_model(run, traj[-1], dev)
    names = [n for n, _ in model.named_parameters()]
    bad_cks = [run.load_checkpoint(p, dev) for p in minima]
    member = int(bad_cks[0].meta.get("search", {}).get("member", 0))
    with reading(run.file("search", "minima")):
        starts = [(ck.meta["row"]["start_checkpoint"], int(ck.meta["row"]["start_step"]))
                  for ck in bad_cks]
    if checkpoints is EmbedCheckpoints.SEARCHED:
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
        run.write_result(EMBED_FILE, key, res.to_dict())
    return res


def load_embedding(run: Run | str | Path, root: Path | str = DEFAULT_ROOT) -> EmbedResult:
    """Read ``runs/<name>/embed/embed.json`` written by :func:`embed_run`."""
    run = run if isinstance(run, Run) else Run.open(run, root)
    if not run.exists(EMBED_FILE):
        raise RunError(f"run {run.name} has no embedding; run `minefield embed` first")
    return EmbedResult.from_dict(run.read_json(EMBED_FILE))
