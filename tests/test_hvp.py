"""HVP / GGN / Fisher products against dense float64 references built by plain autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_stats_problem, frozen_bias_problem
from torch.func import functional_call

from minefield.config import ConfigError, ModelConfig
from minefield.hvp import CurvatureOperator, NonFiniteLoss, Objective, dense_matrix, model_objective
from minefield.loss import nll
from minefield.models import build_model
from minefield.stacked import flatten, member, one, unflatten
from minefield.train import init_stack


def _problem(widths=(6, 5), m=3, n=24, classes=2, seed=0, name="mlp", shape=(2,)):
    model = build_model(ModelConfig(name, widths=widths), shape, classes)
    p = {k: v.double() for k, v in init_stack(model, "glorot_uniform",
                                              list(range(seed, seed + m))).items()}
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, p, x, y


def _flat_loss(model, p, x, y, i, buffers=None, train=False):
    """The plain reference: member i's mean NLL as a function of its flat parameters."""
    single = one(p, i)
    net = copy.deepcopy(model).double().train(train)
    bufs = member(buffers or {}, i)

    def f(flat):
        q = member(unflatten(flat[None], single), 0)
        return nll(functional_call(net, (q, bufs) if bufs else q, (x,)), y).mean()

    return f, flatten(single)[0]


def _quadratic(n=12, seed=0, m=2):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = (b + b.T) / 2
    w = {"w": torch.randn(m, n, generator=g, dtype=torch.float64)}
    return a, w


