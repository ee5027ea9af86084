"""CUDA paths agree with the CPU (skipped without a GPU)."""

import pytest
import torch

from minefield import autotune
from minefield.basin import VolumeConfig, basin_radii
from minefield.config import DataConfig, ModelConfig, TrainConfig
from minefield.data import Dataset, load_dataset
from minefield.directions import random_directions
from minefield.engine import evaluate_points, precision_error
from minefield.functional import buffers_like
from minefield.models import build_model, init_params
from minefield.stacked import member, one
from minefield.train import fit, init_stack

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _setup():
    data = load_dataset(DataConfig("swissroll", n_poison=200))
    model = build_model(ModelConfig(), (2,), 2)
    return data, model, init_stack(model, "glorot_uniform", [0, 1])


def test_engine_on_cuda_matches_cpu():
    data, model, params = _setup()
    first = one(params, 0)
    d = random_directions(member(first, 0), 64, generator=torch.Generator().manual_seed(0))
    ts = torch.linspace(0, 0.3, 64)
    cpu = evaluate_points(model, first, d, ts, data.x_train, data.y_train)[0]
    mv = {k: v.cuda() for k, v in first.items()}
    dv = {k: v.cuda() for k, v in d.items()}
    gpu = evaluate_points(model, mv, dv, ts.cuda(), data.x_train.cuda(), data.y_train.cuda())[0]
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


def test_stacked_training_on_cuda_matches_cpu():
    # float64 on both devices: 50 steps of poisoned training amplify float32 rounding
    # (1 element in 832 off by 4e-4 on an H200), float64 rounding stays below 1e-9.
    data, model, params = _setup()
    model = model.double()
    p64 = {k: v.double() for k, v in params.items()}
    cfg = TrainConfig(steps=50, log_every=50, lr=0.01)
    cpu = fit(model, p64, data.to("cpu", torch.float64), cfg, torch.tensor([0.0, 0.5]))
    gpu = fit(model, {k: v.cuda() for k, v in p64.items()}, data.to("cuda", torch.float64),
              cfg, torch.tensor([0.0, 0.5]))
    for k in params:
        torch.testing.assert_close(gpu.params[k].cpu(), cpu.params[k], rtol=1e-8, atol=1e-10)


def _resnet(n=64, k=4):
    model = build_model(ModelConfig("resnet20"), (3, 32, 32), 10)
    g = torch.Generator().manual_seed(0)
    theta = init_params(model, "he_normal", g)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    d = random_directions(theta, k, generator=g)
    return model, {k_: v.unsqueeze(0) for k_, v in theta.items()}, d, x, y


@pytest.mark.parametrize("path", ["auto", "vmap", "loop", "loop_cl"])
def test_resnet_engine_paths_on_cuda_match_cpu(path):
    model, c, d, x, y = _resnet()
    bufs = buffers_like(model, 1)
    ts = torch.tensor([0.0, 0.05, 0.1, 0.2])
    cpu = evaluate_points(model, c, d, ts, x, y, bufs, path="loop")[0]
    cu = {k: v.cuda() for k, v in c.items()}
    gpu = evaluate_points(model.cuda(), cu, {k: v.cuda() for k, v in d.items()}, ts.cuda(),
                          x.cuda(), y.cuda(), {k: v.cuda() for k, v in bufs.items()},
                          path=path)[0]
    model.cpu()
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


def test_cuda_budget_comes_from_free_memory():
    free = torch.cuda.mem_get_info()[0] / 2**20
    got = autotune.memory_budget_mb(torch.device("cuda"))
    assert 0 < got <= free and got == pytest.approx(autotune.CUDA_FREE_SHARE * free, rel=0.05)
    assert not autotune.cache_clamped("cuda")


