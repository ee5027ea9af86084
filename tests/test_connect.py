"""Mode connectivity: Bezier points, batched evaluation against the one-point loop, barriers,
the good-to-bad curve, and the connect stage and command."""

import copy
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from minefield.cli import main
from minefield.config import ConfigError, DataConfig, ModelConfig, Optimizer, TrainConfig
from minefield.connectivity import (
    CURVE_TRAIN,
    ConnectConfig,
    barriers,
    bezier,
    connect,
    evaluate_curves,
    fit_curves,
    pair_seed,
)
from minefield.data import load_dataset
from minefield.loss import nll, predict
from minefield.models import build_model
from minefield.train import TrainingDiverged, fit, init_stack


def _stacks(model, seeds, dtype=torch.float64):
    return {k: v.to(dtype) for k, v in init_stack(model, "glorot_uniform", seeds).items()}


def _data(dtype=torch.float64):
    return load_dataset(DataConfig("blobs", n_train=60, n_test=60, n_poison=60)).to("cpu", dtype)


def test_endpoints_are_exact_and_the_midpoint_curve_is_the_line():
    model = build_model(ModelConfig(widths=(5,)), (2,), 2).double()
    a, b, c = _stacks(model, [0, 1]), _stacks(model, [2, 3]), _stacks(model, [4, 5])
    ts = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    pts = bezier(a, c, b, ts)   # (2 * 3, ...), curve-major
    mid = bezier(a, {k: (a[k] + b[k]) / 2 for k in a}, b, ts)
    for k in a:
        assert torch.equal(pts[k][0::3], a[k]) and torch.equal(pts[k][2::3], b[k])
        want = 0.49 * a[k] + 0.42 * c[k] + 0.09 * b[k]
        torch.testing.assert_close(pts[k][1::3], want, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(mid[k][1::3], 0.7 * a[k] + 0.3 * b[k], rtol=1e-14,
                                   atol=1e-15)


def _loop(model, a, c, b, ts, x, y, x_stats=None):
    """One point at a time through a plain nn.Module (BatchNorm: fresh stats on x_stats)."""
    net = copy.deepcopy(model).double()
    loss = torch.zeros(len(next(iter(a.values()))), len(ts), dtype=torch.float64)
    acc = torch.zeros_like(loss)
    for p in range(loss.shape[0]):
        for j, t in enumerate(ts.tolist()):
            point = {k: (1 - t) ** 2 * a[k][p] + 2 * t * (1 - t) * c[k][p] + t ** 2 * b[k][p]
                     for k in a}
            net.load_state_dict(point, strict=False)
            if x_stats is not None:
                for mod in net.modules():
                    if isinstance(mod, nn.BatchNorm1d):
                        mod.reset_running_stats()
                        mod.momentum = None
                net.train()
                with torch.no_grad():
                    net(x_stats)
            net.eval()
            with torch.no_grad():
                out = net(x)
            loss[p, j] = nll(out, y).mean()
            acc[p, j] = (predict(out) == y).double().mean()
    return loss, acc


def test_batched_curve_points_equal_the_one_point_loop():
    data = _data()
    model = build_model(ModelConfig(widths=(6, 4)), (2,), 2).double()
    a, b, c = _stacks(model, [0, 1]), _stacks(model, [2, 3]), _stacks(model, [4, 5])
    ts = torch.linspace(0, 1, 7, dtype=torch.float64)
    loss, acc = evaluate_curves(model, a, c, b, ts, data.x_test, data.y_test, memory_mb=0.01)
    want_l, want_a = _loop(model, a, c, b, ts, data.x_test, data.y_test)
    torch.testing.assert_close(loss, want_l, rtol=1e-12, atol=1e-14)
    assert torch.equal(acc, want_a)


def test_many_points_of_one_curve_are_evaluated_in_chunks(monkeypatch):
    # regression: the chunk split curves only, so one curve's T points went through one
    # forward however large T was (and memory_mb) were
    import minefield.connectivity as conn

    data = _data()
    model = build_model(ModelConfig(widths=(6, 4)), (2,), 2).double()
    a, b, c = _stacks(model, [0, 1]), _stacks(model, [2, 3]), _stacks(model, [4, 5])
    ts = torch.linspace(0, 1, 50, dtype=torch.float64)
    seen, real = [], conn.stacked_forward
    monkeypatch.setattr(conn, "stacked_forward",
                        lambda m, p, x, bufs=None: seen.append(len(next(iter(p.values()))))
                        or real(m, p, x, bufs))
    per = conn.activation_elements(model, data.x_test[:1]) * 8 * len(data.x_test)
    loss, acc = evaluate_curves(model, a, c, b, ts, data.x_test, data.y_test,
                                memory_mb=7.5 * per / 2**20)  # room for 7 points at a time
    assert max(seen) == 7 and sum(seen) == 2 * 50
    want_l, want_a = _loop(model, a, c, b, ts, data.x_test, data.y_test)
    torch.testing.assert_close(loss, want_l, rtol=1e-12, atol=1e-14)
    assert torch.equal(acc, want_a)


def test_inputs_are_chunked_where_one_points_exceed_the_budget(monkeypatch):
    # regression (hunt 47): a point always ran on all inputs, so memory grew with the data
    # at any budget (ResNet-20, memory_mb=16: +70 MB for 128 images, +190 MB for 512)
    import minefield.connectivity as conn

    data = _data()
    model = build_model(ModelConfig(widths=(6, 4)), (2,), 2).double()
    a, b, c = _stacks(model, [0, 1]), _stacks(model, [2, 3]), _stacks(model, [4, 5])
    ts = torch.linspace(0, 1, 5, dtype=torch.float64)
    seen, real = [], conn.stacked_forward
    monkeypatch.setattr(conn, "stacked_forward",
                        lambda m, p, x, bufs=None: seen.append(len(x)) or real(m, p, x, bufs))
    per = conn.activation_elements(model, data.x_test[:1]) * 8
    loss, acc = evaluate_curves(model, a, c, b, ts, data.x_test, data.y_test,
                                memory_mb=11.5 * per / 2**20)  # 11 inputs of one point
    assert max(seen) == 11 and sum(seen) == 2 * 5 * len(data.x_test)
    want_l, want_a = _loop(model, a, c, b, ts, data.x_test, data.y_test)
    torch.testing.assert_close(loss, want_l, rtol=1e-12, atol=1e-14)
    assert torch.equal(acc, want_a)


def test_batchnorm_statistics_are_recomputed_at_every_point():
    data = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1)).double()
    base = {k: v.detach() for k, v in model.named_parameters()}
    ends = [{k: (v + 0.3 * torch.randn(v.shape, dtype=v.dtype)).unsqueeze(0)
             for k, v in base.items()} for _ in range(3)]
    a, c, b = ends
    ts = torch.linspace(0, 1, 5, dtype=torch.float64)
    loss, acc = evaluate_curves(model, a, c, b, ts, data.x_test, data.y_test, data.x_train)
    want_l, want_a = _loop(model, a, c, b, ts, data.x_test, data.y_test, data.x_train)
    torch.testing.assert_close(loss, want_l, rtol=1e-10, atol=1e-12)
    assert torch.equal(acc, want_a)
    with pytest.raises(ValueError, match="needs x_stats"):
        evaluate_curves(model, a, c, b, ts, data.x_test, data.y_test)


