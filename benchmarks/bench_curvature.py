"""Curvature side by side: minefield vs PyHessian vs the dense Hessian (run by hand).

In one run, on the swiss-roll MLP (3614 parameters, the README's good model,
trained here unless ``--run`` names one) and on ResNet-20 (32x32 inputs, He init
fitted by ``--resnet-steps`` Adam steps to ``--resnet-batch`` Gaussian images with
random labels among 10 classes, then measured with BN in eval mode):

1. top eigenvalue and trace: minefield (Lanczos until the residual bound is 1e-2 of
   lambda, its actual error being far smaller; Hutch++
   until the 95% interval's half-width is <= 1% of the estimate) against
   PyHessian (power iteration and Hutchinson with its default tolerances) and
   against the dense float64 Hessian where it fits (the MLP). Errors are
   relative to the dense reference (MLP) or to a float64 Lanczos run (ResNet's
   eigenvalue); ResNet's trace has no exact reference, so its interval is
   reported together with the time plain Hutchinson (PyHessian's estimator)
   would need for the same interval, from its measured per-probe variance;
2. one Hessian-vector product against one gradient (``torch.autograd.grad`` of the
   same float32 loss of an ``nn.Module`` on the same data: forward + backward), and
   for ResNet-20 also against that gradient in channels-last layout;
3. M = 32 stacked swiss-roll models against 32 separate calls: one HVP, and
   the whole top-eigenvalue + trace measurement (the same algorithms). The
   separate calls are the idiomatic per-model scheme (an ``nn.Module``, its
   gradient graph built once, one ``torch.autograd.grad`` double backward per
   product) and, for reference, minefield itself with M = 1.

Every time is the median of ``--repeats``; sections 2 and 3 call the compared
functions in turn within each repeat and print wall-clock and CPU-time ratios
(CPU time of this process leaves out waiting for a core on a loaded machine). PyHessian is optional
(``pip install pyhessian``); without it its columns say so and are skipped.
The machine may be shared: compare only the ratios printed by one run.

    PYTHONPATH=. python benchmarks/bench_curvature.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import torch
from plain import side_by_side

from minefield.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from minefield.curvature import dense_hessian, hutchpp_trace, top_eigenvalues
from minefield.data import load_dataset
from minefield.hvp import CurvatureOperator, model_objective
from minefield.loss import nll
from minefield.models import build_model
from minefield.runs import Run
from minefield.stacked import member, one
from minefield.stages import load_run_model, train_run
from minefield.train import init_stack

try:
    from pyhessian import hessian as PyHessian
except ImportError:  # optional benchmark dependency
    PyHessian = None


def timed(fn, repeats: int):
    """``(median seconds, last result)``."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def ratio(t: dict, a: str, b: str) -> str:
    """``t[a] / t[b]`` in wall and CPU time."""
    return f"{t[a][0] / t[b][0]:.2f}x wall, {t[a][1] / t[b][1]:.2f}x CPU"


def ms(t: dict, k: str) -> str:
    return f"{t[k][0] * 1e3:.1f} ms (CPU {t[k][1] * 1e3:.1f} ms, {t[k][2]:.0f} page faults)"


def module_with(model, params, i=0, buffers=None):
    net = copy.deepcopy(model).float().eval()
    state = {k: v.float() for k, v in member(params, i).items()}
    state.update(member(buffers or {}, i))
    net.load_state_dict(state, strict=False)
    return net


def good_swissroll(run: str | None, untrained: bool = False):
    if untrained:  # the speed sections only: a product's cost does not depend on the values
        data = load_dataset(DataConfig("swissroll"))
        model = build_model(ModelConfig(), data.x_train.shape[1:], data.n_classes)
        return model, init_stack(model, "glorot_uniform", [0]), data
    if run:
        model, params, buffers, data, _ = load_run_model(Run.open(run))
        return model, one(params, 0), data
    cfg = ExperimentConfig(name="bench-good", data=DataConfig("swissroll"),
                           train=TrainConfig(lr=0.012548, milestones=(3062,), clip_norm=8.0,
                                             steps=5000, log_every=5000,
                                             checkpoint_every=5000), device="cpu")
    res = train_run(cfg, progress=False, save=False)
    return res.model, res.params, res.data


