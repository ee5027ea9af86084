"""Real networks: minefield's defaults against plain PyTorch, side by side (run by hand).

Every row times minefield with its DEFAULT settings (``path="auto"``: the measured
choice of :mod:`minefield.autotune` on CUDA, its fixed rule on a CPU;
``memory_mb=None``: the device's budget)
against the idiomatic loop of ``benchmarks/plain.py`` (the point written into one
``nn.Module`` in place, the data in big batches, ``torch.no_grad``), in one run,
medians of ``--repeats``, the compared functions timed in turn within each repeat:

1. evaluation, loss at K perturbed points ``theta + t d``: the swiss-roll MLP (200
   inputs), the small CNN on digits, ResNet-20 on 32x32 images (for images the loop
   runs in NCHW, the idiomatic layout, and in channels-last; the lower ratio counts);
2. training ResNet-20 with SGD: one model (``train_step`` on a stack of one) vs
   ``nn.Module`` + ``torch.optim`` (NCHW, the idiomatic loop; and the same loop in
   channels-last, the layout a one-model conv net trains in on a CPU), and a stack
   of ``--stack`` models vs one.

The probe's one-time cost (the first call of a shape) is printed separately.

    PYTHONPATH=. python benchmarks/bench_real.py --threads 2 --device cpu
    PYTHONPATH=. python benchmarks/bench_real.py --device cuda --images 8192 --points 32
"""

from __future__ import annotations

import argparse
import time

import torch
from plain import (
    common_args,
    median_time,
    plain_net,
    point_loop,
    setup,
    side_by_side,
    tiled_directions,
    train_steps,
)

from minefield import autotune
from minefield.config import DataConfig, ModelConfig, TrainConfig
from minefield.data import load_dataset
from minefield.engine import _candidates as path_candidates  # the paths "auto" weighs
from minefield.engine import evaluate_points, precision_error
from minefield.functional import buffers_like, stack
from minefield.models import build_model, init_params
from minefield.step import Batch, Hyper, train_step
from minefield.train import make_optimizer


def _centre(model, dev, seed=0):
    th = init_params(model, "he_normal", torch.Generator().manual_seed(seed))
    return {k: v.to(dev) for k, v in stack([th]).items()}


def _directions(centre, k, dev, seed=1):
    return tiled_directions({n: v[0].cpu() for n, v in centre.items()}, k,
                            torch.Generator().manual_seed(seed), dev)


def evaluation(name, model, x, y, k, repeats, dev, extra_bf16=False, k_loop=2048):
    """Points/s of the engine (defaults) and of the plain loop; returns engine/loop. The
    loop, one point after another, is timed on its first ``k_loop`` points (its cost is
    linear in the points)."""
    model = model.to(dev)
    c = _centre(model, dev)
    bufs = {n: v.to(dev) for n, v in buffers_like(model, 1).items()} or None
    d = _directions(c, k, dev)
    ts = torch.rand(k, generator=torch.Generator().manual_seed(2)) * 0.1
    probed = set(autotune.PROBES)
    t0 = time.perf_counter()
    evaluate_points(model, c, d, ts, x, y, bufs)  # first call: includes the probe
    first = time.perf_counter() - t0
    rule = path_candidates(model, bufs, "auto", x, c)  # one path: the CPU's fixed rule
    new = [kk for kk in autotune.PROBES if kk not in probed]  # the probe this call made
    chosen = autotune.PROBES[new[-1]] if len(rule) > 1 and new else (rule[0], {})
    net = plain_net(model, c, bufs)
    kl = min(k, k_loop)
    dl, tl = {n: v[:kl] for n, v in d.items()}, ts[:kl]
    fns = {"engine": lambda: evaluate_points(model, c, d, ts, x, y, bufs),
           "loop": lambda: point_loop(net, c, dl, tl, x, y)}
    if x.dim() == 4:  # images: the same loop in channels-last too (the engine's loop_cl)
        net_cl, x_cl = plain_net(model, c, bufs), x.contiguous(memory_format=torch.channels_last)
        fns["loop_cl"] = lambda: point_loop(net_cl, c, dl, tl, x_cl, y, channels_last=True)
    t = side_by_side(fns, repeats, dev)
    t_eng, t_loop = t["engine"][0], t["loop"][0] * k / kl  # the loop's time for all k
    n = len(y)
    print(f"\n[{name}] {k} points x {n} inputs (the plain loop timed on {kl})")
    print(f"  minefield (defaults: path {chosen[0]}) {k * n / t_eng:12.0f} input-evals/s "
          f"({k / t_eng:9.1f} points/s); first call incl. probe {first:.2f} s vs "
          f"{t_eng:.2f} s")
    if chosen[1]:
        print("  probe (s/point on a few inputs): " + ", ".join(
            f"{p} {s * 1e3:.2f} ms" for p, s in chosen[1].items()))
    print(f"  plain loop                      {k * n / t_loop:12.0f} input-evals/s "
          f"({k / t_loop:9.1f} points/s)")
    print(f"  page faults per call: minefield {t['engine'][2]:.0f}, plain loop {t['loop'][2]:.0f}")
    ratio = t_loop / t_eng
    print(f"  ratio minefield / loop: {ratio:.2f}x")
    if "loop_cl" in t:
        t_cl = t["loop_cl"][0] * k / kl
        print(f"  plain loop, channels-last       {k * n / t_cl:12.0f} input-evals/s; ratio "
              f"minefield / it: {t_cl / t_eng:.2f}x (the summary keeps the lower ratio)")
        ratio = min(ratio, t_cl / t_eng)
    if extra_bf16:
        t_b = median_time(lambda: evaluate_points(model, c, d, ts, x, y, bufs,
                                                  precision="bf16"), repeats, dev)
        t_lb = median_time(lambda: point_loop(net, c, dl, tl, x, y, autocast=torch.bfloat16,
                                              channels_last=True), repeats, dev) * k / kl
        err = precision_error(model, c, d, ts, x, y, "bf16", bufs)
        print(f"  bf16 (opt-in): minefield {k * n / t_b:12.0f}, plain loop bf16 autocast + "
              f"channels_last {k * n / t_lb:12.0f} input-evals/s; ratio {t_lb / t_b:.2f}x; "
              f"max |loss error| vs float32 {err:.2e}")
    return ratio