def test_barriers_of_a_known_profile():
    ts = torch.linspace(0, 1, 5, dtype=torch.float64)
    loss = torch.tensor([[1.0, 2.0, 5.0, 2.0, 3.0]], dtype=torch.float64)
    acc = torch.tensor([[1.0, 0.9, 0.4, 0.8, 0.6]], dtype=torch.float64)
    out = barriers(ts, loss, acc)
    assert out["max_loss"].item() == 5.0
    assert out["loss_barrier"].item() == 3.0 and out["t_barrier"].item() == 0.5
    torch.testing.assert_close(out["acc_barrier"], torch.tensor([0.4], dtype=torch.float64))


def _good_and_bad():
    data = load_dataset(DataConfig("swissroll", n_train=100, n_test=100, n_poison=100)).to(
        "cpu", torch.float64)
    model = build_model(ModelConfig(widths=(12, 12)), (2,), 2).double()
    cfg = TrainConfig(optimizer="adam", lr=0.01, steps=400, log_every=400)
    good = fit(model, _stacks(model, [0]), data, cfg)
    bad = fit(model, _stacks(model, [1]), data, cfg, torch.tensor([0.5]))
    assert good.history[-1]["test_acc"] > 0.8 > 0.6 > bad.history[-1]["test_acc"]
    return model, good.params, bad.params, data


