"""Wall time of the paper-scale image experiments, projected from measured unit costs.

Measured here, on the device that runs, at the recipe's batch (256 at paper scale:
a batch of 16 ran 20% slower per image on a CPU, and far slower on a GPU): seconds
per training image (one ``train_step`` of ResNet-20 on a stack of one) and per
image-evaluation (the engine with its defaults). The work is counted from the recipe:

- training: ``steps x 256`` images per model (natural, poisoned, and every sweep
  model; the sweep's stack is counted as its members one after another);
- basin radii: ``2 K`` radii per model, each about ``bracket_points +
  ceil(log2(3 / (2 rtol)))`` = 6 + 11 = 17 loss evaluations on the full training set,
  plus the stored rollouts of the natural and poisoned models (``rollouts`` x 101
  points each).

The one-GPU projection divides the same work by the rates of plain PyTorch measured
on one NVIDIA H200 in issue 14 (nn.Module training, batch 256: 22.7k img/s; the
one-point loop in float32: 185k image-evals/s), i.e. it assumes minefield's defaults
run at plain-PyTorch speed there, which ``benchmarks/bench_real.py --device cuda``
checks. Both figures are projections, not measurements of the whole run.
"""

from __future__ import annotations

import torch

from ..autotune import timed
from ..config import ModelConfig, TrainConfig
from ..directions import random_directions
from ..engine import evaluate_points
from ..evaluate import resolve_device
from ..functional import buffers_like, stack
from ..models import build_model, init_params
from ..step import Batch, Hyper, train_step
from ..train import make_optimizer

__all__ = ["H200_TRAIN_IMG_S", "H200_EVAL_IMG_S", "EVALS_PER_RADIUS", "unit_costs",
           "image_projection", "evaluation_rate"]

H200_TRAIN_IMG_S = 22_700.0  # issue 14: nn.Module + torch.optim, ResNet-20, batch 256
H200_EVAL_IMG_S = 185_000.0  # issue 14: one-point loop, float32, ResNet-20
EVALS_PER_RADIUS = 17  # bracket (6) + bisection to rtol 1e-3 from a x4 bracket (11)


def unit_costs(device: str | torch.device = "auto", batch: int = 16, points: int = 2
               ) -> tuple[float, float]:
    """``(s per training image, s per image-evaluation)`` of ResNet-20 on 32x32 images."""
    dev = resolve_device(device)
    g = torch.Generator().manual_seed(0)
    model = build_model(ModelConfig("resnet20"), (3, 32, 32), 10).to(dev)
    theta = init_params(model, "he_normal", g)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    leaves = {k: v.to(dev).requires_grad_() for k, v in stack([theta]).items()}
    bufs = {k: v.to(dev) for k, v in buffers_like(model, 1).items()}
    opt = make_optimizer(TrainConfig(optimizer="sgd", lr=0.01), list(leaves.values()))
    hyper = Hyper(beta=torch.zeros(1, device=dev))

    def step():
        model.train()
        train_step(model, leaves, bufs, opt, Batch(x, y), hyper)
        model.eval()

    t_train = timed(step, 2, dev) / batch
    return t_train, 1 / (evaluation_rate(model, leaves, bufs, x, y, points) * batch)


def image_projection(device: str | torch.device, n_train: int, steps_natural: int,
                     steps_poisoned: int, sweep_models: int, n_dirs: int = 100,
                     batch: int = 256, rollouts: int = 20) -> dict[str, str]:
    """Report rows: measured unit costs and the projected hours here and on one H200.

    ``steps_*`` and ``batch``: the recipe's (e.g. :func:`~.paper_images.paper_recipe` at
    256 epochs); ``n_dirs`` directions per model (``2 n_dirs`` radii)."""
    t_img, t_eval = unit_costs(device, batch)  # at the recipe's batch: 16 ran 20% slower
    train_imgs = batch * (steps_natural + steps_poisoned + sweep_models * steps_poisoned)
    models = 2 + sweep_models
    eval_imgs = (models * 2 * n_dirs * EVALS_PER_RADIUS + 2 * rollouts * 101) * n_train
    here = train_imgs * t_img + eval_imgs * t_eval
    gpu = train_imgs / H200_TRAIN_IMG_S + eval_imgs / H200_EVAL_IMG_S
    dev = resolve_device(device)
    return {
        f"measured on {dev}: training, evaluation": f"{1 / t_img:.0f} img/s, "
                                                    f"{1 / t_eval:.0f} image-evals/s",
        "work: training images, basin image-evaluations": f"{train_imgs:.3g}, {eval_imgs:.3g}",
        f"PROJECTED wall time on {dev} at these rates": f"{here / 3600:.1f} h",
        "PROJECTED wall time on one H200 (plain-PyTorch rates of issue 14)":
            f"{gpu / 3600:.1f} h (training {train_imgs / H200_TRAIN_IMG_S / 3600:.1f} h, "
            f"basins {eval_imgs / H200_EVAL_IMG_S / 3600:.1f} h)",
    }


def evaluation_rate(model: torch.nn.Module, params, buffers, x: torch.Tensor, y: torch.Tensor,
                    points: int = 64) -> float:
    """Loss evaluations per second (each on all of ``x``) of member 0 of ``params`` at
    random points around it, through the engine with its defaults: the unit cost of
    the chords an ``mcmc`` estimate would bisect."""
    dev = x.device
    theta = {k: v[0].detach().cpu() for k, v in params.items()}
    centre = {k: v[:1].detach() for k, v in params.items()}
    bufs = {k: v[:1] for k, v in buffers.items()} or None
    d = {k: v.to(dev) for k, v in random_directions(
        theta, points, generator=torch.Generator().manual_seed(0)).items()}
    ts = torch.full((points,), 0.1)
    return points / timed(lambda: evaluate_points(model, centre, d, ts, x, y, bufs), 2, dev)
