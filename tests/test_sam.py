"""SAM, ASAM and m-SAM in the stacked trainer, against single-model hand-written steps."""

import pytest
import torch
from torch import nn

from minefield.batches import minibatch
from minefield.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from minefield.data import load_dataset
from minefield.functional import buffers_like
from minefield.loss import complement_nll, nll
from minefield.models import build_model
from minefield.sam import sam_perturbation, sam_update
from minefield.train import fit, init_stack

RHOS = [0.0, 0.02, 0.1]
BETAS = [0.0, 0.3, 0.5]


def _problem(m=3, dtype=torch.float64, n_poison=40):
    data = load_dataset(DataConfig("blobs", n_train=40, n_test=40, n_poison=n_poison)).to(
        "cpu", dtype)
    model = build_model(ModelConfig(widths=(6,)), (2,), 2).to(dtype)
    params = {k: v.to(dtype) for k, v in init_stack(model, "glorot_uniform", range(m)).items()}
    return model, params, data


def _torch_opt(cfg, leaves):
    if cfg.optimizer.value == "sgd":
        return torch.optim.SGD(leaves, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(leaves, lr=cfg.lr)


def _hand_parts(batch, m):
    """The m-SAM parts, written out: ranges of training and poison points, sizes differing
    by at most one, larger parts first."""
    nt, npz = batch.n_train, len(batch.x) - batch.n_train
    if m is None:
        return [(range(nt), range(npz))]
    k = -(-nt // m)
    out, at, ap = [], 0, 0
    for j in range(k):
        st, sp = nt // k + (j < nt % k), npz // k + (j < npz % k)
        out.append((range(at, at + st), range(ap, ap + sp)))
        at, ap = at + st, ap + sp
    return out


def _hand_run(model, theta, data, cfg, beta, rho, kind, m=None, eta=0.01):
    """One model, plain autograd and torch.optim: the SAM family as the papers write it,
    the batch loss a sum over points ``sum_i c_i l_i`` (``c_i = (1 - beta) / n_t`` on a
    training point, ``beta / n_p`` on a poison point) that the m-SAM parts split."""
    theta = {k: v.clone().requires_grad_() for k, v in theta.items()}
    leaves = list(theta.values())
    opt = _torch_opt(cfg, leaves)
    beta = float(torch.tensor(beta, dtype=torch.float32))  # fit keeps betas in float32
    bs = cfg.batch_size
    bs_p = -(-len(data.y_poison) * bs // len(data.y_train)) if beta > 0 else 0

    def grad(p, b, tr, po):
        out = torch.func.functional_call(model, {k: v[0] for k, v in p.items()}, (b.x,))
        nt, npz = b.n_train, len(b.x) - b.n_train
        loss = (1 - beta) / nt * nll(out[list(tr)], b.y[list(tr)]).sum()
        if po:
            pts = [nt + i for i in po]
            loss = loss + beta / npz * complement_nll(out[pts], b.y_poison[list(po)]).sum()
        return torch.autograd.grad(loss, list(p.values()))

    for step in range(cfg.steps):
        opt.param_groups[0]["lr"] = cfg.lr_at(step)
        batch = minibatch(data, cfg.seed, step, bs, bs_p, None)
        total = [torch.zeros_like(v) for v in leaves]
        for tr, po in _hand_parts(batch, m):
            g = grad(theta, batch, tr, po)
            t = [(v.detach().abs() + eta) if kind == "asam" else torch.ones_like(v)
                 for v in leaves]
            norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
            shifted = {k: (v + rho * ti * ti * gi / (norm + 1e-12)).detach().requires_grad_()
                       for (k, v), ti, gi in zip(theta.items(), t, g)}
            for acc, h in zip(total, grad(shifted, batch, tr, po)):
                acc += h
        if rho == 0:
            total = grad(theta, batch, range(batch.n_train), range(len(batch.x) - batch.n_train))
        for v, g in zip(leaves, total):
            v.grad = g
        opt.step()
    return theta


def _compare(kind, optimizer, m=None, n_poison=40):
    model, params, data = _problem(n_poison=n_poison)
    cfg = TrainConfig(optimizer=optimizer, lr=0.05, steps=8, log_every=8, batch_size=16,
                      milestones=(5,), sam=kind, rho=0.05, sam_m=m)
    res = fit(model, params, data, cfg, torch.tensor(BETAS), rhos=RHOS)
    for i in range(3):
        hand = _hand_run(model, {k: v[i:i + 1] for k, v in params.items()}, data, cfg,
                         BETAS[i], RHOS[i], kind, m)
        for k in params:
            torch.testing.assert_close(res.params[k][i:i + 1], hand[k].detach(), rtol=1e-9,
                                       atol=1e-12)
    return res


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("kind", ["sam", "asam"])
def test_stacked_sam_equals_single_model_hand_written_steps(kind, optimizer):
    _compare(kind, optimizer)


@pytest.mark.parametrize("kind", ["sam", "asam"])
def test_m_sam_equals_a_hand_loop_over_parts(kind):
    _compare(kind, "sgd", m=5)   # 16 points -> parts of 4; poison 16 -> 4 each
    # poison not in proportion: 16 points -> parts 3,3,3,3,2,2; poison 4 -> 1,1,1,1,0,0
    _compare(kind, "sgd", m=3, n_poison=10)


def test_rho_zero_is_the_base_optimizer_bit_for_bit():
    model, params, data = _problem(2, torch.float32)
    base = TrainConfig(optimizer="rmsprop", lr=0.01, steps=12, log_every=12, batch_size=16,
                       clip_norm=2.0)
    plain = fit(model, params, data, base, torch.tensor([0.0, 0.4]))
    for kind, m in [("sam", None), ("asam", None), ("sam", 5)]:
        zero = fit(model, params, data, base.replace(sam=kind, sam_m=m),
                   torch.tensor([0.0, 0.4]))
        mixed = fit(model, params, data, base.replace(sam=kind, sam_m=m, rho=0.05),
                    torch.tensor([0.0, 0.4]), rhos=[0.0, 0.05])
        for k in params:
            assert torch.equal(zero.params[k], plain.params[k])
            assert torch.equal(mixed.params[k][0], plain.params[k][0])
            assert not torch.equal(mixed.params[k][1], plain.params[k][1])


def test_asam_perturbation_is_the_formula():
    g = torch.Generator().manual_seed(3)
    w = [torch.randn(2, 4, 3, generator=g, dtype=torch.float64),
         torch.randn(2, 4, generator=g, dtype=torch.float64)]
    gr = [torch.randn(v.shape, generator=g, dtype=torch.float64) for v in w]
    rho = torch.tensor([0.1, 0.3], dtype=torch.float64)
    eps = sam_perturbation(w, gr, rho, "asam", eta=0.2)
    for i in range(2):
        t = torch.cat([(v[i].abs() + 0.2).reshape(-1) for v in w])
        gi = torch.cat([x[i].reshape(-1) for x in gr])
        want = rho[i] * t * t * gi / (t * gi).norm()
        got = torch.cat([e[i].reshape(-1) for e in eps])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
        # the radius in ASAM's own norm ||T^-1 eps|| is rho
        torch.testing.assert_close((got / t).norm(), rho[i], rtol=1e-12, atol=0)


def test_batchnorm_running_stats_come_from_the_pass_at_theta():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 1))
    _, _, data = _problem(1, torch.float32)
    params = {k: v.detach().unsqueeze(0).clone() for k, v in model.named_parameters()}
    cfg = TrainConfig(optimizer="sgd", lr=0.1, steps=1, log_every=1)
    plain = fit(model, params, data, cfg, buffers=buffers_like(model, 1, "cpu"))
    sam = fit(model, params, data, cfg.replace(sam="sam", rho=0.5),
              buffers=buffers_like(model, 1, "cpu"))
    for k in plain.buffers:
        assert torch.equal(plain.buffers[k], sam.buffers[k])
    assert not torch.equal(plain.params["0.weight"], sam.params["0.weight"])


def test_bad_input_raises():
    with pytest.raises(ConfigError, match="sam_m must be >= 1"):
        sam_update("sam", m=0)
    with pytest.raises(ConfigError, match="asam_eta must be >= 0"):
        sam_update("asam", eta=-1.0)
    with pytest.raises(ConfigError, match="'adam' is not one of none, sam, asam"):
        sam_update("adam")
    with pytest.raises(ConfigError, match="need train.sam = sam or asam"):
        TrainConfig(rho=0.1)
    with pytest.raises(ConfigError, match="need train.sam = sam or asam"):
        TrainConfig(sam_m=8)
    with pytest.raises(ConfigError, match="train.sam_m must be >= 1"):
        TrainConfig(sam="sam", sam_m=0)
    with pytest.raises(ConfigError, match="train.rho"):
        TrainConfig(sam="sam", rho=-0.1)
    with pytest.raises(ConfigError, match="train.asam_eta"):
        TrainConfig(sam="asam", asam_eta=float("nan"))
    with pytest.raises(ConfigError, match="train.asam_eta is ASAM's .* sam = sam"):
        TrainConfig(sam="sam", rho=0.1, asam_eta=0.5)  # was accepted and had no effect
    with pytest.raises(ConfigError, match="train.sam: 'big' is not one of"):
        TrainConfig(sam="big")


def test_cli_train_with_sam_and_its_errors(tmp_path):
    import json

    from click.testing import CliRunner

    from minefield.cli import main

    tiny = ["--dataset", "blobs", "--widths", "8", "--steps", "6", "--log-every", "3",
            "--checkpoint-every", "3", "--device", "cpu", "--quiet"]
    root = tmp_path / "runs"

    def cli(*args):
        return CliRunner().invoke(main, ["--root", str(root), "train", *args, *tiny])

    r = cli("--name", "s", "--sam", "asam", "--rho", "0.5", "--sam-m", "10", "--asam-eta", "0.1")
    assert r.exit_code == 0, r.output
    train = json.loads((root / "s" / "config.json").read_text())["train"]
    assert (train["sam"], train["rho"], train["sam_m"], train["asam_eta"]) == (
        "asam", 0.5, 10, 0.1)
    for bad, msg in [(["--rho", "0.1"], "need train.sam = sam or asam"),
                     (["--sam", "sam", "--rho", "-1"], "train.rho"),
                     (["--sam", "sharp"], "'sharp' is not one of"),
                     (["--sam", "sam", "--sam-m", "0"], "0 is not in the range")]:
        r = cli("--name", "bad", *bad)
        assert r.exit_code != 0 and msg in r.output, r.output
        assert "Traceback" not in r.output and not (root / "bad").exists()