def fitted_resnet(n: int, steps: int):
    """ResNet-20 (He init) fitted by Adam to ``n`` Gaussian 32x32 images with random
    labels (BN in training mode), then in eval mode: a minimum, as the measures expect."""
    model = build_model(ModelConfig("resnet20"), (3, 32, 32), 10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    net = module_with(model, init_stack(model, "he_normal", [0])).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        nll(net(x), y).mean().backward()
        opt.step()
    net.eval()
    params = {k: v.detach()[None].clone() for k, v in net.named_parameters()}
    buffers = {k: v.detach()[None].clone() for k, v in net.named_buffers()}
    with torch.no_grad():
        print(f"\nResNet-20 after {steps} Adam steps on {n} images: train loss (eval mode) "
              f"{float(nll(net(x), y).mean()):.3g}")
    return model, params, buffers, x, y


def pyhessian_columns(net, x, y, repeats):
    if PyHessian is None:
        return None

    def crit(out, yy):
        return nll(out, yy).mean()

    def fresh():  # PyHessian reads p.grad after backward(): clear it, or the Hessian doubles
        net.zero_grad(set_to_none=True)
        return PyHessian(net, crit, data=(x.float(), y), cuda=False)

    fresh()  # warm-up, untimed

    def eig():
        torch.manual_seed(0)  # PyHessian draws from the global RNG
        return fresh().eigenvalues()[0][0]

    def trace():
        torch.manual_seed(0)
        return float(torch.tensor(fresh().trace()).mean())

    def per_probe():
        torch.manual_seed(0)
        h = fresh()
        t = time.perf_counter()
        h.trace(maxIter=20, tol=0.0)  # tol 0: exactly 20 probes
        return (time.perf_counter() - t) / 20

    return timed(eig, repeats), timed(trace, repeats), timed(per_probe, repeats)[1]


def faster(slow: float, fast: float) -> str:
    """``"minefield 3.1x faster"`` or ``"minefield 4.8x slower"``."""
    r = slow / fast
    return f"minefield {r:.1f}x faster" if r >= 1 else f"minefield {1 / r:.1f}x slower"


def rel(a, b):
    return abs(float(a) - float(b)) / abs(float(b))


def compare(name, model, p32, x, y, ref_eig, ref_tr, repeats, exact_ref, max_products=3000,
            buffers=None):
    print(f"\n== {name}: top eigenvalue and trace ==")
    print(f"reference: lambda_max {ref_eig:.7g}, trace "
          f"{ref_tr if isinstance(ref_tr, str) else f'{ref_tr:.7g}'}")
    CurvatureOperator(model_objective(model, p32, (x, y), buffers)).matvec(
        torch.zeros(1, sum(v[0].numel() for v in p32.values())))  # warm-up, untimed
    t_eig, e = timed(lambda: top_eigenvalues(CurvatureOperator(
        model_objective(model, p32, (x, y), buffers)), k=1, tol=1e-2), repeats)
    t_tr, tr = timed(lambda: hutchpp_trace(CurvatureOperator(
        model_objective(model, p32, (x, y), buffers)), rank=20, rtol=1e-2,
        n_probes=max_products - 40), repeats)
    est, (lo, hi) = float(tr.estimate[0]), tr.ci[0].tolist()
    print(f"minefield  lambda_max {float(e.values[0, 0]):.7g} (+-{float(e.residuals[0, 0]):.1g}, "
          f"rel. error {rel(e.values[0, 0], ref_eig):.1e}, {e.n_iter} products) "
          f"in {t_eig:.2f} s")
    if exact_ref:
        print(f"minefield  trace {est:.7g} [{lo:.7g}, {hi:.7g}] (rel. error "
              f"{rel(est, ref_tr):.1e}, covers: {lo <= ref_tr <= hi}, {tr.n_matvecs} products) "
              f"in {t_tr:.2f} s")
    else:
        print(f"minefield  trace {est:.7g} [{lo:.7g}, {hi:.7g}] (half-width "
              f"{(hi - lo) / 2 / abs(est):.1e} of the estimate, {tr.n_matvecs} products) "
              f"in {t_tr:.2f} s")
    need = hutchinson_probes(model, p32, x, y, buffers)
    cols = pyhessian_columns(module_with(model, p32, buffers=buffers), x, y, repeats)
    if cols is None:
        print("PyHessian  not installed (pip install pyhessian): column skipped")
        return
    (tp_eig, pe), (tp_tr, pt), probe = cols
    print(f"PyHessian  lambda_max {pe:.7g} (rel. error {rel(pe, ref_eig):.1e}) in {tp_eig:.2f} s"
          f"  -> {faster(tp_eig, t_eig)}")
    if exact_ref:
        print(f"PyHessian  trace {pt:.7g} (rel. error {rel(pt, ref_tr):.1e}, no interval) in "
              f"{tp_tr:.2f} s  -> {faster(tp_tr, t_tr)}")
    else:
        print(f"PyHessian  trace {pt:.7g} (no interval; {rel(pt, est):.1e} from minefield's) in "
              f"{tp_tr:.2f} s  -> {faster(tp_tr, t_tr)}")
    print(f"PyHessian  trace at matched accuracy (a 1% half-width): its plain Hutchinson needs "
          f"~{need:.0f} probes x {probe * 1e3:.1f} ms = {need * probe:.1f} s  -> "
          f"{faster(need * probe, t_tr)}")


def hutchinson_probes(model, p32, x, y, buffers=None, probes: int = 30) -> float:
    """Probes plain Hutchinson needs for a 95% half-width of 1%, from the variance of
    ``probes`` Rademacher probes."""
    op = CurvatureOperator(model_objective(model, p32, (x, y), buffers))
    z = (torch.randint(0, 2, (1, probes, op.n), generator=torch.Generator().manual_seed(1))
         * 2 - 1)
    q = (op.matmat(z.float()) * z).sum(2).double()[0]  # probes z^T H z
    return float((1.96 * q.std() / (0.01 * q.mean().abs())) ** 2)


class ModuleHessian:
    """The idiomatic per-model comparator: one ``nn.Module``, its gradient built once with
    ``create_graph=True`` and each product one ``torch.autograd.grad`` double backward
    through it (PyHessian's scheme). Duck-types :class:`CurvatureOperator` (M = 1) so
    the same eigenvalue / trace algorithms run on it."""

    def __init__(self, net, x, y):
        self.params = [q for q in net.parameters()]
        self.n, self.m, self.n_matvecs, self.probe_chunk = sum(
            q.numel() for q in self.params), 1, 0, None
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.grads = torch.autograd.grad(nll(net(x.to(self.dtype)), y).mean(), self.params,
                                         create_graph=True)

    def product(self, v):  # v: (n,) -> (n,)
        parts = list(torch.split(v, [q.numel() for q in self.params]))
        hv = torch.autograd.grad(self.grads, self.params,
                                 [t.view_as(q) for t, q in zip(parts, self.params)],
                                 retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv])

    def matvec(self, v):
        self.n_matvecs += 1
        return self.product(v[0])[None]

    def matmat(self, v):
        self.n_matvecs += v.shape[1]
        return torch.stack([self.product(u) for u in v[0]])[None]


