"""Benchmark of the batched evaluation engine (run by hand, not a test).

Measures, in one run (medians over ``--repeats``):

1. evaluations/second of :func:`minefield.engine.evaluate_points` (batched
   matmul path and vmap path) vs the paper's one-point-at-a-time loop, on the
   swiss-roll MLP (widths 23,16,26,32,28,31; K=1024 points; 200 train points);
2. the same on a wide MLP (512,512,512) with 10,000 inputs, with the achieved
   GFLOP/s against this machine's float32 matmul peak (``torch.mm`` of a large
   square matrix, measured in the same run);
3. time to a basin-volume estimate (``--directions`` directions, both signs,
   rtol 1e-3) by bisection vs the paper's fixed ``t = r_max u^5`` grid scan.

The engine runs with its defaults (``path="auto"``, the device's memory budget)
unless ``--memory-mb`` is given; the comparator is the idiomatic loop of
``benchmarks/plain.py`` (the point written into one ``nn.Module`` in place,
``torch.no_grad``), besides the engine's own reference ``evaluate_points_loop``.
   Accuracy is compared against a tight bisection (rtol 1e-7) reference: the
   grid is run on a subset of directions at growing sizes until its worst
   relative radius error is <= rtol; the full grid time at that size is the
   measured time per evaluation x evaluations needed (grid cost is exactly
   linear in the number of points). The paper's own 100-point grid is timed too
   and its error reported.

    PYTHONPATH=. python benchmarks/bench_engine.py --threads 2 --repeats 3
    PYTHONPATH=. python benchmarks/bench_engine.py --device cuda --skip-volume
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from plain import common_args, plain_net, point_loop, tiled_directions
from plain import setup as setup_device

from minefield.basin import find_radii
from minefield.config import DataConfig, ModelConfig
from minefield.data import load_dataset
from minefield.directions import random_directions
from minefield.engine import evaluate_points, evaluate_points_loop
from minefield.models import build_model, init_params
from minefield.stacked import member, one, stack

DEVICE = torch.device("cpu")


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(repeats: int, n: int = 2048) -> float:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return 2 * n**3 / median_time(lambda: torch.mm(a, a), repeats) / 1e9


def mlp_flops(widths: list[int], n_in: int) -> int:
    sizes = [n_in, *widths, 1]
    return 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def setup(widths, n_inputs, k, seed=0):
    model = build_model(ModelConfig(widths=tuple(widths)), (2,), 2)
    th = init_params(model, "glorot_uniform", torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    d = tiled_directions(th, k, g)
    ts = torch.rand(k, generator=g) * 0.3
    if n_inputs == 200:
        data = load_dataset(DataConfig("swissroll"))
        x, y = data.x_train, data.y_train
    else:
        x = torch.randn(n_inputs, 2, generator=g)
        y = (x[:, 0] > 0).long()
    dev = DEVICE
    return (model.to(dev), {k: v.to(dev) for k, v in stack([th]).items()},
            {k: v.to(dev) for k, v in d.items()}, ts, x.to(dev), y.to(dev))


def bench_engine(name, widths, n_inputs, k, k_loop, repeats, peak, memory_mb):
    model, c, d, ts, x, y = setup(widths, n_inputs, k)
    flops = mlp_flops(widths, 2) * n_inputs
    rows = {}
    for path in ("auto", "mlp", "vmap"):
        t = median_time(lambda p=path: evaluate_points(model, c, d, ts, x, y,
                                                       memory_mb=memory_mb, path=p), repeats)
        rows[path] = k / t
    dl = {key: v[:k_loop] for key, v in d.items()}
    t = median_time(lambda: evaluate_points_loop(model, c, dl, ts[:k_loop], x, y), repeats)
    rows["ref loop"] = k_loop / t
    net = plain_net(model, c)
    t = median_time(lambda: point_loop(net, c, dl, ts[:k_loop], x, y), repeats)
    rows["loop"] = k_loop / t
    print(f"\n[{name}] widths {widths}, {n_inputs} inputs, K={k} points "
          f"(loop timed on {k_loop}), {flops / 1e6:.2f} MFLOP per point")
    for path, eps in rows.items():
        gf = eps * flops / 1e9
        print(f"  {path:<8} {eps:12.1f} evals/s  {gf:8.2f} GFLOP/s  {100 * gf / peak:5.1f}% "
              f"of peak")
    print(f"  engine / plain loop: defaults (auto) {rows['auto'] / rows['loop']:.1f}x, mlp "
          f"{rows['mlp'] / rows['loop']:.1f}x, vmap {rows['vmap'] / rows['loop']:.1f}x")
    return rows["auto"] / rows["loop"], rows["auto"] * flops / 1e9 / peak


def bench_volume(n_dirs, repeats, memory_mb, rtol=1e-3, cutoff=1.0):
    model, c, _, _, x, y = setup([23, 16, 26, 32, 28, 31], 200, 1)
    # a trained-looking centre is not needed for timing; scale the init down so the
    # loss crosses the cutoff inside r_max along most directions
    th = {k: v.cpu() for k, v in member(c, 0).items()}
    d = random_directions(th, n_dirs, "filter", "zero", torch.Generator().manual_seed(7))
    d = {k: v.to(DEVICE) for k, v in d.items()}
    d = {k: torch.cat([v, -v]) for k, v in d.items()}
    k = 2 * n_dirs
    r_max = 4.0

    def make_fn(dirs):
        def fn(ts):
            return evaluate_points(model, c, dirs, ts, x, y, memory_mb=memory_mb)[0]
        return fn

    fn = make_fn(d)
    centre = float(evaluate_points(model, c, one(d, 0),
                                   torch.zeros(1), x, y)[0][0])
    cut = cutoff + centre
    t_bis = median_time(lambda: find_radii(fn, k, cut, r_max, rtol, "bisect",
                                           centre_loss=centre), repeats)
    r_bis, ev_bis = find_radii(fn, k, cut, r_max, rtol, "bisect", centre_loss=centre)
    r_ref, _ = find_radii(fn, k, cut, r_max, 1e-7, "bisect", centre_loss=centre)
    inside = r_ref < r_max
    err_bis = float(((r_bis - r_ref).abs() / r_ref)[inside].max())
    t_grid100 = median_time(lambda: find_radii(fn, k, cut, r_max, method="grid",
                                               grid_points=100, centre_loss=centre), 1)
    r_g, ev_g = find_radii(fn, k, cut, r_max, method="grid", grid_points=100,
                           centre_loss=centre)
    err_g100 = float(((r_g - r_ref).abs() / r_ref)[inside].max())
    # grid size needed for rtol, found on a subset of directions
    sub = min(k, 32)
    ds = {kk: v[:sub] for kk, v in d.items()}
    fs = make_fn(ds)
    g_pts, err = 100, err_g100
    while err > rtol and g_pts < 2**17:
        g_pts *= 2
        rs, _ = find_radii(fs, sub, cut, r_max, method="grid", grid_points=g_pts,
                           centre_loss=centre)
        ins = inside[:sub]
        err = float(((rs - r_ref[:sub]).abs() / r_ref[:sub])[ins].max())
    t_per_eval = t_grid100 / ev_g
    t_grid_needed = t_per_eval * k * (g_pts - 1)
    print(f"\n[basin volume] {n_dirs} directions x 2 signs = {k} radii, rtol {rtol}, "
          f"swiss-roll MLP, 200 train points; {int(inside.sum())}/{k} radii below r_max")
    print(f"  bisection: {t_bis:.2f} s, {ev_bis} evaluations, worst rel. error "
          f"{err_bis:.2e} vs rtol-1e-7 reference")
    print(f"  paper grid (100 pts of r_max u^5): {t_grid100:.2f} s, worst rel. error "
          f"{err_g100:.2e}")
    print(f"  grid needs {g_pts} points for error {err:.2e} <= {rtol} (found on {sub} "
          f"directions): {t_grid_needed:.1f} s estimated for all {k} "
          f"(= {t_per_eval * 1e6:.2f} us/eval x {k * (g_pts - 1)} evals)")
    print(f"  bisection speed-up at equal accuracy: {t_grid_needed / t_bis:.0f}x; "
          f"vs the paper's 100-point grid: {t_grid100 / t_bis:.1f}x")
    return t_grid_needed / t_bis


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap, threads=None)
    ap.add_argument("--directions", type=int, default=1000)
    ap.add_argument("--memory-mb", type=float, default=None,
                    help="engine budget (default: the device's, see minefield.autotune)")
    ap.add_argument("--swiss-points", type=int, default=1024)
    ap.add_argument("--wide-inputs", type=int, default=10_000,
                    help="data size of the wide MLP case")
    ap.add_argument("--skip-volume", action="store_true")
    args = ap.parse_args()
    global DEVICE
    DEVICE = setup_device(args)
    peak = matmul_peak(args.repeats)
    print(f"matmul peak (2048^2 torch.mm): {peak:.1f} GFLOP/s")
    s1, _ = bench_engine("swiss roll", [23, 16, 26, 32, 28, 31], 200, args.swiss_points, 128,
                         args.repeats, peak, args.memory_mb)
    s2, f2 = bench_engine("wide", [512, 512, 512], args.wide_inputs, 32, 8, args.repeats, peak,
                          args.memory_mb)
    sv = None if args.skip_volume else bench_volume(args.directions, args.repeats,
                                                     args.memory_mb)
    print("\nsummary (defaults vs the plain loop): engine/loop swiss {:.1f}x (target >= 8x), "
          "wide {:.1f}x; wide case "
          "{:.0f}% of matmul peak (target >= 40%){}".format(
              s1, s2, 100 * f2,
              "" if sv is None else f"; volume bisect vs grid {sv:.0f}x (target >= 20x)"))


if __name__ == "__main__":
    main()
