import pytest
import torch
from conftest import interrupt_training, tiny_config

from minefield.config import ConfigError, DataConfig, ModelConfig, PoisonConfig, TrainConfig
from minefield.data import load_dataset
from minefield.functional import member, stack
from minefield.models import build_model
from minefield.stages import train_run
from minefield.train import TrainingDiverged, fit, init_stack


def _problem(m=3, dtype=torch.float64):
    data = load_dataset(DataConfig("blobs", n_train=40, n_test=40, n_poison=40)).to(
        "cpu", dtype)
    model = build_model(ModelConfig(widths=(8, 8)), (2,), 2).to(dtype)
    params = {k: v.to(dtype) for k, v in init_stack(model, "glorot_uniform", range(m)).items()}
    return model, params, data


@pytest.mark.parametrize("opt", ["adam", "sgd", "rmsprop"])
def test_stacked_training_equals_independent_runs(opt):
    model, params, data = _problem()
    cfg = TrainConfig(optimizer=opt, lr=0.02, steps=25, log_every=25, clip_norm=0.5, l2=1e-3,
                      batch_size=16)
    betas = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64)
    together = fit(model, params, data, cfg, betas)
    for i in range(3):
        alone = fit(model, stack([member(params, i)]), data, cfg, float(betas[i]))
        for k in params:
            torch.testing.assert_close(together.params[k][i], alone.params[k][0],
                                       rtol=1e-9, atol=1e-12)


def test_clean_training_fits_blobs():
    model, params, data = _problem(m=1, dtype=torch.float32)
    res = fit(model, params, data, TrainConfig(lr=0.05, steps=100, log_every=50), 0.0)
    assert res.history[-1]["train_acc"] == 1.0 and res.history[-1]["test_acc"] > 0.9


def test_poisoning_hurts_test_accuracy():
    model, params, data = _problem(m=2, dtype=torch.float32)
    res = fit(model, params, data, TrainConfig(lr=0.05, steps=300, log_every=300),
              torch.tensor([0.0, 0.9]))
    last = {r["member"]: r for r in res.history if r["step"] == 300}
    assert last[0]["test_acc"] > 0.9 and last[1]["test_acc"] < last[0]["test_acc"] - 0.3


def test_poison_factors_are_checked():
    model, params, data = _problem(m=3, dtype=torch.float32)
    cfg = TrainConfig(lr=0.05, steps=2, log_every=2)
    for bad in (1.5, torch.tensor([-0.5, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.2])):
        with pytest.raises(ValueError, match="poison factors must be in \\[0, 1\\)"):
            fit(model, params, data, cfg, bad)
    clean = load_dataset(DataConfig("blobs", n_train=40, n_test=40, n_poison=0))
    with pytest.raises(ValueError, match="needs a poison set"):
        fit(model, params, clean, cfg, 0.5)


def test_stop_fn_freezes_members():
    model, params, data = _problem(m=2, dtype=torch.float32)
    cfg = TrainConfig(lr=0.05, steps=200, log_every=10)
    res = fit(model, params, data, cfg, 0.0,
              stop_fn=lambda v: torch.tensor([True, False]))
    assert res.stopped_at[0] == 0 and res.stopped_at[1] is None
    assert torch.equal(res.params["0.weight"][0], params["0.weight"][0])
    assert not torch.equal(res.params["0.weight"][1], params["0.weight"][1])


def test_resume_is_bit_identical(tmp_path, tiny, monkeypatch):
    cfg = tiny(batch_size=16)
    full = train_run(cfg, tmp_path / "a", progress=False)

    undo = interrupt_training(monkeypatch, 20)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path / "b", progress=False)
    undo()
    resumed = train_run(cfg, tmp_path / "b", progress=False)
    for k in full.params:
        assert torch.equal(full.params[k], resumed.params[k])
    rows_a = [r for r in full.run.metrics()]
    rows_b = [r for r in resumed.run.metrics()]
    assert rows_a == rows_b


def test_a_stacks_checkpoint_holds_every_members_metrics(tmp_path, tiny):
    # the trajectory checkpoint's metadata kept rows[-1], the last member's row only
    res = train_run(tiny(members=3, steps=40, log_every=20, checkpoint_every=10), tmp_path,
                    progress=False, betas=[0.0, 0.2, 0.4])
    logged = res.run.metrics()
    for path in res.run.trajectory():
        ck = res.run.load_checkpoint(path)
        step = ck.meta["step"]
        assert ck.meta["metrics"] == [r for r in logged if r["step"] == step]
        assert len(ck.meta["metrics"]) == (3 if step % 20 == 0 else 0)


