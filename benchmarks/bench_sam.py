"""Benchmark of the SAM step's cost (run by hand, not a test).

Measures, side by side in one run (median over ``--repeats`` of the time per step,
each repeat ``--steps`` steps after a warm-up; the variants take turns within each
repeat, so load changes on a shared machine hit them alike):

1. stacked SGD (momentum 0.9) over M members: :func:`minefield.step.train_step`
   with :func:`~minefield.step.plain_update` (one gradient per step);
2. stacked SAM over the same M members (:func:`minefield.sam.sam_update`,
   rho = 0.05 for every member: two gradients per step) and stacked ASAM;
3. M single-model SAM steps: the same step on M stacks of one, one after another
   (what a loop over models costs);
4. M idiomatic single-model SAM steps, the fair plain-PyTorch comparator: an
   ``nn.Module``, ``torch.optim.SGD``, ``backward``, perturb the parameters in
   place by ``rho g / ||g||``, ``backward`` again, restore, ``opt.step()`` (the
   pattern of the common SAM implementations), and the same loop with plain SGD.

Printed ratios: SAM / SGD per stacked step (two gradients: about 2x expected),
M single-model SAM steps / one stacked SAM step (the stacking gain), and the
idiomatic loop / the stacked step.

    PYTHONPATH=. python benchmarks/bench_sam.py --threads 2 --repeats 5
    PYTHONPATH=. python benchmarks/bench_sam.py --dataset digits --widths 64 --batch-size 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minefield.config import DataConfig, ModelConfig, TrainConfig
from minefield.data import load_dataset
from minefield.loss import nll
from minefield.models import build_model
from minefield.sam import sam_update
from minefield.step import Batch, Hyper, plain_update, train_step
from minefield.train import init_stack, make_optimizer

RHO, LR = 0.05, 0.01


def per_step(runs: dict, steps: int, repeats: int) -> dict[str, float]:
    """Median over ``repeats`` of (time of ``run(steps)``) / steps for every run, after
    one warm-up each; the runs take turns within each repeat (round robin), so a
    change in the machine's load hits all of them alike."""
    for run in runs.values():
        run(max(1, steps // 5))
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            t = time.perf_counter()
            run(steps)
            times[k].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def stacked(model, seeds, batch, update, rho):
    """``run(n)``: n steps of the stack of ``seeds`` with ``update`` (``run.params``)."""
    m = len(seeds)
    leaves = {k: v.requires_grad_() for k, v in init_stack(model, "glorot_uniform",
                                                           seeds).items()}
    opt = make_optimizer(TrainConfig(optimizer="sgd", lr=LR), list(leaves.values()))
    hyper = Hyper(beta=torch.zeros(m), rho=torch.full((m,), rho, dtype=torch.float64))

    def run(n):
        for _ in range(n):
            train_step(model, leaves, {}, opt, batch, hyper, update=update)
    run.params = leaves
    return run


def looped(model, seeds, batch, update, rho):
    """``run(n)``: n steps of each of ``len(seeds)`` stacks of one, one after another."""
    runs = [stacked(model, [s], batch, update, rho) for s in seeds]

    def run(n):
        for _ in range(n):
            for r in runs:
                r(1)
    return run


def idiomatic(make_net, model, seeds, batch, sam: bool):
    """``run(n)``: n plain-PyTorch steps (SAM or SGD) of each of ``len(seeds)`` models
    (``make_net()``: a fresh ``nn.Module``, given the weights of the stack's member)."""
    nets = []
    for s in seeds:
        net = make_net()
        p = init_stack(model, "glorot_uniform", [s])
        with torch.no_grad():
            for k, v in net.named_parameters():
                v.copy_(p[k][0])
        nets.append((net, torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)))

    def loss(net):
        return nll(net(batch.x), batch.y).mean()

    def step(net, opt):
        params = [p for p in net.parameters()]
        loss(net).backward()
        if sam:
            with torch.no_grad():
                norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
                eps = [RHO * p.grad / (norm + 1e-12) for p in params]
                for p, e in zip(params, eps):
                    p.add_(e)
            opt.zero_grad(set_to_none=True)
            loss(net).backward()
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.sub_(e)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(n):
        for _ in range(n):
            for net, opt in nets:
                step(net, opt)
    run.nets = [net for net, _ in nets]
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50, help="steps per repeat")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--dataset", default="swissroll")
    ap.add_argument("--widths", default="23,16,26,32,28,31")
    ap.add_argument("--batch-size", type=int, default=None, help="default: full batch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(DataConfig(args.dataset))
    mcfg = ModelConfig(widths=tuple(int(w) for w in args.widths.split(",")))
    model = build_model(mcfg, data.input_shape, data.n_classes)

    def make_net():
        return build_model(mcfg, data.input_shape, data.n_classes)

    n = args.batch_size or len(data.y_train)
    batch = Batch(data.x_train[:n], data.y_train[:n])
    seeds = list(range(args.members))
    m = args.members
    print(f"{args.dataset}, MLP {args.widths}, batch {n}, M = {m} members, SGD momentum 0.9, "
          f"rho {RHO}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"median of {args.repeats} x {args.steps} steps")
    sam, asam = sam_update("sam"), sam_update("asam")
    rows = per_step({
        "stacked SGD": stacked(model, seeds, batch, plain_update, 0.0),
        "stacked SAM": stacked(model, seeds, batch, sam, RHO),
        "stacked ASAM": stacked(model, seeds, batch, asam, 10 * RHO),
        "loop of M stacks of one, SGD": looped(model, seeds, batch, plain_update, 0.0),
        "loop of M stacks of one, SAM": looped(model, seeds, batch, sam, RHO),
        "loop of M nn.Modules, SGD (torch.optim)": idiomatic(make_net, model, seeds, batch,
                                                             False),
        "loop of M nn.Modules, SAM (torch.optim)": idiomatic(make_net, model, seeds, batch,
                                                             True),
    }, args.steps, args.repeats)
    print(f"\n{'step of all M members':42s} {'ms':>8s} {'/ stacked SGD':>14s}")
    for k, v in rows.items():
        print(f"{k:42s} {v * 1e3:8.3f} {v / rows['stacked SGD']:14.2f}")
    # the comparator computes the same step: 5 SAM steps of member 1, both ways
    ours, theirs = stacked(model, seeds, batch, sam, RHO), idiomatic(make_net, model, seeds,
                                                                     batch, True)
    ours(5)
    theirs(5)
    diff = max((ours.params[k][1] - v).abs().max().item()
               for k, v in theirs.nets[1].named_parameters())
    print(f"\nstacked SAM vs the nn.Module SAM after 5 steps, member 1: max |diff| {diff:.1e}"
          " (float32)")
    mod_sam = rows["loop of M nn.Modules, SAM (torch.optim)"]
    mod_sgd = rows["loop of M nn.Modules, SGD (torch.optim)"]
    print("\nratios (same run):")
    for name, num, den in (
            ("SAM / SGD, stacked", rows["stacked SAM"], rows["stacked SGD"]),
            ("ASAM / SGD, stacked", rows["stacked ASAM"], rows["stacked SGD"]),
            ("SAM / SGD, loop of stacks of one", rows["loop of M stacks of one, SAM"],
             rows["loop of M stacks of one, SGD"]),
            ("SAM / SGD, nn.Module loop", mod_sam, mod_sgd),
            ("SAM: M stacks of one / stack of M", rows["loop of M stacks of one, SAM"],
             rows["stacked SAM"]),
            ("SAM: nn.Module loop / stack of M", mod_sam, rows["stacked SAM"])):
        print(f"  {name:36s} {num / den:6.2f}x")


if __name__ == "__main__":
    main()
