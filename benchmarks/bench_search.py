"""Batched vs isolated vs one-at-a-time bad-minimum search (run by hand).

Times M searches of the same length on the Fig. 1 problem (spiral, 2-25-25-25-25-1
MLP, full batch on train ∪ untraining set ∪ the default 400 fresh poison points,
fixed steps), side by side in one run:

- ``batched``: one stacked model, one batched pass per step (``isolate=False``);
- ``isolated``: one stack, each member on kernels shaped for one model (the
  default, ``isolate=True``: minima independent of the grouping);
- ``one at a time``: M separate searches of one model each.

Prints the median wall time of each over ``--repeats`` and the ratios.

    PYTHONPATH=. python benchmarks/bench_search.py --threads 2 --repeats 3 --steps 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from plain import common_args, setup

from minefield.config import DataConfig, ModelConfig
from minefield.data import fresh_points, load_dataset
from minefield.functional import member, stack
from minefield.models import build_model
from minefield.search import AUTO_EXTRA_POISON, SearchConfig, StopRule, search_minima
from minefield.train import init_stack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--members", type=int, default=32)
    ap.add_argument("--sample", type=int, default=None,
                    help="time 'isolated' and 'one at a time' on this many members and scale "
                         "to --members (their cost is linear in the members; default all)")
    args = ap.parse_args()
    dev = setup(args)
    data = load_dataset(DataConfig("spiral")).to(dev)
    model = build_model(ModelConfig(widths=(25, 25, 25, 25), init="glorot_normal"),
                        data.input_shape, data.n_classes)
    starts = {k: v.to(dev) for k, v in init_stack(model, "glorot_normal",
                                                    range(args.members)).items()}
    # exactly --steps steps for every member: no continuation past them, no retries
    cfg = SearchConfig.make(steps=args.steps, stopping=StopRule.FIXED, log_every=args.steps,
                            compact_every=args.steps, milestones=(), isolate=False,
                            continue_below=None, retries=0)
    seeds = list(range(args.members))
    extra = tuple(t.to(dev) for t in fresh_points(DataConfig("spiral"), AUTO_EXTRA_POISON))

    def batched():
        search_minima(model, starts, data, cfg, seeds, extra=extra)

    few = min(args.sample or args.members, args.members)
    two = min(2 * few, args.members)  # isolated: a second size, to separate fixed costs

    def isolated(n):
        search_minima(model, {k: v[:n] for k, v in starts.items()}, data,
                      cfg.replace(isolate=True), seeds[:n], extra=extra)

    def one_by_one():  # M separate calls: each one's fixed cost is part of the loop's
        for i in range(few):
            search_minima(model, stack([member(starts, i)]), data, cfg, [seeds[i]],
                          extra=extra)

    runs = {"batched": batched, "isolated": lambda: isolated(few), "one at a time": one_by_one}
    if two > few:
        runs[f"isolated {two}"] = lambda: isolated(two)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.repeats + 1):  # round 0 warms up (allocator, kernels), untimed
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    if few < args.members:  # scaled to --members: one at a time in proportion; isolated
        # linearly through its two sizes (its fixed cost counted once, as in one call)
        med["one at a time"] *= args.members / few
        per = max(0.0, med.pop(f"isolated {two}", med["isolated"]) - med["isolated"]) / (
            two - few) if two > few else med["isolated"] / few
        med["isolated"] += per * (args.members - few)
    print(f"{args.members} searches x {args.steps} steps on {dev}, {args.threads} threads, "
          f"median of {args.repeats}" + (
              f" (one at a time timed on {few} and scaled; isolated timed on {few} and {two}"
              " and extrapolated linearly)" if few < args.members else "") + ":")
    for k, v in med.items():
        print(f"  {k:<14} {v:8.2f} s   ({v / (args.members * args.steps) * 1e3:.3f} ms "
              "per member-step)")
    print(f"  one at a time / batched   {med['one at a time'] / med['batched']:6.2f}x")
    print(f"  one at a time / isolated  {med['one at a time'] / med['isolated']:6.2f}x")
    print(f"  isolated / batched (cost) {med['isolated'] / med['batched']:6.2f}x")


if __name__ == "__main__":
    main()
