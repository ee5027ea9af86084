"""Fig. 1 (bad minima along an SGD trajectory) end to end, for good runs of several seeds.

PAPER.md check 8 (every bad minimum <= 56% test and <= 30% true-label poison accuracy,
median train >= 75%) and the report's 8+ (median train >= 90%) must hold whatever
device rounds the search and whatever seed trained the good run, not only for the
reference run. This trains the good run of ``minefield reproduce --only minefield`` with
each seed, searches its checkpoints, and prints the checks and the wall time of each::

    python benchmarks/fig1_seeds.py --scale paper --device cuda --seeds 0,1,2
    python benchmarks/fig1_seeds.py --scale tiny --device cpu --seeds 1 --threads 2

Runs go to ``--root`` (default a temporary directory, removed afterwards); the figures
to a temporary directory. Exit status 3 if a check fails (1 is an error).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from minefield.reproduce.common import SCALES, Context
from minefield.reproduce.fig1 import exp_minefield


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=list(SCALES), default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seeds", default="0,1", help="good-run training seeds, comma separated")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    ap.add_argument("--root", default=None, help="run directory root (default: temporary)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a SearchConfig field over the recipe's (e.g. continue_below=0.9); "
                         "repeatable")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    overrides = {k: (None if v == "none" else float(v) if "." in v or "e" in v else int(v))
                 for k, v in (kv.split("=", 1) for kv in a.set)}
    print(f"scale {a.scale}, device {a.device}, seeds {seeds}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, search settings {overrides or 'the recipe'}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.root or tmp) / "runs"
        for seed in seeds:
            t0 = time.perf_counter()

            def log(msg: str, seed: int = seed, t0: float = t0) -> None:  # phase times
                print(f"seed {seed}: [{time.perf_counter() - t0:7.1f} s] {msg.strip()}")

            ctx = Context(SCALES[a.scale], root, Path(tmp) / f"figures-{seed}", a.device,
                          False, False, None, log, seed=seed, search=overrides)
            sec = exp_minefield(ctx)
            wall = time.perf_counter() - t0
            for c in sec.checks:
                ok &= bool(c.passed)
                print(f"seed {seed}: check {c.id:3s} {'ok    ' if c.passed else 'FAILED'} "
                      f"{c.measured}")
            print(f"seed {seed}: end to end {wall:.1f} s (search {sec.data['search_seconds']:.1f}"
                  f" s)")
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