def hvp_vs_gradient(name, model, p32, x, y, repeats, buffers=None):
    """One HVP against one plain ``torch.autograd.grad`` of the same float32 loss on the
    same data (forward + backward of an ``nn.Module``), side by side; for images also
    against the same gradient in channels-last layout (oneDNN's fastest on CPU)."""
    op = CurvatureOperator(model_objective(model, p32, (x, y), buffers))
    v = torch.randn(1, op.n)
    net = module_with(model, p32, buffers=buffers)
    params = list(net.parameters())
    xf = x.float()
    ref = ModuleHessian(net, xf, y)
    fns = {"hvp": lambda: op.matvec(v),
           "grad": lambda: torch.autograd.grad(nll(net(xf), y).mean(), params),
           "double backward": lambda: ref.matvec(v)}
    if xf.dim() == 4:
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        params_cl, x_cl = list(net_cl.parameters()), xf.contiguous(
            memory_format=torch.channels_last)
        fns["grad channels-last"] = lambda: torch.autograd.grad(
            nll(net_cl(x_cl), y).mean(), params_cl)
    t = side_by_side(fns, repeats)
    t_first, _ = timed(lambda: CurvatureOperator(model_objective(
        model, p32, (x, y), buffers)).matvec(v), repeats)
    print(f"{name}: one HVP {ms(t, 'hvp')} vs one gradient {ms(t, 'grad')}: "
          f"{ratio(t, 'hvp', 'grad')}")
    if "grad channels-last" in t:
        print(f"  vs the channels-last gradient {ms(t, 'grad channels-last')}: "
              f"{ratio(t, 'hvp', 'grad channels-last')}")
    fastest = min((k for k in t if k.startswith("grad")), key=lambda k: t[k][1])
    print(f"  vs the fastest gradient ({fastest}, by CPU time): {ratio(t, 'hvp', fastest)} "
          f"(target <= 2x)")
    print(f"  nn.Module double backward {ms(t, 'double backward')}: "
          f"{ratio(t, 'double backward', 'grad')} of the gradient; first product incl. "
          f"set-up {t_first * 1e3:.1f} ms")