def test_bf16_radii_are_checked_in_float32_on_cuda():
    model, c, d, x, y = _resnet(128, 2)
    cu = {k: v.cuda() for k, v in c.items()}
    bufs = {k: v.cuda() for k, v in buffers_like(model, 1).items()}
    model.cuda()
    try:
        err = precision_error(model, cu, {k: v.cuda() for k, v in d.items()},
                              torch.tensor([0.0, 0.1]).cuda(), x.cuda(), y.cuda(), "bf16", bufs)
        cfg = VolumeConfig(n_directions=2, cutoff=3.0, rtol=1e-2, n_bootstrap=0)
        ref = basin_radii(model, cu, (x.cuda(), y.cuda()), cfg, bufs)
        low = basin_radii(model, cu, (x.cuda(), y.cuda()), cfg.replace(precision="bf16"), bufs)
    finally:
        model.cpu()
    # bf16 operands: a loss off by 1e-3 to 1e-2 of itself (this random-init net's loss is
    # ~12; an H200 measured 0.114, 0.9%); the radii are what the mode must keep
    scale = float(evaluate_points(model.cuda(), cu, {k: v.cuda() for k, v in d.items()},
                                  torch.tensor([0.0, 0.1]).cuda(), x.cuda(), y.cuda(),
                                  bufs)[0].abs().max())
    model.cpu()
    assert err < 2e-2 * scale
    torch.testing.assert_close(low.radii, ref.radii, rtol=2.5e-2, atol=0)


def test_one_member_training_on_cuda_matches_cpu_float64():
    model, c, _, x, y = _resnet(16)
    model = model.double()
    c64 = {k: v.double() for k, v in c.items()}
    data = Dataset("t", x.double(), y, x[:4].double(), y[:4], x[:0].double(), y[:0], 10)
    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, steps=5, log_every=5)
    bufs = {k: v.double() if v.is_floating_point() else v
            for k, v in buffers_like(model, 1).items()}
    cpu = fit(model, c64, data, cfg, buffers=bufs)
    gpu = fit(model, {k: v.cuda() for k, v in c64.items()}, data.to("cuda"), cfg,
              buffers={k: v.cuda() for k, v in bufs.items()})
    for k in c64:
        torch.testing.assert_close(gpu.params[k].cpu(), cpu.params[k], rtol=1e-8, atol=1e-10)