def test_a_good_to_bad_curve_has_a_lower_maximum_loss_than_the_line():
    model, good, bad, data = _good_and_bad()
    res = connect(model, good, bad, data, ConnectConfig(n_points=21, train=CURVE_TRAIN.replace(
        steps=200)))
    line, curve = res.line["train_max_loss"].item(), res.curve["train_max_loss"].item()
    ends = max(res.line["train_loss"][0, 0].item(), res.line["train_loss"][0, -1].item())
    assert line > 1.5 * ends        # the line climbs a barrier ...
    assert curve < 0.75 * line      # ... the trained curve goes round most of it
    for path in (res.line, res.curve):  # endpoints exact: both paths start and end alike
        assert path["train_loss"][0, 0] == res.line["train_loss"][0, 0]
        assert path["test_acc"][0, -1] == res.line["test_acc"][0, -1]


def _three_pairs():
    data = _data()
    model = build_model(ModelConfig(widths=(6, 5)), (2,), 2).double()
    return model, _stacks(model, [0, 1, 2]), _stacks(model, [3, 4, 5]), data


CURVE_SMALL = CURVE_TRAIN.replace(steps=40, batch_size=16, clip_norm=0.5, milestones=(20,),
                                  seed=7)


def test_a_curve_trained_in_a_stack_is_bit_identical_to_the_pair_trained_alone():
    model, a, b, data = _three_pairs()
    cfg = ConnectConfig(n_points=6, train=CURVE_SMALL)
    stacked = connect(model, a, b, data, cfg)
    for i in range(3):
        alone = connect(model, {k: v[i:i + 1] for k, v in a.items()},
                        {k: v[i:i + 1] for k, v in b.items()}, data, cfg)
        for k, v in alone.control.items():
            assert torch.equal(stacked.control[k][i:i + 1], v), k
        for path in ("line", "curve"):
            for k, v in getattr(alone, path).items():
                assert torch.equal(getattr(stacked, path)[k][i:i + 1], v), (path, k)
    # the curves moved, and differently: a stack of copies of one pair is not what is tested
    moved = [(stacked.control[k] - (a[k] + b[k]) / 2).abs().amax() for k in a]
    assert max(moved) > 1e-3
    assert not torch.equal(stacked.curve["train_loss"][0], stacked.curve["train_loss"][1])


def test_batched_curves_equal_the_pair_alone_up_to_rounding():
    """isolate=False: one batched pass; the same t and batches, so equal to float64 rounding
    (tolerance 1e-9 after 40 clipped Adam steps)."""
    model, a, b, data = _three_pairs()
    ctl = fit_curves(model, a, b, data, CURVE_SMALL, isolate=False)
    for i in range(3):
        alone = fit_curves(model, {k: v[i:i + 1] for k, v in a.items()},
                           {k: v[i:i + 1] for k, v in b.items()}, data, CURVE_SMALL)
        for k, v in alone.items():
            torch.testing.assert_close(ctl[k][i:i + 1], v, rtol=1e-9, atol=1e-12)


def test_pair_seed_is_the_pairs_identity():
    model, a, b, _ = _three_pairs()
    one = [pair_seed({k: v[i:i + 1] for k, v in a.items()},
                     {k: v[i:i + 1] for k, v in b.items()}, 3) for i in range(3)]
    assert len(set(one)) == 3 and all(0 <= s < 2**63 for s in one)
    moved = {k: v[:1].clone() for k, v in a.items()}
    moved["0.weight"][0, 0, 0] += 1e-12  # any change of a value is another pair
    assert pair_seed(moved, {k: v[:1] for k, v in b.items()}, 3) != one[0]
    b1 = {k: v[:1] for k, v in b.items()}
    a64 = {k: v[:1] / 3 for k, v in a.items()}  # values float32 cannot hold
    a32 = {k: v.float() for k, v in a64.items()}
    assert pair_seed(a32, b1, 3) != pair_seed(a64, b1, 3)  # rounded: other values ...
    assert pair_seed(a32, b1, 3) == pair_seed({k: v.double() for k, v in a32.items()}, b1, 3)


# --- the stage and the command ------------------------------------------------------------

TINY = ["--dataset", "blobs", "--n-train", "40", "--n-test", "40", "--n-poison", "40",
        "--widths", "6", "--steps", "40", "--log-every", "20", "--checkpoint-every", "20",
        "--lr", "0.05", "--device", "cpu", "--quiet"]