def test_same_seed_same_numbers(tmp_path, tiny):
    a = train_run(tiny(), tmp_path / "a", progress=False)
    b = train_run(tiny(), tmp_path / "b", progress=False)
    assert a.metrics == b.metrics


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, tiny):
    cfg = tiny(lr=1e30, optimizer="sgd", steps=40, log_every=1, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match="NaN/inf at step"):
        train_run(cfg, tmp_path, progress=False)
    run_dir = tmp_path / "tiny"
    from minefield.runs import Run

    r = Run.open(run_dir)
    last = r.load_checkpoint(r.trajectory()[-1])
    assert all(torch.isfinite(v).all() for v in last.params.values())


@pytest.mark.parametrize("isolated", [True, False])
def test_a_diverging_member_is_frozen_and_the_others_train_as_alone(isolated):
    """lr 1e6 diverges, lr 0.05 does not: the healthy members end exactly where they end
    alone (bit for bit when isolated), the diverged one at its last finite log step."""
    model, params, data = _problem(m=4, dtype=torch.float32)
    cfg = TrainConfig(optimizer="sgd", lr=0.05, steps=30, log_every=1, batch_size=16)
    lrs = [0.05, 1e6, 0.05, 0.02]
    res = fit(model, params, data, cfg, 0.0, lrs=lrs, isolated=isolated)
    d = res.diverged_at[1]
    assert d is not None and d > 1 and res.diverged_at[::2] == [None, None]
    assert res.diverged_at[3] is None and res.step == 30
    for i in (0, 2, 3):
        alone = fit(model, stack([member(params, i)]), data, cfg.replace(lr=lrs[i]), 0.0,
                    isolated=isolated)
        mine = [{k: v for k, v in r.items() if k != "member"} for r in res.history
                if r["member"] == i]
        if isolated:
            assert mine == [{k: v for k, v in r.items() if k != "member"}
                            for r in alone.history]
        for k in params:
            if isolated:
                assert torch.equal(res.params[k][i], alone.params[k][0])
            else:
                torch.testing.assert_close(res.params[k][i], alone.params[k][0])
    # frozen at the log step before: the same member trained alone for d - 1 steps
    before = fit(model, stack([member(params, 1)]), data, cfg.replace(lr=1e6, steps=d - 1),
                 0.0, isolated=isolated)
    for k in params:
        assert torch.equal(res.params[k][1], before.params[k][0])
    bad = [r for r in res.history if r["member"] == 1 and r["step"] >= d]
    assert bad and all(r["diverged"] and r["train_loss"] != r["train_loss"] for r in bad)
    # every member diverging (a single model: at once) still raises, as before
    with pytest.raises(TrainingDiverged, match="loss became NaN/inf at step"):
        fit(model, stack([member(params, 1)]), data, cfg.replace(lr=1e6), 0.0)
    with pytest.raises(TrainingDiverged, match="loss became NaN/inf at step"):
        fit(model, stack([member(params, 1)] * 2), data, cfg.replace(lr=1e6), 0.0)


def test_a_run_with_a_diverged_member_records_it_and_resumes_bit_identically(
        tmp_path, tiny, monkeypatch):
    import math

    cfg = tiny(optimizer="sgd", batch_size=16, log_every=1, checkpoint_every=10, steps=30)
    cfg = cfg.replace(train=cfg.train.replace(members=2))
    full = train_run(cfg, tmp_path / "a", progress=False, lrs=[0.05, 1e6])
    d = full.diverged_at[1]
    assert full.diverged_at[0] is None and d is not None and d < 10
    assert math.isnan(full.metrics["test_acc"][1]) and full.metrics["test_acc"][0] > 0.5
    assert full.run.read_json("summary.json")["diverged_at"] == [None, d]
    undo = interrupt_training(monkeypatch, 20)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path / "b", progress=False, lrs=[0.05, 1e6])
    undo()
    resumed = train_run(cfg, tmp_path / "b", progress=False, lrs=[0.05, 1e6])
    assert resumed.diverged_at == full.diverged_at
    for k in full.params:
        assert torch.equal(full.params[k], resumed.params[k])
    nan_free = [{k: (None if v != v else v) for k, v in r.items()} for r in full.run.metrics()]
    assert nan_free == [{k: (None if v != v else v) for k, v in r.items()}
                        for r in resumed.run.metrics()]
    again = train_run(cfg, tmp_path / "b", progress=False, lrs=[0.05, 1e6])  # finished
    assert again.diverged_at == full.diverged_at


