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

import minefield.search
import minefield.stages.train
from minefield.reproduce.common import SCALES, Context
from minefield.reproduce.fig1 import exp_minefield

FITS: list[tuple[str, int, int, float, dict]] = []  # who, members, steps, seconds, compiled


def _timed_fit(who: str, fit):
    """``fit`` that records each call's stack size, steps, wall time and compile report:
    where a seed's time goes on a device (the good run, the search's segments, their
    compile decisions)."""
    def wrapper(model, params, data, cfg, betas=0.0, **kw):
        t = time.perf_counter()
        res = fit(model, params, data, cfg, betas, **kw)
        if params and next(iter(params.values())).is_cuda:
            torch.cuda.synchronize()
        m = next(iter(params.values())).shape[0]
        FITS.append((who, m, cfg.steps - kw.get("start_step", 0), time.perf_counter() - t,
                     res.compiled))
        return res
    return wrapper


minefield.search.fit = _timed_fit("search", minefield.search.fit)
minefield.stages.train.fit = _timed_fit("good run", minefield.stages.train.fit)


def _fit_summary(seed: int) -> None:
    for who in ("good run", "search"):
        rows = [f for f in FITS if f[0] == who]
        if not rows:
            continue
        comp = [f[4] for f in rows if "compiled_ms" in f[4]]  # probed both ways
        skipped = [f[4] for f in rows if "saving_bound_s" in f[4]]  # could not pay
        line = (f"seed {seed}: {who}: {len(rows)} fit calls, at most {sum(f[2] for f in rows)} "
                f"stack-steps (a fit may stop early; stacks of {max(f[1] for f in rows)} down to "
                f"{min(f[1] for f in rows)}), {sum(f[3] for f in rows):.1f} s")
        if skipped:
            line += (f"; {len(skipped)} calls not compiled (eager {skipped[0]['eager_ms']:.2f} ms"
                     f" a step saves at most {skipped[0]['saving_bound_s']:.1f} s < "
                     f"{skipped[0]['compile_s_assumed']:.0f} s of compilation)")
        if comp:
            ms = sorted(c["eager_ms"] for c in comp)[len(comp) // 2]
            mc = sorted(c["compiled_ms"] for c in comp)[len(comp) // 2]
            line += (f"; compiled in {sum(c['decision'] == 'compiled' for c in comp)} of "
                     f"{len(comp)} probed calls, compile {sum(c['compile_s'] for c in comp):.1f}"
                     f" s in all, median step {ms:.2f} ms eager vs {mc:.2f} ms compiled")
        print(line)
    FITS.clear()


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
            _fit_summary(seed)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