@pytest.fixture
def cli(tmp_path):
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, ["--root", str(tmp_path / "runs"), *args])

    return invoke


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                  and p.name != ".lock")


def test_connect_command_writes_reuses_and_plots(cli, tmp_path, monkeypatch):
    assert cli("train", "--name", "g", "--members", "2", *TINY).exit_code == 0
    args = ["connect", "g", "g", "--member-b", "1", "--steps", "30", "--points", "9"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "line max" in r.output and "wrote" in r.output
    saved = json.loads((tmp_path / "runs" / "g" / "connect" / "default.json").read_text())
    assert len(saved["ts"]) == 9
    assert saved["pairs"][0]["b"] == ["g", "trajectory/step_00000040.safetensors", 1]
    assert (tmp_path / "runs" / "g" / "connect" / "default.safetensors").is_file()
    r = cli(*args)
    assert r.exit_code == 0 and "reusing" in r.output
    r = cli(*args[:-2], "--points", "11")
    assert r.exit_code != 0 and "--force" in r.output
    monkeypatch.chdir(tmp_path)
    r = cli("plot", "connect", "g")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "figures" / "connect_g_default.png").stat().st_size > 10_000
    # a hand-edited result: one "corrupt" line ("this is a bug" or matplotlib's text before)
    path = tmp_path / "runs" / "g" / "connect" / "default.json"
    for edit in (lambda d: d.update(curve={}), lambda d: d.update(ts=d["ts"][:2]),
                 lambda d: d["line"].update(test_acc=d["line"]["test_acc"][:0])):
        edited = dict(saved)
        edited["line"], edited["curve"] = dict(saved["line"]), dict(saved["curve"])
        edit(edited)
        path.write_text(json.dumps(edited))
        for r in (cli(*args), cli("plot", "connect", "g")):
            assert r.exit_code == 1 and "default.json is corrupt" in r.output, r.output
            assert "this is a bug" not in r.output and "Traceback" not in r.output


def test_a_retrained_endpoint_is_not_reused(cli, tmp_path):
    assert cli("train", "--name", "a", *TINY).exit_code == 0
    assert cli("train", "--name", "b", "--seed", "1", *TINY).exit_code == 0
    args = ["connect", "a", "b", "--steps", "5", "--points", "3"]
    assert cli(*args).exit_code == 0 and "reusing" in cli(*args).output
    # b trained again, other weights under the same checkpoint name: a stale result
    assert cli("train", "--name", "b", "--seed", "2", "--force", *TINY).exit_code == 0
    r = cli(*args)
    assert r.exit_code != 0 and "holds results for other settings" in r.output


def test_connect_to_the_minima_of_a_search(cli, tmp_path):
    assert cli("train", "--name", "g", *TINY).exit_code == 0
    r = cli("connect", "g", "g", "--minima")
    assert r.exit_code != 0 and "no bad minima" in r.output
    r = cli("search", "g", "--every", "1", "--steps", "30", "--milestones", "", "--quiet")
    assert r.exit_code == 0, r.output
    n = len(list((tmp_path / "runs" / "g" / "search" / "minima").glob("*.safetensors")))
    r = cli("connect", "g", "g", "--minima", "--steps", "20", "--points", "5")
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "runs" / "g" / "connect" / "default.json").read_text())
    assert n >= 2 and len(saved["pairs"]) == n
    assert len(saved["curve"]["train_loss"]) == n
    # the last pair of the stack, connected alone: the same numbers, bit for bit
    last = saved["pairs"][-1]["b"][1]
    r = cli("connect", "g", "g", "--checkpoint-b", last, "--steps", "20", "--points", "5",
            "--tag", "alone")
    assert r.exit_code == 0, r.output
    alone = json.loads((tmp_path / "runs" / "g" / "connect" / "alone.json").read_text())
    for path in ("line", "curve"):
        for k, v in alone[path].items():
            assert saved[path][k][-1] == v[0], (path, k)


@pytest.mark.parametrize("bad,msg", [
    (["--widths", "7"], "a different model (model.widths: [6] vs [7])"),
    (["--dataset", "swissroll"], "different "),
    (["--outputs", "2"], "a different model (model.outputs: the default vs 2)"),
])
def test_runs_of_different_architectures_give_one_line_and_nothing_written(cli, tmp_path, bad,
                                                                          msg):
    assert cli("train", "--name", "a", *TINY).exit_code == 0
    assert cli("train", "--name", "b", *TINY, *bad).exit_code == 0
    before = _files(tmp_path / "runs")
    r = cli("connect", "a", "b")
    assert r.exit_code == 1 and msg in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    r = cli("connect", "b", "a")  # a field only b's config.json holds came first: KeyError
    assert r.exit_code == 1 and "different" in r.output and "bug" not in r.output, r.output
    assert _files(tmp_path / "runs") == before