def stacked(model, data, members, repeats):
    """M stacked models in one call against M separate calls, side by side: the
    idiomatic per-model comparator (:class:`ModuleHessian`) and minefield with M = 1."""
    x, y = data.split("train")
    p = init_stack(model, "glorot_uniform", range(members))
    singles = [one(p, i) for i in range(members)]
    nets = [module_with(model, q) for q in singles]
    op = CurvatureOperator(model_objective(model, p, (x, y)))
    ops = [CurvatureOperator(model_objective(model, q, (x, y))) for q in singles]
    refs = [ModuleHessian(net, x, y) for net in nets]
    v = torch.randn(members, op.n)
    t = side_by_side({"stacked": lambda: op.matvec(v),
                      "modules": lambda: [o.matvec(v[i:i + 1]) for i, o in enumerate(refs)],
                      "M=1": lambda: [o.matvec(v[i:i + 1]) for i, o in enumerate(ops)]},
                     max(repeats, 11))
    print(f"one HVP of {members} swiss-roll MLPs: stacked {ms(t, 'stacked')} vs {members} "
          f"nn.Module double backwards {ms(t, 'modules')}: {ratio(t, 'modules', 'stacked')} "
          f"faster (target >= 5x); vs {members} minefield M=1 calls {ms(t, 'M=1')}: "
          f"{ratio(t, 'M=1', 'stacked')}")

    def measure(o):  # fixed work: 20 Lanczos steps + Hutch++ with 20 + 20 + 60 products
        return (top_eigenvalues(o, k=1, tol=1e-30, max_iter=20).values,
                hutchpp_trace(o, rank=20, rtol=None, n_probes=60).estimate)

    t = side_by_side({
        "stacked": lambda: measure(CurvatureOperator(model_objective(model, p, (x, y)))),
        "modules": lambda: [measure(ModuleHessian(net, x, y)) for net in nets],
        "M=1": lambda: [measure(CurvatureOperator(model_objective(model, q, (x, y))))
                        for q in singles]}, repeats)
    print(f"lambda_max + trace of {members} models (120 products each, incl. set-up): one "
          f"stacked call {ms(t, 'stacked')} vs {members} nn.Module operators "
          f"{ms(t, 'modules')}: {ratio(t, 'modules', 'stacked')} faster (target >= 5x); vs "
          f"{members} minefield M=1 calls {ms(t, 'M=1')}: {ratio(t, 'M=1', 'stacked')}")