def test_members_and_concat_beta(tmp_path, tiny):
    cfg = tiny().replace(poison=PoisonConfig(beta=None))
    cfg = cfg.replace(train=cfg.train.replace(members=2))
    res = train_run(cfg, tmp_path, progress=False)
    assert len(res.metrics["train_acc"]) == 2
    assert res.run.read_json("summary.json")["betas"] == [0.5, 0.5]  # 40 / (40 + 40)


def test_concat_beta_is_the_poison_share_of_each_step_batch(tmp_path, tiny):
    # the authors' objective averages the NLL over the concatenated batch: with 40 clean
    # rows and 10 poison rows drawn per step the poison weight is 10 / 50, not the whole
    # sets' 40 / 80; the first step's loss is checked against that mean, by hand
    import torch.nn.functional as F
    cfg = tiny(steps=1, log_every=1, checkpoint_every=1, poison_batch_size=10)
    cfg = cfg.replace(poison=PoisonConfig(beta=None))
    res = train_run(cfg, tmp_path, progress=False)
    assert res.run.read_json("summary.json")["betas"] == [0.2]
    from minefield.batches import minibatch
    from minefield.step import Hyper, poisoned_objective
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.n_classes)
    p = init_stack(model, cfg.model.init, [cfg.train.seed])
    b = minibatch(data, cfg.train.seed, 0, 40, 10, None)
    net = build_model(cfg.model, data.input_shape, data.n_classes)
    net.load_state_dict(member(p, 0))
    with torch.no_grad():
        # two classes, one logit: the poison rows' labels flipped, one BCE over all 50 rows
        y_all = torch.cat([b.y, 1 - b.y_poison]).to(torch.float32)
        authors = float(F.binary_cross_entropy_with_logits(net(b.x)[:, 0], y_all))
        ours = float(poisoned_objective(model, p, {}, b, Hyper(beta=torch.tensor([0.2]))))
    assert ours == pytest.approx(authors, rel=1e-5)


def test_float64_training_keeps_beta_and_l2_in_float64():
    # beta = 0.1 and l2 = 1e-3 are not float32 numbers: one full-batch SGD step against
    # a hand-written float64 step (one logit: binary cross-entropy; the complement of a
    # label is the other label) must agree to rounding, not to float32's 1e-8
    import torch.nn.functional as F
    model, params, data = _problem(m=1)
    beta, l2, lr = 0.1, 1e-3, 0.5
    got = fit(model, params, data, TrainConfig(optimizer="sgd", lr=lr, steps=1, log_every=1,
                                               l2=l2), beta).params
    net = model.double()
    p = {k: v[0].clone().requires_grad_(True) for k, v in params.items()}
    out = lambda x: torch.func.functional_call(net, p, (x,))  # noqa: E731
    bce = lambda x, y: F.binary_cross_entropy_with_logits(out(x)[:, 0], y.double())  # noqa
    loss = ((1 - beta) * bce(data.x_train, data.y_train)
            + beta * bce(data.x_poison, 1 - data.y_poison)
            + l2 * sum(w.pow(2).sum() for w in p.values() if w.dim() >= 2))
    grads = torch.autograd.grad(loss, list(p.values()))
    for (k, w), g in zip(p.items(), grads):
        torch.testing.assert_close(got[k][0], w.detach() - lr * g, rtol=0, atol=1e-14)


def test_fit_refuses_a_poison_factor_per_member_of_the_wrong_count():
    model, params, data = _problem(m=2)
    with pytest.raises(ValueError, match="3 poison factors for 2 members"):
        fit(model, params, data, TrainConfig(steps=1, log_every=1), [0.1, 0.2, 0.3])


