"""Local vs Ray executor on a 16-task study, Ray's start-up cost, and per-task costs.

Three sections, all in one run so the ratios are measured side by side:

1. Ray start-up: ``ray.init`` of a local instance (``--workers`` CPUs, no
   dashboard), the first round of tasks (workers start and import torch and
   minefield), and the dispatch cost of a warm task returning a ResNet-20-sized
   result (270k float32 weights) -- the fixed costs a Ray run pays.
2. A 16-task study (the grid of 8 poison factors x 2 seeds on the swiss roll,
   isolated members, one model per task, ``--steps`` training steps,
   ``--directions`` basin directions each): the local executor (one task after
   another in this process) against Ray with ``--workers`` workers of one CPU
   each; the unsplit study (one stack of 16: batched, the default, and isolated,
   whose numbers every split must give) as single-process references. Median
   wall time over ``--repeats``; every repeat of the isolated stack, the local
   tasks and the Ray tasks is checked to give the same table bit for bit.
3. Per-task costs of the SVHN paper-scale sweep's unit of work, a ResNet-20
   (269,722 weights) training step at batch 256 and a forward pass over 256
   images, on ``--device``: the inputs of docs/scale-out.md's projection.

    PYTHONPATH=. python benchmarks/bench_executor.py --threads 1 --workers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import minefield as mf
from minefield.functional import stacked_forward
from minefield.loss import nll
from minefield.train import init_stack


def echo_task(spec: dict) -> dict:
    """A warm no-op task with a result of ``spec['n']`` float32 numbers."""
    return {"w": torch.zeros(spec["n"])}


def _median(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def startup(workers: int) -> tuple[mf.RayExecutor, dict[str, float]]:
    import ray

    ex = mf.RayExecutor(cpus_per_task=1, num_cpus=workers, include_dashboard=False)
    t = time.perf_counter()
    ex._ray()
    init = time.perf_counter() - t
    t = time.perf_counter()
    ex.map(echo_task, [{"n": 1}] * workers)  # workers start, import torch and minefield
    first = time.perf_counter() - t
    n = 269_722
    t = time.perf_counter()
    ex.map(echo_task, [{"n": n}] * 32)
    per_task = (time.perf_counter() - t) / 32 * workers  # wall per task per worker slot
    assert ray.is_initialized()
    return ex, {"ray_init_s": init, "first_tasks_s": first, "warm_task_1mb_s": per_task}


WHERE = ("stack", "member")  # where a model was trained, not what was measured


def study(args, ex: mf.RayExecutor) -> dict[str, object]:
    base = mf.ExperimentConfig(name="bench", data=mf.DataConfig("swissroll"),
                               train=mf.TrainConfig(steps=args.steps, log_every=args.steps),
                               device="cpu")
    iso = base.replace(train=base.train.replace(isolate=True))
    cfg = mf.StudyConfig(grid={"poison.beta": [0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.6],
                               "train.seed": [0, 1]},
                         volume=mf.VolumeConfig(n_directions=args.directions))
    rows: dict[str, list] = {}

    def run(name: str, b: mf.ExperimentConfig, **kw):
        with tempfile.TemporaryDirectory() as root:
            res = mf.study_run(b, cfg, root, progress=False, **kw)
        rows.setdefault(name, []).append(json.dumps(
            [{k: v for k, v in r.items() if k not in WHERE} for r in res.rows],
            sort_keys=True))

    modes = {"one batched stack of 16 (the default)": lambda: run("batched", base),
             "one isolated stack of 16": lambda: run("isolated", iso),
             "local executor, 16 tasks": lambda: run("local", iso, models_per_task=1),
             f"ray, {args.workers} workers, 16 tasks": lambda: run("ray", iso,
                                                                   models_per_task=1,
                                                                   executor=ex)}
    times: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(args.repeats):  # interleaved, so load changes hit every mode alike
        for name, fn in modes.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    ref = rows["isolated"][0]
    identical = all(r == ref for k in ("isolated", "local", "ray") for r in rows[k])
    return {"median_s": {k: statistics.median(v) for k, v in times.items()}, "all_s": times,
            "split_equals_unsplit": identical}


def resnet_costs(device: str, repeats: int) -> dict[str, float]:
    model = mf.build_model(mf.ModelConfig(name="resnet20"), (3, 32, 32), 10).to(device)
    params = {k: v.to(device).requires_grad_(True)
              for k, v in init_stack(model, "he_normal", [0]).items()}
    bufs = {k: v[None].to(device) for k, v in model.named_buffers()}
    x = torch.randn(256, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (256,), device=device)
    opt = torch.optim.SGD(list(params.values()), lr=0.1, momentum=0.9)
    model.train()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        loss = nll(stacked_forward(model, params, x, bufs), y).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()

    def forward():
        with torch.no_grad():
            model.eval()
            stacked_forward(model, params, x, bufs)
            model.train()
        sync()

    step(), forward()  # warm-up
    n = sum(v[0].numel() for v in params.values())
    return {"weights": n, "train_step_256_s": _median(step, repeats)[0],
            "forward_256_s": _median(forward, repeats)[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the driver")
    ap.add_argument("--workers", type=int, default=2, help="Ray CPUs (one task each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1000, help="training steps per model")
    ap.add_argument("--directions", type=int, default=50, help="basin directions per model")
    ap.add_argument("--device", default="cpu", help="for the ResNet-20 per-task costs")
    ap.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, Ray workers {args.workers}, repeats {args.repeats}, "
          f"torch {torch.__version__}")
    ex, start = startup(args.workers)
    print(f"Ray start-up: ray.init {start['ray_init_s']:.1f} s, first {args.workers} tasks "
          f"(workers import torch) {start['first_tasks_s']:.1f} s, warm task with a 1 MB "
          f"result {start['warm_task_1mb_s'] * 1e3:.1f} ms")
    sw = study(args, ex)
    ex.close()
    med = sw["median_s"]
    local = med["local executor, 16 tasks"]
    print(f"16-task study ({args.steps} steps, {args.directions} directions per model), "
          "median wall time:")
    for k, v in med.items():
        print(f"  {k:<40} {v:8.1f} s   local / this = {local / v:.2f}x")
    print(f"  isolated stack, local tasks and Ray tasks give the same table (bit for bit) "
          f"in every repeat: {sw['split_equals_unsplit']}")
    rc = resnet_costs(args.device, args.repeats)
    print(f"ResNet-20 ({rc['weights']:,} weights) on {args.device}: train step (batch 256) "
          f"{rc['train_step_256_s']:.3f} s, forward of 256 images {rc['forward_256_s']:.3f} s")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                        "startup": start, "sweep": sw, "resnet20": rc},
                                       indent=2))


if __name__ == "__main__":
    main()