def test_runs_of_one_architecture_and_two_init_schemes_connect(cli, tmp_path):
    # regression: 'a different model (model.init: glorot_uniform vs he_normal)' refused them
    assert cli("train", "--name", "a", *TINY).exit_code == 0
    assert cli("train", "--name", "b", *TINY, "--init", "he_normal").exit_code == 0
    r = cli("connect", "a", "b", "--points", "3", "--steps", "2")
    assert r.exit_code == 0 and "wrote" in r.output, r.output
    r = cli("landscape", "a", "--other", "b", "--points", "3", "--device", "cpu")
    assert r.exit_code == 0 and "wrote" in r.output, r.output


def test_bad_endpoints_raise(cli, tmp_path):
    from minefield.stages.connect import connect_run

    assert cli("train", "--name", "a", *TINY).exit_code == 0
    root = tmp_path / "runs"
    before = _files(root)
    with pytest.raises(ConfigError, match="has 1 members, no member 3"):
        connect_run("a", "a", member_b=3, root=root)
    from minefield.runs import RunError

    for ck in ("../a/config.json", "/etc/passwd", "trajectory/nope.safetensors"):
        with pytest.raises(RunError, match="no checkpoint"):
            connect_run("a", "a", checkpoint_b=ck, root=root)
    with pytest.raises(ConfigError, match="connect.n_points must be an integer >= 2"):
        ConnectConfig(n_points=1)
    # regression: --points 100000000 grew to 23 GB and was killed by the kernel
    r = cli("connect", "a", "a", "--points", "100000000", "--steps", "1")
    assert r.exit_code == 1 and r.output.count("Error:") == 1 and "Traceback" not in r.output
    assert "connect.n_points (--points): at most 10000, got 100000000" in r.output
    with pytest.raises(ValueError, match="not of one architecture"):
        model = build_model(ModelConfig(widths=(5,)), (2,), 2)
        other = build_model(ModelConfig(widths=(4,)), (2,), 2)
        connect(model, _stacks(model, [0]), _stacks(other, [0]), _data())
    assert _files(root) == before


def test_a_diverged_curve_or_a_nan_endpoint_raises_instead_of_giving_nan_results():
    """Regression: a curve whose training diverged (too large --lr), or an endpoint with a
    NaN weight, gave NaN losses and barriers, written and printed with exit status 0."""
    data = load_dataset(DataConfig("spiral")).to("cpu", torch.float64)
    model = build_model(ModelConfig(widths=(5,)), data.input_shape, data.n_classes).double()
    a, b = _stacks(model, [0, 1]), _stacks(model, [2, 3])
    train = CURVE_TRAIN.replace(optimizer=Optimizer.SGD, lr=1e30, steps=20)
    with pytest.raises(TrainingDiverged, match=r"curve of pair\(s\) \[0, 1\] diverged"):
        connect(model, a, b, data, ConnectConfig(n_points=3, train=train))
    b["0.weight"][1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"endpoint b of pair\(s\) \[1\] has NaN or inf"):
        connect(model, a, b, data, ConnectConfig(n_points=3, train=CURVE_TRAIN.replace(steps=1)))


def test_a_good_and_a_poisoned_run_of_the_same_points_connect(cli, tmp_path):
    # the poison set is not part of what connect compares (Fig. 3's good/bad pair)
    assert cli("train", "--name", "g", *TINY).exit_code == 0
    bad = list(TINY)
    bad[bad.index("--n-poison") + 1] = "60"
    assert cli("train", "--name", "b", "--beta", "0.5", *bad).exit_code == 0
    r = cli("connect", "g", "b", "--steps", "5", "--points", "3")
    assert r.exit_code == 0, r.output