def training(x, y, steps, stack_size, repeats, dev):
    """Images/s of one model (minefield vs nn.Module + torch.optim) and of a stack."""
    model = build_model(ModelConfig("resnet20"), tuple(x.shape[1:]), 10).to(dev)
    cfg = TrainConfig(optimizer="sgd", lr=0.01, momentum=0.9)
    batch, hyper1 = Batch(x, y), Hyper(beta=torch.zeros(1, device=dev))

    def minefield_steps(m):
        p = {k: v.to(dev).repeat(m, *[1] * (v.dim() - 1))
             for k, v in _centre(model, "cpu").items()}
        leaves = {k: v.requires_grad_() for k, v in p.items()}
        bufs = {k: v.to(dev) for k, v in buffers_like(model, m).items()}
        opt = make_optimizer(cfg, list(leaves.values()))
        hyper = hyper1 if m == 1 else Hyper(beta=torch.zeros(m, device=dev))

        def run():
            model.train()
            for _ in range(steps):
                train_step(model, leaves, bufs, opt, batch, hyper)
            model.eval()
        return run

    net = plain_net(model, _centre(model, dev))
    net_cl = plain_net(model, _centre(model, dev)).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    t = side_by_side({"one": minefield_steps(1),
                      "plain": lambda: train_steps(net, x, y, steps, 0.01),
                      "plain_cl": lambda: train_steps(net_cl, x_cl, y, steps, 0.01),
                      "stack": minefield_steps(stack_size)}, repeats, dev)
    t_one, t_plain, t_stack = t["one"][0], t["plain"][0], t["stack"][0]
    n = len(y) * steps
    print(f"\n[ResNet-20 training] SGD momentum 0.9, batch {len(y)}, {steps} steps")
    print(f"  minefield, one model          {n / t_one:10.0f} img/s")
    print(f"  nn.Module + torch.optim       {n / t_plain:10.0f} img/s")
    print(f"  the same, channels-last       {n / t['plain_cl'][0]:10.0f} img/s "
          f"(minefield / it: {t['plain_cl'][0] / t_one:.2f}x)")
    print(f"  minefield, stack of {stack_size:<3}        {stack_size * n / t_stack:10.0f} "
          f"img/s ({stack_size * t_one / t_stack:.2f}x one model)")
    print(f"  ratio one model minefield / plain: {t_plain / t_one:.2f}x")
    print(f"  page faults per call: minefield one {t['one'][2]:.0f}, plain {t['plain'][2]:.0f}, "
          f"stack {t['stack'][2]:.0f}")
    return t_plain / t_one, stack_size * t_one / t_stack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--points", type=int, default=None,
                    help="ResNet-20 points (default 4 on cpu, 32 on cuda)")
    ap.add_argument("--images", type=int, default=None,
                    help="ResNet-20 images (default 128 on cpu, 8192 on cuda)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (32 cpu, 256 cuda)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (10 cpu, 50 cuda)")
    ap.add_argument("--stack", type=int, default=8)
    ap.add_argument("--digit-points", type=int, default=1024)
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    dev = setup(args)
    cuda = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    out = {}
    swiss = load_dataset(DataConfig("swissroll")).to(dev)
    mlp = build_model(ModelConfig(), (2,), 2)
    out["swiss MLP"] = evaluation("swiss-roll MLP", mlp, swiss.x_train, swiss.y_train,
                                  131072 if cuda else 1024, args.repeats, dev)
    digits = load_dataset(DataConfig("digits")).to(dev)
    cnn = build_model(ModelConfig("cnn", widths=(16, 32)), digits.input_shape, 10)
    out["digits CNN"] = evaluation("small CNN on digits", cnn, digits.x_train, digits.y_train,
                                   args.digit_points, args.repeats, dev)
    n_img = args.images or (8192 if cuda else 128)
    x = torch.randn(n_img, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 10, (n_img,), generator=g).to(dev)
    rn = build_model(ModelConfig("resnet20"), (3, 32, 32), 10)
    out["ResNet-20 eval"] = evaluation("ResNet-20, 32x32", rn, x, y,
                                       args.points or (32 if cuda else 4), args.repeats, dev,
                                       extra_bf16=cuda)
    if not args.skip_training:
        b = args.batch or (256 if cuda else 32)
        one, st = training(x[:b], y[:b], args.steps or (50 if cuda else 10), args.stack,
                           args.repeats, dev)
        out["ResNet-20 train, one model"] = one
        out[f"ResNet-20 train, stack of {args.stack} vs one (throughput)"] = st
    print(f"\nsummary ({dev}, {torch.get_num_threads()} threads): " + "; ".join(
        f"{k} {v:.2f}x" for k, v in out.items()))


if __name__ == "__main__":
    main()