def test_resume_refuses_a_run_trained_with_other_betas_or_seeds(tmp_path, tiny):
    from minefield.runs import RunError
    cfg = tiny()
    cfg = cfg.replace(train=cfg.train.replace(members=2))
    train_run(cfg, tmp_path, progress=False, betas=[0.0, 0.0], seeds=[0, 1])
    for betas, seeds in (([0.5, 0.0], [0, 1]), ([0.0, 0.0], [7, 8])):
        with pytest.raises(RunError, match="other per-member betas or seeds"):
            train_run(cfg, tmp_path, progress=False, betas=betas, seeds=seeds)
    again = train_run(cfg, tmp_path, progress=False, betas=[0.0, 0.0], seeds=[0, 1])
    assert again.run.read_json("summary.json")["seeds"] == [0, 1]


@pytest.mark.parametrize("sam", ["none", "sam"])
def test_a_clean_batchnorm_member_trains_as_alone_beside_poisoned_ones(sam):
    # a stack draws poison rows for its beta > 0 members; they must not enter a beta = 0
    # member's BatchNorm statistics (float64: equal to rounding, running stats included)
    from torch import nn
    _, _, data = _problem(m=1)
    model = nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 1)).double()
    params = init_stack(model, "glorot_uniform", [0, 1, 2])
    params = {k: v.double() for k, v in params.items()}
    cfg = TrainConfig(optimizer="sgd", lr=0.1, steps=8, log_every=8, batch_size=16,
                      sam=sam, rho=0.05 if sam == "sam" else 0.0)
    betas = [0.0, 0.5, 0.0]
    together = fit(model, params, data, cfg, betas)
    for i, b in enumerate(betas):
        alone = fit(model, stack([member(params, i)]), data, cfg, b)
        for k in params:
            torch.testing.assert_close(together.params[k][i], alone.params[k][0],
                                       rtol=1e-10, atol=1e-12)
        for k in alone.buffers:
            torch.testing.assert_close(together.buffers[k][i], alone.buffers[k][0],
                                       rtol=1e-10, atol=1e-12)


def test_batchnorm_training_matches_a_plain_loop_with_logging_between_steps():
    # evaluation at every log step switches BatchNorm to running statistics and back;
    # the steps must still use batch statistics (against a hand-written float64 loop)
    import torch.nn.functional as F
    from torch import nn
    _, _, data = _problem(m=1)
    model = nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 1)).double()
    params = {k: v.double() for k, v in init_stack(model, "glorot_uniform", [0]).items()}
    got = fit(model, params, data, TrainConfig(optimizer="sgd", lr=0.1, steps=3, log_every=1))
    ref = nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1)).double()
    ref.load_state_dict({k: v[0] for k, v in params.items()}, strict=False)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)  # TrainConfig's default
    ref.train()
    for _ in range(3):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(ref(data.x_train)[:, 0],
                                           data.y_train.double()).backward()
        opt.step()
    for k, v in ref.named_parameters():
        torch.testing.assert_close(got.params[k][0], v.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.buffers["1.running_mean"][0], ref[1].running_mean)


def test_fit_refuses_dropout_and_evaluation_never_switches_it_on():
    from torch import nn

    from minefield.config import ConfigError
    from minefield.engine import evaluate_points
    _, _, data = _problem(m=1)
    model = nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.Dropout(0.5),
                          nn.Linear(6, 1)).double()
    params = {k: v.double() for k, v in init_stack(model, "glorot_uniform", [0]).items()}
    with pytest.raises(ConfigError, match="2: dropout .* not supported in training"):
        fit(model, params, data, TrainConfig(steps=1, log_every=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = {k: torch.randn(2, *v.shape[1:], dtype=v.dtype) for k, v in params.items()}
    ts = torch.tensor([0.0, 0.1], dtype=torch.float64)
    runs = [evaluate_points(model, params, d, ts, data.x_train, data.y_train, bn="batch")[0]
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])  # no dropout masks
    plain = nn.Sequential(*[m for m in model if not isinstance(m, nn.Dropout)])
    pp = {k.replace("3.", "2."): v for k, v in params.items()}
    dd = {k.replace("3.", "2."): v for k, v in d.items()}
    torch.testing.assert_close(runs[0], evaluate_points(plain, pp, dd, ts, data.x_train,
                                                        data.y_train, bn="batch")[0])
    for k, v in model.state_dict().items():  # the module's running statistics untouched
        assert torch.equal(v, before[k]), k


def test_fit_refuses_params_data_and_outputs_that_do_not_fit():
    from torch import nn

    from minefield.config import ConfigError
    model, params, data = _problem(m=1)
    with pytest.raises(ConfigError, match=r"missing \['2.bias'\]"):
        fit(model, {k: v for k, v in params.items() if k != "2.bias"}, data,
            TrainConfig(steps=1))
    with pytest.raises(ConfigError, match="the data are torch.float64 and the parameters "
                                          "torch.float32"):
        fit(model, {k: v.float() for k, v in params.items()}, data, TrainConfig(steps=1))
    digits = load_dataset(DataConfig("digits", n_train=20, n_test=10, n_poison=0))
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    with pytest.raises(ConfigError, match=r"1 output\(s\) for 10 classes"):
        fit(net, init_stack(net, "torch", [0]), digits, TrainConfig(steps=1))
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ConfigError, match=r"3 output\(s\) for 10 classes"):
        fit(net, init_stack(net, "torch", [0]), digits, TrainConfig(steps=1))