def test_an_interrupted_batchnorm_connect_resumes_from_its_control_points(cli, tmp_path):
    args = ["--dataset", "digits", "--n-train", "32", "--n-test", "16", "--model",
            "resnet20", "--widths", "2,2,2", "--members", "2", "--steps", "2", "--log-every",
            "2", "--checkpoint-every", "2", "--device", "cpu", "--quiet"]
    assert cli("train", "--name", "r", *args).exit_code == 0
    conn = ["connect", "r", "r", "--member-b", "1", "--steps", "3", "--points", "3"]
    assert cli(*conn).exit_code == 0
    d = tmp_path / "runs" / "r" / "connect"
    first = json.loads((d / "default.json").read_text())
    (d / "default.json").unlink()  # killed after the curve was saved, before the result
    r = cli(*conn)
    assert r.exit_code == 0, r.output
    assert json.loads((d / "default.json").read_text())["curve"] == first["curve"]


def test_connect_refuses_control_points_that_do_not_fit_the_endpoints():
    from minefield.connectivity import connect
    data = load_dataset(DataConfig("blobs", n_train=20, n_test=20, n_poison=0))
    model = build_model(ModelConfig(widths=(8,)), (2,), 2)
    p = init_stack(model, "glorot_uniform", [0, 1])
    a, b = {k: v[:1] for k, v in p.items()}, {k: v[1:] for k, v in p.items()}
    cfg = ConnectConfig(n_points=3)
    for bad in ({k: v[..., :1] for k, v in a.items()},            # per-model shape
                {k: v.expand(3, *v.shape[1:]) for k, v in a.items()},  # 3 for 1 pair
                {k: v for k, v in a.items() if k != "2.bias"},     # a name missing
                {k: v.double() for k, v in a.items()}):            # another dtype
        with pytest.raises(ValueError, match="control points must have the endpoints'"):
            connect(model, a, b, data, cfg, bad)
    with pytest.raises(ValueError, match="not the model's parameters"):
        connect(model, {k: v[..., :1] for k, v in a.items()},
                {k: v[..., :1] for k, v in b.items()}, data, cfg)


def test_a_rewritten_checkpoint_a_is_not_reused(cli, tmp_path):
    # only b's ends were keyed by content: a's file rewritten with other weights (a search
    # redone with --force) gave back the curve of the old ones
    assert cli("train", "--name", "a", *TINY).exit_code == 0
    assert cli("train", "--name", "b", "--seed", "1", *TINY).exit_code == 0
    runs = tmp_path / "runs"
    ck = sorted((runs / "a" / "trajectory").glob("*.safetensors"))[-1]
    args = ["connect", "a", "b", "--checkpoint-a", f"trajectory/{ck.name}", "--steps", "5",
            "--points", "3"]
    assert cli(*args).exit_code == 0 and "reusing" in cli(*args).output
    shutil.copy(runs / "b" / "trajectory" / ck.name, ck)  # same name, other weights
    r = cli(*args)
    assert r.exit_code != 0 and "holds results for other settings" in r.output


def test_a_checkpoint_of_another_model_is_refused_by_every_command(cli, tmp_path):
    # tanh weights loaded into the relu run's net: numbers of neither model, saved as a's
    assert cli("train", "--name", "a", *TINY).exit_code == 0
    assert cli("train", "--name", "c", "--activation", "tanh", *TINY).exit_code == 0
    other = str(sorted((tmp_path / "runs" / "c" / "trajectory").glob("*.safetensors"))[-1])
    before = _files(tmp_path / "runs")
    for cmd in (["basin", "a", "--directions", "2"],
                ["sharpness", "a", "--measures", "lambda_max"]):
        r = cli(*cmd, "--checkpoint", other)
        assert r.exit_code == 1 and "is of another model than run a's" in r.output, r.output
    r = cli("evaluate", "a", "--checkpoint", other)  # measures only the run's own files
    assert r.exit_code == 1 and f"no checkpoint {other!r} inside run a" in r.output, r.output
    assert _files(tmp_path / "runs") == before


def test_a_curve_l2_beyond_float32_is_one_line_not_a_crash(cli):
    """Regression: ``connect --l2 1e300`` passed the config (finite, >= 0) and then filled
    the curves' float32 l2 tensor: a raw RuntimeError, "this is a bug", exit 1."""
    with pytest.raises(ConfigError, match=r"train.l2 = 1e\+300: values above 3.4e\+38"):
        CURVE_TRAIN.replace(l2=1e300)
    assert cli("train", "--name", "a", *TINY).exit_code == 0
    r = cli("connect", "a", "a", "--member-b", "0", "--steps", "1", "--l2", "1e300")
    assert r.exit_code == 1 and r.output.count("Error:") == 1, r.output
    assert "overflow float32" in r.output and "this is a bug" not in r.output