def test_quadratic_hessian_and_ggn_are_the_matrix():
    a, w = _quadratic()
    obj = Objective.from_function(w, lambda p: p["w"] @ a @ p["w"] / 2)
    h = dense_matrix(CurvatureOperator(obj))
    torch.testing.assert_close(h, a.expand(2, -1, -1), rtol=0, atol=1e-12)
    # outputs z = w, outer loss z^T A z / 2: the Gauss-Newton matrix is A too
    ggn = CurvatureOperator(Objective.from_function(w, lambda z: z @ a @ z / 2, lambda p: p["w"]),
                            "ggn")
    torch.testing.assert_close(dense_matrix(ggn), a.expand(2, -1, -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_mlp_hessian_matches_autograd_dense_float64(mode):
    model, p, x, y = _problem(classes=3)
    op = CurvatureOperator(model_objective(model, p, (x, y)), mode=mode)
    h = dense_matrix(op)
    for i in range(3):
        f, flat = _flat_loss(model, p, x, y, i)
        ref = torch.autograd.functional.hessian(f, flat)
        torch.testing.assert_close(h[i], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_stacked_hvp_equals_per_model_hvps(mode):
    model, p, x, y = _problem(m=4)
    op = CurvatureOperator(model_objective(model, p, (x, y)), mode=mode)
    v = torch.randn(4, op.n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stacked = op.matvec(v)
    for i in range(4):
        one = CurvatureOperator(model_objective(model, {k: t[i:i + 1] for k, t in p.items()},
                                                (x, y)), mode=mode)
        torch.testing.assert_close(stacked[i:i + 1], one.matvec(v[i:i + 1]), rtol=1e-12,
                                   atol=1e-14)
    # K probes per member through matmat agree with K matvecs
    vv = torch.randn(4, 5, op.n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mm = CurvatureOperator(model_objective(model, p, (x, y)), probe_chunk=2,
                           mode=mode).matmat(vv)
    for k in range(5):
        torch.testing.assert_close(mm[:, k], op.matvec(vv[:, k]), rtol=1e-12, atol=1e-14)


def test_chunked_data_sums_to_the_full_product():
    model, p, x, y = _problem(n=25)
    op = CurvatureOperator(model_objective(model, p, (x, y)))
    v = torch.randn(3, op.n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    full = op.matvec(v)
    chunked = CurvatureOperator(model_objective(model, p, (x, y), batch_size=7)).matvec(v)
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-14)


def test_ggn_and_fisher_match_their_definitions():
    model, p, x, y = _problem(m=2, n=10, classes=3)
    first = one(p, 0)
    ggn = dense_matrix(CurvatureOperator(model_objective(model, first, (x, y)), "ggn"))[0]
    fisher = dense_matrix(CurvatureOperator(model_objective(model, first, (x, y)), "fisher"))[0]
    flat = flatten(first)[0]
    net = copy.deepcopy(model).double()

    def logits(fl):
        return functional_call(net, member(unflatten(fl[None], first), 0), (x,))

    jac = torch.autograd.functional.jacobian(logits, flat)  # (N, C, n)
    z = logits(flat)
    pr = z.softmax(-1)
    hz = torch.diag_embed(pr) - pr[:, :, None] * pr[:, None, :]  # softmax NLL Hessian in z
    ref_ggn = torch.einsum("ncp,ncd,ndq->pq", jac, hz, jac) / len(y)
    torch.testing.assert_close(ggn, ref_ggn, rtol=1e-10, atol=1e-12)
    per = torch.autograd.functional.jacobian(lambda fl: nll(logits(fl), y), flat)  # (N, n)
    torch.testing.assert_close(fisher, per.T @ per / len(y), rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(ggn).min() > -1e-12  # PSD, unlike the Hessian


def _resnet():
    model, p, x, y = _problem(widths=(2, 4, 4), m=2, n=6, classes=3, name="resnet20",
                              shape=(3, 8, 8))
    g = torch.Generator().manual_seed(5)
    bufs = {k: (v.double().unsqueeze(0).repeat(2, *[1] * v.dim()) +
                (0.1 * torch.rand(2, *v.shape, generator=g, dtype=torch.float64)
                 if v.is_floating_point() else 0))
            for k, v in model.named_buffers()}
    return model, p, x, y, bufs


def test_batchnorm_policies_match_autograd():
    model, p, x, y, bufs = _resnet()
    v = torch.randn(2, sum(t[0].numel() for t in p.values()),
                    generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for bn, mode in (("eval", "reverse"), ("batch", "reverse"), ("eval", "forward"),
                     ("batch", "forward")):
        op = CurvatureOperator(model_objective(model, p, (x, y), bufs, bn=bn), mode=mode)
        out = op.matvec(v)
        for i in range(2):
            f, flat = _flat_loss(model, p, x, y, i, bufs if bn == "eval" else None,
                                 train=bn == "batch")
            ref = torch.autograd.functional.hvp(f, flat, v[i])[1]
            torch.testing.assert_close(out[i], ref, rtol=1e-9, atol=1e-11)
    before = {k: t.clone() for k, t in bufs.items()}
    CurvatureOperator(model_objective(model, p, (x, y), bufs, bn="batch")).matvec(v)
    one = {k: t[:1] for k, t in p.items()}  # a stack of one takes the plain-autograd path
    single = CurvatureOperator(model_objective(model, one, (x, y), {k: t[:1] for k, t in
                                                                    bufs.items()}))
    full = CurvatureOperator(model_objective(model, p, (x, y), bufs)).matvec(v)
    torch.testing.assert_close(single.matvec(v[:1]), full[:1], rtol=1e-9, atol=1e-11)
    assert all(torch.equal(bufs[k], before[k]) for k in bufs)  # running stats untouched
    assert not model.training


def test_float32_parameters_give_a_float32_operator():
    model, p, x, y = _problem()
    p32 = {k: v.float() for k, v in p.items()}
    op = CurvatureOperator(model_objective(model, p32, (x, y)))
    assert op.dtype == torch.float32
    h64 = dense_matrix(CurvatureOperator(model_objective(model, p, (x, y))))
    torch.testing.assert_close(dense_matrix(op).double(), h64, rtol=1e-3, atol=1e-5)


def test_bad_inputs_raise_one_clear_error():
    model, p, x, y, bufs = _resnet()
    model.train()
    with pytest.raises(ConfigError, match="training mode but bn='eval'"):
        model_objective(model, p, (x, y), bufs)
    model.eval()
    with pytest.raises(ConfigError, match="batch_size cannot split"):
        model_objective(model, p, (x, y), bn="batch", batch_size=2)
    with pytest.raises(ConfigError, match="BatchNorm policy: .* is not one of eval, batch"):
        model_objective(model, p, (x, y), bn="frozen")
    with pytest.raises(ConfigError, match="unknown loss"):
        model_objective(model, p, (x, y), loss="mse")
    with pytest.raises(ValueError, match=f"x has {len(x)} inputs and y {len(y) - 1} labels"):
        model_objective(model, p, (x, y[1:]), bufs)  # would silently drop an input
    with pytest.raises(ConfigError, match="x has 0 inputs and y 0 labels: need as many, >= 1"):
        model_objective(model, p, (x[:0], y[:0]), bufs)  # a raw vmap error
    obj = model_objective(model, p, (x, y), bufs)
    with pytest.raises(ConfigError, match="curvature kind: .* is not one of"):
        CurvatureOperator(obj, "laplace")
    with pytest.raises(ConfigError, match="mode must be 'reverse' or 'forward'"):
        CurvatureOperator(obj, mode="sideways")
    op = CurvatureOperator(obj)
    with pytest.raises(ConfigError, match="expected vectors of shape"):
        op.matvec(torch.zeros(3, op.n, dtype=torch.float64))
    with pytest.raises(ConfigError, match="expected vectors of shape"):
        op.matmat(torch.zeros(2, op.n, dtype=torch.float64))
    bad = {k: v.clone() for k, v in p.items()}
    bad["fc.bias"][1, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match=r"NaN or infinite at member\(s\) \[1\]"):
        CurvatureOperator(model_objective(model, bad, (x, y), bufs))
    a, w = _quadratic()  # the kept-graph path checks its losses too
    w["w"][0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match=r"NaN or infinite at member\(s\) \[0\]"):
        CurvatureOperator(Objective.from_function(w, lambda q: q["w"] @ a @ q["w"] / 2))
    with pytest.raises(ConfigError, match="only a model objective"):
        _, w = _quadratic()
        Objective.from_function(w, lambda q: q["w"].sum()).restrict(torch.arange(1))


@pytest.mark.parametrize("fallback", [False, True])
def test_batched_reverse_products_equal_one_backward_per_probe(fallback, monkeypatch):
    """The kept-graph path (here a user's module with a sine, which the exact
    R-operators do not take) pushes a chunk of probes through one batched backward; it
    equals one backward per probe to float64 round-off, and so does its fallback."""
    class Sine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 5), torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.b(torch.sin(self.a(x)))

    model = Sine().double()
    _, _, x, y = _problem(classes=3)
    p = {k: v.detach()[None].repeat(3, *[1] * v.dim()) + 0.1 * torch.randn(
        3, *v.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        for i, (k, v) in enumerate(model.named_parameters())}
    obj = model_objective(model, p, (x, y))
    op = CurvatureOperator(obj, probe_chunk=2)
    assert op._mlp is None
    if fallback:
        def fail(v):
            raise RuntimeError("no batching rule")
        monkeypatch.setattr(op._kept, "batched_products", fail)
    vv = torch.randn(3, 5, op.n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mm = op.matmat(vv)
    assert op._kept.batched is (False if fallback else None)
    for k in range(5):
        torch.testing.assert_close(mm[:, k], op.matvec(vv[:, k]), rtol=1e-12, atol=1e-14)
    forward = CurvatureOperator(obj, mode="forward").matmat(vv)
    torch.testing.assert_close(mm, forward, rtol=1e-10, atol=1e-12)


def test_objectives_build_their_tensors_on_the_parameters_device():
    # "meta" stands in for CUDA: any CPU tensor meeting one raises, as on a GPU
    a, w = _quadratic(4, m=1)
    meta = {"w": w["w"].to("meta")}
    obj = Objective.from_function(meta, lambda p: p["w"] @ a.to(p["w"]) @ p["w"] / 2)
    d = {"w": torch.ones(3, 4, dtype=torch.float64, device="meta")}
    out = obj.perturbed_losses(0, d, torch.full((3,), 0.1, dtype=torch.float64))  # CPU ts
    assert out.shape == (3,) and out.device.type == "meta"
    model, p, x, y, _ = _resnet()  # the module (and its running statistics) on the CPU
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.num_batches_tracked.fill_(1)  # trained statistics: taken from the module
    obj = model_objective(model.eval(), {k: v.to("meta") for k, v in p.items()}, (x, y))
    assert {v.device.type for v in obj.buffers.values()} == {"meta"}


@pytest.mark.parametrize("m", [1, 2])
def test_a_parameter_the_forward_never_uses_has_zero_curvature(m):
    """An auxiliary head the forward skips: the kept-graph path raised torch's raw
    'appears to not have been used in the graph'; its rows and columns are 0."""
    class Aux(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = torch.nn.Linear(2, 4), torch.nn.Linear(4, 3)
            self.aux_head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.sigmoid(self.body(x)))

    model = Aux().double()
    _, _, x, y = _problem(classes=3)
    g = torch.Generator().manual_seed(2)
    p = {k: v.detach()[None] + 0.1 * torch.randn(m, *v.shape, generator=g, dtype=v.dtype)
         for k, v in model.named_parameters()}
    op = CurvatureOperator(model_objective(model, p, (x, y)))
    got = dense_matrix(op)
    vv = torch.randn(m, 3, op.n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(vv), torch.einsum("mij,mkj->mki", got, vv))
    for i in range(m):
        one = {k: t[i:i + 1] for k, t in p.items()}

        def f(flat, one=one):
            q = {k: t[0] for k, t in unflatten(flat[None], one).items()}
            return nll(functional_call(model, q, (x,)), y).mean()

        want = torch.autograd.functional.hessian(f, flatten(one)[0])
        torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-12)
    aux = slice(op.n - 10, op.n)  # aux_head's 8 weights and 2 biases come last
    assert not got[:, aux].any() and not got[:, :, aux].any()


@pytest.mark.parametrize("conv", [False, True])
def test_a_frozen_bias_left_out_of_params_is_a_constant_of_the_hessian(conv):
    """params without a frozen layer's bias: the Hessian in the others, the bias held at
    the module's value; the R-operators (MLP, traced graph) read it as none (hunt 36:
    the reverse Hessian was off by 0.26 (MLP) and 0.52 (conv) in its largest entry)."""
    model, x, y = frozen_bias_problem(conv, 12)
    p = {k: v.detach()[None] for k, v in model.named_parameters() if v.requires_grad}

    def loss(flat):
        q = unflatten(flat[None], p)
        return nll(functional_call(model, {k: v[0] for k, v in q.items()}, (x,)), y).mean()

    ref = torch.autograd.functional.hessian(loss, flatten(p)[0])
    for mode in ("reverse", "forward"):
        h = dense_matrix(CurvatureOperator(model_objective(model.eval(), p, (x, y)), mode=mode))
        torch.testing.assert_close(h[0], ref, rtol=1e-10, atol=1e-12)


def test_the_hessian_of_a_batchnorm1d_without_running_statistics():
    """Its one-input logit-count probe raised torch's "Expected more than 1 value per
    channel" (hunt 36); the batch statistics are part of the function differentiated."""
    model, x, y = batch_stats_problem(3, torch.nn.Tanh(), 10)
    p = {k: v.detach()[None] for k, v in model.named_parameters()}

    def loss(flat):
        q = unflatten(flat[None], p)
        return nll(functional_call(model, {k: v[0] for k, v in q.items()}, (x,)), y).mean()

    ref = torch.autograd.functional.hessian(loss, flatten(p)[0])
    h = dense_matrix(CurvatureOperator(model_objective(model, p, (x, y))))
    torch.testing.assert_close(h[0], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act,mode", [("tanh", "reverse"), ("tanh", "forward"),
                                      ("sigmoid", "reverse")])
def test_an_operator_is_the_curvature_where_it_was_built(act, mode):
    """The objective copies the parameters: an optimizer step on the caller's tensors
    after the operator is built leaves its products those at the old point (hunt 41: the
    MLP R-operator mixed its cached forward pass with the stepped weights and was 0.38
    off the old Hessian, 0.44 off the new one; forward mode gave the new one)."""
    model, p, x, y = _problem(widths=(5,), m=2, classes=3)
    model[1] = torch.nn.Tanh() if act == "tanh" else torch.nn.Sigmoid()  # sigmoid: kept graph
    q = {k: v.clone() for k, v in p.items()}
    op = CurvatureOperator(model_objective(model, q, (x, y)), mode=mode)
    v = torch.randn(2, op.n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before = op.matvec(v)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # an optimizer step in place
        for t in q.values():
            t.add_(0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    torch.testing.assert_close(op.matvec(v), before, rtol=1e-12, atol=1e-12)
    want = CurvatureOperator(model_objective(model, p, (x, y)), mode="forward").matvec(v)
    torch.testing.assert_close(before, want, rtol=1e-10, atol=1e-10)