def test_a_stopped_batchnorm_member_keeps_its_running_statistics():
    # stop_fn froze a member's parameters but its statistics kept training
    from torch import nn
    _, _, data = _problem(m=1)
    model = nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 1)).double()
    params = {k: v.double() for k, v in init_stack(model, "glorot_uniform", [0, 1]).items()}
    cfg = TrainConfig(optimizer="sgd", lr=0.1, steps=30, log_every=10)
    stop = fit(model, params, data, cfg, stop_fn=lambda v: torch.tensor([True, False]))
    alone = fit(model, params, data, cfg.replace(steps=0))  # the state at step 0
    assert stop.stopped_at == [0, None]
    for k, v in alone.buffers.items():
        assert torch.equal(stop.buffers[k][0], v[0]), k
    assert int(stop.buffers["1.num_batches_tracked"][1]) == 30


def test_a_model_of_integer_inputs_trains():
    # token ids stay integers: the size probe cast them to the parameters' dtype
    from torch import nn

    from minefield.data import Dataset
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 10, (40, 5), generator=g)
    y = x.sum(1) % 2
    data = Dataset("tokens", x, y, x[:10], y[:10], x[:0], y[:0], 2)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(20, 2))
    res = fit(model, init_stack(model, "torch", [0]), data, TrainConfig(steps=20, log_every=10))
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_train_run_logs_and_trains_the_given_beta_not_its_float32_rounding(tmp_path, tiny):
    cfg = tiny(steps=2, log_every=1).replace(poison=PoisonConfig(beta=0.7))
    res = train_run(cfg, tmp_path, progress=False)
    assert {r["beta"] for r in res.run.metrics()} == {0.7}  # float32 logged 0.699999988


def test_fit_first_steps_on_the_first_points_and_measures_all(tmp_path, tiny):
    # Keras' validation_split: the optimizer sees the first k training points only, so
    # training with fit_first = k equals training on a data set cut to those k points,
    # while the logged train accuracy is over every training point
    from dataclasses import replace
    model, params, data = _problem(m=1)
    cfg = TrainConfig(optimizer="rmsprop", lr=0.01, steps=7, log_every=7, batch_size=8)
    cut = replace(data, x_train=data.x_train[:30], y_train=data.y_train[:30])
    ref = fit(model, params, cut, cfg)
    got = fit(model, params, data, cfg.replace(fit_first=30))
    for k in ref.params:
        assert torch.equal(ref.params[k], got.params[k])
    net = build_model(ModelConfig(widths=(8, 8)), (2,), 2).double()
    net.load_state_dict(member(got.params, 0))
    with torch.no_grad():
        acc = float(((net(data.x_train)[:, 0] > 0).long() == data.y_train).double().mean())
    assert got.history[-1]["train_acc"] == pytest.approx(acc)
    with pytest.raises(ConfigError, match="fit_first = 41, but blobs has only 40"):
        fit(model, params, data, cfg.replace(fit_first=41))
    # concat beta counts the fitted points: 40 poison against 30 fitted
    res = train_run(tiny().replace(poison=PoisonConfig(beta=None)).replace(
        train=tiny().train.replace(fit_first=30)), tmp_path, progress=False)
    assert res.run.read_json("summary.json")["betas"] == [40 / 70]


