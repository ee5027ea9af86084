"""Regressions: connect's control points saved before the evaluation, the curve's L2 in the
parameters' precision, SAM stepping from theta exactly, ASAM's eta checked finite."""

import pytest
import torch
from click.testing import CliRunner

import minefield.connectivity as conn
from minefield.batches import minibatch
from minefield.cli import main
from minefield.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from minefield.connectivity import CURVE_TRAIN, ConnectConfig, fit_curves, pair_seed
from minefield.data import load_dataset
from minefield.loss import nll
from minefield.models import build_model
from minefield.sam import sam_update
from minefield.stages.connect import connect_run
from minefield.step import Batch, Hyper, train_step
from minefield.train import init_stack, make_optimizer


def test_control_points_are_saved_before_the_evaluation(tmp_path, monkeypatch):
    """README: ``connect/<tag>.safetensors`` is "written first, so an interrupted command
    resumes at the evaluation"; it was written after the evaluation, so a command killed
    while evaluating lost the trained curve."""
    root = tmp_path / "runs"
    r = CliRunner().invoke(main, ["--root", str(root), "train", "--name", "g", "--dataset",
                                  "blobs", "--widths", "6", "--members", "2", "--steps", "4",
                                  "--log-every", "4", "--checkpoint-every", "4", "--device",
                                  "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    cfg = ConnectConfig(n_points=3, train=CURVE_TRAIN.replace(steps=5))
    fits = []
    real_fit = conn.fit_curves
    monkeypatch.setattr(conn, "fit_curves", lambda *a, **k: fits.append(1) or real_fit(*a, **k))

    def killed(*a, **k):
        raise KeyboardInterrupt

    real_eval = conn.evaluate_curves
    monkeypatch.setattr(conn, "evaluate_curves", killed)
    with pytest.raises(KeyboardInterrupt):
        connect_run("g", "g", cfg, member_b=1, root=root, device="cpu")
    assert (root / "g" / "connect" / "default.safetensors").is_file()
    assert not (root / "g" / "connect" / "default.json").exists()
    monkeypatch.setattr(conn, "evaluate_curves", real_eval)
    res = connect_run("g", "g", cfg, member_b=1, root=root, device="cpu")  # resumes
    assert len(fits) == 1  # the curve was not trained again
    fresh = connect_run("g", "g", cfg, member_b=1, root=root, device="cpu", force=True,
                        tag="fresh")
    for k in res.result.curve:
        assert torch.equal(res.result.curve[k], fresh.result.curve[k]), k


def test_the_curve_l2_is_in_the_parameters_precision():
    """fit_curves held l2 as float32 (torch.full's default dtype): a float64 curve trained
    with l2 = 0.03 used 0.029999999329..., 1e-9 away from the same training by hand."""
    dt = torch.float64
    data = load_dataset(DataConfig("blobs", n_train=40, n_test=20)).to("cpu", dt)
    model = build_model(ModelConfig(widths=(6,)), (2,), 2).to(dt)
    p = {k: v.to(dt) for k, v in init_stack(model, "glorot_uniform", [0, 1]).items()}
    a, b = {k: v[:1] for k, v in p.items()}, {k: v[1:] for k, v in p.items()}
    l2 = 0.03
    cfg = CURVE_TRAIN.replace(lr=0.05, steps=20, batch_size=16, l2=l2)
    c = fit_curves(model, a, b, data, cfg)
    hand = {k: ((a[k][0] + b[k][0]) / 2).clone().requires_grad_() for k in a}
    opt = torch.optim.Adam(list(hand.values()), lr=cfg.lr)
    gen = torch.Generator().manual_seed(pair_seed(a, b, cfg.seed))
    for step in range(cfg.steps):
        t = torch.rand(1, generator=gen, dtype=dt).item()
        batch = minibatch(data, cfg.seed, step, 16, 0, None)
        pt = {k: (1 - t) ** 2 * a[k][0] + 2 * t * (1 - t) * hand[k] + t * t * b[k][0]
              for k in a}
        out = torch.func.functional_call(model, pt, (batch.x,))
        loss = nll(out, batch.y).mean() + l2 * sum(v.pow(2).sum() for v in pt.values()
                                                   if v.dim() >= 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k in a:
        torch.testing.assert_close(c[k][0], hand[k].detach(), rtol=0, atol=1e-13)


def test_sam_steps_from_theta_itself():
    """The ascent added eps to the weights and subtracted it again: (w + eps) - eps is not
    w in floating point, so the optimizer stepped from a point 1 ulp away from theta."""
    data = load_dataset(DataConfig("swissroll", n_train=100, n_test=20))
    model = build_model(ModelConfig(widths=(16, 16)), (2,), 2)
    leaves = {k: v.clone().requires_grad_() for k, v in
              init_stack(model, "glorot_uniform", [0, 1]).items()}
    before = {k: v.detach().clone() for k, v in leaves.items()}
    opt = make_optimizer(TrainConfig(optimizer="sgd", lr=1e-30, momentum=0.0),
                         list(leaves.values()))  # a step too small to change a weight
    hyper = Hyper(beta=torch.zeros(2), rho=torch.tensor([0.5, 2.0], dtype=torch.float64))
    for kind, m in (("sam", None), ("asam", None), ("sam", 30)):
        train_step(model, leaves, {}, opt, Batch(data.x_train, data.y_train), hyper,
                   update=sam_update(kind, m))
        for k, v in leaves.items():
            w = before[k]
            moved = (v.detach() - w).abs()
            # only what the step itself adds (lr * grad, ~1e-30) may change a weight
            assert bool((moved <= 1e-25).all()), (kind, m, k, moved.max().item())


def test_asam_eta_must_be_finite():
    """sam_update("asam", eta=inf) was accepted: T = inf made eps NaN for every member,
    rho = 0 ones included (0 * inf), and training 'diverged'."""
    with pytest.raises(ConfigError, match="asam_eta must be >= 0 and finite"):
        sam_update("asam", eta=float("inf"))
    with pytest.raises(ConfigError, match="asam_eta must be >= 0 and finite"):
        sam_update("asam", eta=float("nan"))


@pytest.mark.parametrize("field,values", [("sam", {"sam": "sam", "rho": 0.1}),
                                          ("sam", {"sam": "asam", "rho": 0.5, "sam_m": 8}),
                                          ("fit_first", {"fit_first": 10}),
                                          ("poison_batch_size", {"poison_batch_size": 4})])
def test_curve_training_refuses_settings_it_would_ignore(field, values):
    """ConnectConfig.train took SAM, fit_first and poison_batch_size, and fit_curves
    trained the plain loss on every training point without saying so."""
    with pytest.raises(ConfigError, match=f"connect.train: .*{field}.* do not apply"):
        ConnectConfig(train=CURVE_TRAIN.replace(**values))
    ConnectConfig(train=CURVE_TRAIN.replace(lr=0.02))  # what it uses is accepted