def test_compiled_search_step_on_cuda_matches_eager():
    data, model, params = _setup()
    dev_data = data.to("cuda")
    p = {k: v.cuda() for k, v in params.items()}
    cfg = TrainConfig(steps=30, log_every=30, lr=0.01)
    eager = fit(model, p, dev_data, cfg, torch.tensor([0.0, 0.5]), compile_mode="off")
    comp = fit(model, p, dev_data, cfg, torch.tensor([0.0, 0.5]), compile_mode="on")
    assert comp.compiled["decision"] == "on"
    for k in params:  # float32, 30 steps: rounding of fused kernels only
        torch.testing.assert_close(comp.params[k], eager.params[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("sam", ["sam", "asam"])
def test_compiled_sam_step_on_cuda_matches_eager(sam):
    # SAM runs the compiled objective twice per step (the ascent, then the update): under
    # CUDA graphs a replay overwrites the previous one's outputs, so nothing of the first
    # may be read after the second
    data, model, params = _setup()
    dev_data = data.to("cuda")
    p = {k: v.cuda() for k, v in params.items()}
    cfg = TrainConfig(steps=20, log_every=10, lr=0.01, sam=sam, rho=0.05)
    eager = fit(model, p, dev_data, cfg, torch.tensor([0.0, 0.5]), compile_mode="off")
    comp = fit(model, p, dev_data, cfg, torch.tensor([0.0, 0.5]), compile_mode="on")
    for k in params:
        torch.testing.assert_close(comp.params[k], eager.params[k], rtol=1e-3, atol=1e-4)
    for a, b in zip(comp.history, eager.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


def test_auto_compile_decides_and_reports_on_cuda():
    data, model, params = _setup()
    cfg = TrainConfig(steps=600, log_every=600, lr=0.01)
    res = fit(model, {k: v.cuda() for k, v in params.items()}, data.to("cuda"), cfg,
              torch.tensor([0.0, 0.5]), compile_horizon=100_000)  # a long run ahead: probe
    rep = res.compiled
    assert rep["decision"] in ("compiled", "eager"), rep
    assert rep["compile_s"] >= 0 and rep["eager_ms"] > 0 and rep["compiled_ms"] > 0
    print(f"compile decision: {rep}")


def test_curvature_and_sharpness_on_cuda_match_cpu():
    from minefield.measures import SharpnessConfig, measure_members

    data, model, params = _setup()
    cfg = SharpnessConfig(measures=("lambda_max", "trace", "worst_l2", "average",
                                    "pac_bayes_sigma"), steps=3, n_samples=8)
    cpu = measure_members(model, params, data, cfg)
    gpu = measure_members(model, {k: v.cuda() for k, v in params.items()}, data.to("cuda"), cfg)
    for k in ("lambda_max", "worst_l2", "average", "pac_bayes_sigma"):
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-6, atol=1e-9)


def test_batched_probes_on_cuda_match_cpu_float64():
    """The MLP R-operator's probes as a batch axis (``matmat_flat``; on CUDA as many as
    ``GPU_PROBE_BYTES`` hold) against the CPU, float64, 1e-10."""
    from minefield.hvp import CurvatureOperator, model_objective

    data, model, params = _setup()
    x, y = data.split("train")
    p64 = {k: v.double() for k, v in params.items()}
    cpu = CurvatureOperator(model_objective(model, p64, (x, y)))
    gpu = CurvatureOperator(model_objective(model, {k: v.cuda() for k, v in p64.items()},
                                            (x.cuda(), y.cuda())))
    assert gpu._mlp.probes_per_pass >= 2
    v = torch.randn(cpu.m, 9, cpu.n, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    torch.testing.assert_close(gpu.matmat(v.cuda()).cpu(), cpu.matmat(v), rtol=1e-10,
                               atol=1e-12)


def _quadratic_net():
    from minefield.bodies import QuadraticNet, log_spaced_axes, random_rotation

    a = log_spaced_axes(6, 1.0)
    rot = random_rotation(6, torch.Generator().manual_seed(0))
    net = QuadraticNet((rot * a.pow(-2)) @ rot.T)
    return net, {k: v.detach()[None].clone() for k, v in net.named_parameters()}


def _network_volume_on_both(**kw):
    from minefield.bodies import QuadraticNet
    from minefield.directions import DirectionSpec

    net, params = _quadratic_net()
    x, y = QuadraticNet.data()
    cfg = VolumeConfig(cutoff=QuadraticNet.cutoff, r_max=50.0, rtol=1e-6, n_directions=20,
                       directions=DirectionSpec("gaussian"), **kw)
    cpu = basin_radii(net, params, (x, y), cfg)
    gpu = basin_radii(net, {k: v.cuda() for k, v in params.items()}, (x.cuda(), y.cuda()), cfg)
    return cpu, gpu


@pytest.mark.parametrize("pre", ["hessian", "hutchinson"])
def test_curvature_preconditioners_on_cuda_match_cpu(pre):
    # the Hessian (diagonal) came back on CUDA and met the CPU coordinate scale
    cpu, gpu = _network_volume_on_both(estimator="is", preconditioner=pre)
    assert gpu.log10_volume == pytest.approx(cpu.log10_volume, abs=1e-4)


def test_mcmc_on_a_network_on_cuda():
    # the line-loss came back on CUDA into mcmc's CPU chain maths (torch.where in _capped)
    cpu, gpu = _network_volume_on_both(estimator="mcmc", preconditioner="hessian",
                                       n_chains=8, n_replicates=2, walk_length=2)
    assert abs(gpu.log10_volume - cpu.log10_volume) < 0.5  # chains may round apart


def test_batch_statistics_sharpness_on_cuda_matches_cpu():
    # bn="batch": the module's own (CPU) buffers went with CUDA parameters into the engine
    from minefield.hvp import model_objective

    model, c, d, x, y = _resnet(n=32)
    ts = torch.full((len(next(iter(d.values()))),), 0.05)
    cpu = model_objective(model, c, (x, y), bn="batch").perturbed_losses(0, d, ts)
    obj = model_objective(model, {k: v.cuda() for k, v in c.items()}, (x.cuda(), y.cuda()),
                          bn="batch")
    gpu = obj.perturbed_losses(0, {k: v.cuda() for k, v in d.items()}, ts)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


def test_repeated_top_eigenvalues_on_cuda_match_cpu():
    # the deflated passes gathered CUDA Ritz vectors with a CPU index
    from minefield.curvature import top_eigenvalues
    from minefield.hvp import CurvatureOperator, Objective

    ev = torch.cat([torch.tensor([5.0, 5.0, 3.0]), torch.linspace(-0.5, 1.0, 27)]).double()
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    a = q @ torch.diag(ev) @ q.T
    out = {}
    for dev in ("cpu", "cuda"):
        w = {"w": torch.zeros(2, 30, dtype=torch.float64, device=dev)}
        ad = a.to(dev)
        fn = Objective.from_function(w, lambda p, ad=ad: p["w"] @ ad @ p["w"] / 2)
        out[dev] = top_eigenvalues(CurvatureOperator(fn), k=3, tol=1e-10, vectors=True)
    torch.testing.assert_close(out["cuda"].values, out["cpu"].values, rtol=1e-8, atol=1e-8)
    assert out["cuda"].vectors.device.type == "cuda" and out["cuda"].residuals.device.type == "cpu"


def test_bootstrap_of_cuda_radii_is_the_cpu_one():
    # torch.quantile refused the CPU levels for CUDA replicates
    from minefield.naive import bootstrap_log10_volume

    r = torch.rand(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    assert bootstrap_log10_volume(r.cuda(), 10) == bootstrap_log10_volume(r, 10)


def test_results_computed_on_cuda_come_back_on_the_cpu_and_plot():
    # Rollouts and Slice kept CUDA tensors, which their plots' .numpy() refused
    from minefield.landscape import slice_1d
    from minefield.plotting.basin import plot_rollouts
    from minefield.plotting.landscape import plot_slice
    from minefield.rollout import rollouts

    data, model, params = _setup()
    cu = {k: v.cuda() for k, v in one(params, 0).items()}
    ro = rollouts(model, cu, data.to("cuda"), 4, torch.linspace(-0.5, 0.5, 11))
    d = random_directions(member(cu, 0), 1, generator=torch.Generator().manual_seed(0))
    sl = slice_1d(model, cu, d, torch.linspace(-1, 1, 11).cuda(), data.to("cuda"))
    assert {ro.loss.device.type, sl.ts.device.type, sl.values["train_loss"].device.type} == {
        "cpu"}
    plot_rollouts(ro)
    plot_slice(sl)


def test_training_node_on_cuda_is_autograd_bit_for_bit(monkeypatch):
    # minefield.mlpgrad claims autograd's kernels and layouts: on CUDA too
    import minefield.step
    from minefield.functional import stacked_forward

    data, model, params = _setup()
    data, model = data.to("cuda"), model.cuda()
    p = {k: v.cuda() for k, v in params.items()}
    cfg = TrainConfig(optimizer="adam", lr=0.004, steps=20, log_every=10, clip_norm=8.0)
    node = fit(model, p, data, cfg, torch.tensor([0.0, 0.5]), flip=True)
    monkeypatch.setattr(minefield.step, "mlp_logits",
                        lambda m, q, x: stacked_forward(m, q, x))
    ref = fit(model, p, data, cfg, torch.tensor([0.0, 0.5]), flip=True)
    for k in p:
        assert torch.equal(node.params[k], ref.params[k]), k


def test_speculative_retries_on_cuda_by_default_for_batched_searches():
    from minefield.search import SearchConfig, _speculates, search_minima

    data, model, params = _setup()
    cfg = SearchConfig.make(steps=60, lr=0.02, milestones=(), log_every=10, compact_every=30,
                            isolate=False, poison_cap=0.5, retries=1, continue_below=None)
    p = {k: v.cuda() for k, v in params.items()}
    assert _speculates(None, cfg, model.cuda(), data.to("cuda"), None, p)
    res = search_minima(model, p, data.to("cuda"), cfg)
    assert res.metrics["train_acc"].shape == (2,) and int(res.attempts.max()) <= 1