def probe_batches(model, p32, x, y, repeats):
    """The MLP R-operator's probes as one batch axis (``matmat_flat``, the default where
    its working set is small) against the same operator one product at a time, side by
    side: Hutch++ (20 + 20 + 60 products) and a block of 32 products, one model."""
    def op(batched):
        o = CurvatureOperator(model_objective(model, p32, (x, y)))
        if not batched:
            o._mlp.probes_per_pass = 1
        return o

    v = torch.randn(1, 32, sum(t[0].numel() for t in p32.values()))
    ops = {b: op(b) for b in (True, False)}
    t = side_by_side({
        "block": lambda: ops[True].matmat(v), "block, one at a time": lambda: ops[False].matmat(v),
        "hutch++": lambda: hutchpp_trace(op(True), rank=20, rtol=None, n_probes=60),
        "hutch++, one at a time": lambda: hutchpp_trace(op(False), rank=20, rtol=None,
                                                        n_probes=60)}, max(repeats, 5))
    print(f"swiss-roll MLP, 32 products: probes batched {ms(t, 'block')} vs one at a time "
          f"{ms(t, 'block, one at a time')}: {ratio(t, 'block, one at a time', 'block')}; "
          f"Hutch++ (100 products, with set-up) {ms(t, 'hutch++')} vs "
          f"{ms(t, 'hutch++, one at a time')}: {ratio(t, 'hutch++, one at a time', 'hutch++')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu",
                    help="cpu only: its comparators (PyHessian, exact oracles) are CPU code")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--run", help="A trained swiss-roll run (member 0); default: train one.")
    ap.add_argument("--resnet-batch", type=int, default=32)
    ap.add_argument("--members", type=int, default=32)
    ap.add_argument("--resnet-products", type=int, default=800,
                    help="Budget of Hessian products for ResNet-20's trace.")
    ap.add_argument("--resnet-steps", type=int, default=100,
                    help="Adam steps fitting ResNet-20 to its images before measuring.")
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--speed-only", action="store_true",
                    help="Only the speed sections (HVP vs gradient, probe batches, stacked "
                         "vs separate).")
    ap.add_argument("--untrained", action="store_true",
                    help="With --speed-only: time products at initialised weights instead of "
                         "training the swiss-roll model first (use --resnet-steps 0 too).")
    args = ap.parse_args()
    if args.device != "cpu":
        raise SystemExit(f"{ap.prog}: --device {args.device}: this benchmark runs on the CPU "
                         "only (see bench_real.py and bench_engine.py for the GPU)")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph")
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}; "
          f"PyHessian: {'installed' if PyHessian else 'not installed'}; load average "
          f"{' '.join(f'{a:.1f}' for a in os.getloadavg())} on {os.cpu_count()} CPUs")

    model, params, data = good_swissroll(args.run, args.speed_only and args.untrained)
    x, y = data.split("train")
    p32 = {k: v[:1].float() for k, v in params.items()}
    if not args.speed_only:
        accuracy(model, params, x, y, args)
    if not args.skip_resnet:
        rmodel, rp, rb, rx, ry = fitted_resnet(args.resnet_batch, args.resnet_steps)
        if not args.speed_only:
            ref = top_eigenvalues(CurvatureOperator(model_objective(
                rmodel, {k: v.double() for k, v in rp.items()}, (rx, ry), rb)), k=1, tol=1e-6)
            compare(f"ResNet-20, 32x32, {args.resnet_batch} inputs, float32", rmodel, rp, rx,
                    ry, float(ref.values[0, 0]), "no exact reference", 1, False,
                    args.resnet_products, rb)

    print("\n== one HVP vs one gradient ==")
    hvp_vs_gradient("swiss-roll MLP", model, p32, x, y, max(args.repeats, 5))
    if not args.skip_resnet:
        hvp_vs_gradient("ResNet-20", rmodel, rp, rx, ry, max(args.repeats, 5), rb)

    print("\n== probes as a batch axis vs one product at a time ==")
    probe_batches(model, p32, x, y, args.repeats)

    print(f"\n== M = {args.members} stacked vs separate (CPU) ==")
    stacked(model, data, args.members, args.repeats)
    print(f"\nload average at the end {' '.join(f'{a:.1f}' for a in os.getloadavg())}")


def accuracy(model, params, x, y, args) -> None:
    """Section 1 on the swiss-roll MLP: minefield and PyHessian against the dense Hessian."""
    p64 = {k: v[:1].double() for k, v in params.items()}
    p32 = {k: v[:1].float() for k, v in params.items()}
    t_dense, h = timed(lambda: dense_hessian(model, p64, (x, y)), 1)
    t0 = time.perf_counter()
    ev = torch.linalg.eigvalsh(h[0])
    t_dense += time.perf_counter() - t0
    ref_eig, ref_tr = float(ev[-1]), float(h[0].trace())
    print(f"\ndense float64 Hessian of the swiss-roll MLP ({h.shape[-1]} parameters) + eigvalsh: "
          f"{t_dense:.1f} s")
    compare("swiss-roll MLP, float32", model, p32, x, y, ref_eig, ref_tr, args.repeats, True)
    t64, _ = timed(lambda: hutchpp_trace(CurvatureOperator(model_objective(
        model, p64, (x, y))), rank=20, rtol=1e-2), args.repeats)
    print(f"minefield float64 trace (same rule) in {t64:.2f} s; dense float64 {t_dense:.1f} s")


if __name__ == "__main__":
    main()