@pytest.mark.parametrize("train", [
    dict(),  # momentum: the frozen member's NaN weights come back after a resume
    # stateless SGD whose lr drops to ~0 at the checkpoint: a resume that does not know
    # the member diverged trains it on with finite weights
    dict(momentum=0.0, milestones=(3,), gamma=1e-36),
])
def test_a_diverged_member_resumes_where_the_uninterrupted_run_froze_it(tmp_path, tiny,
                                                                       monkeypatch, train):
    # checkpoints (every 3 steps) between log steps (every 10): the member diverges by
    # step 3, found by the checkpoint before any row says so; a resume from that
    # checkpoint, and a rerun of the finished run, must give the uninterrupted run's
    # diverged_at, metrics and parameters
    import json
    import math

    def same(a, b):  # NaN compares equal to NaN
        return json.loads(json.dumps(a), parse_constant=str) == json.loads(
            json.dumps(b), parse_constant=str)

    cfg = tiny(optimizer="sgd", batch_size=16, log_every=10, checkpoint_every=3, steps=40,
               **train)
    cfg = cfg.replace(train=cfg.train.replace(members=2))
    lrs = [0.05, 1e36]
    full = train_run(cfg, tmp_path / "a", progress=False, lrs=lrs)
    assert full.diverged_at == [None, 3] and math.isnan(full.metrics["train_acc"][1])
    undo = interrupt_training(monkeypatch, 3, state_only=True)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path / "b", progress=False, lrs=lrs)
    undo()
    res = train_run(cfg, tmp_path / "b", progress=False, lrs=lrs)
    again = train_run(cfg, tmp_path / "b", progress=False, lrs=lrs)  # finished: rerun
    for r in (res, again):
        assert r.diverged_at == full.diverged_at
        assert same(r.run.read_json("summary.json"), full.run.read_json("summary.json"))
        assert same(r.run.metrics(), full.run.metrics())
        for k in full.params:
            assert torch.equal(full.params[k], r.params[k])


def test_a_member_diverging_between_log_steps_does_not_move_the_others_stop():
    # the divergence found at a checkpoint must not add an off-schedule log (and stop_fn
    # call) for the healthy members: member 0 stops exactly as it does alone
    model, params, data = _problem(m=2, dtype=torch.float32)
    cfg = TrainConfig(optimizer="sgd", lr=0.05, steps=40, log_every=10, checkpoint_every=3,
                      batch_size=16)

    def stop(v):
        return v["train_acc"] >= 0.9

    both = fit(model, params, data, cfg, lrs=[0.5, 1e6], stop_fn=stop,
               on_checkpoint=lambda *a: None, isolated=True)
    alone = fit(model, stack([member(params, 0)]), data, cfg.replace(lr=0.5), stop_fn=stop,
                on_checkpoint=lambda *a: None, isolated=True)
    assert both.diverged_at[1] is not None
    assert both.stopped_at[0] == alone.stopped_at[0]
    assert [r["step"] for r in both.history if r["member"] == 0] == [
        r["step"] for r in alone.history]
    for k in params:
        assert torch.equal(both.params[k][0], alone.params[k][0])


def test_when_every_member_diverges_each_keeps_its_own_step():
    # a study measures a member's checkpoints up to its own divergence: the error of an
    # all-diverged stack names each member's step, not the last one for all
    model, params, data = _problem(m=2, dtype=torch.float32)
    cfg = TrainConfig(optimizer="sgd", lr=0.05, steps=40, log_every=1, batch_size=16)
    with pytest.raises(TrainingDiverged) as e:
        fit(model, params, data, cfg, lrs=[1e7, 1.5e5])
    first, second = e.value.diverged_at  # [2, 3] here
    assert first < second == e.value.step


def test_load_run_model_takes_a_run_or_its_path(tmp_path):
    """A path failed with an AttributeError (hunt 44); basin_run and landscape_run took
    paths already."""
    from minefield.runs import Run
    from minefield.stages import load_run_model, train_run

    train_run(tiny_config("named"), tmp_path, progress=False)
    ref = load_run_model(Run.open(tmp_path / "named"))[1]
    for how in (str(tmp_path / "named"), tmp_path / "named"):
        got = load_run_model(how)[1]
        assert all(torch.equal(got[k], ref[k]) for k in ref)
