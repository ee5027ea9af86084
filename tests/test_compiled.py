"""The compiled training step: same numbers as eager (float64, CPU, the ``aot_eager``
debugging backend: dynamo + AOT autograd without code generation), and the decision."""

import pytest
import torch

from minefield.compiled import MIN_STEPS, CompiledObjective
from minefield.config import DataConfig, ModelConfig, TrainConfig
from minefield.data import load_dataset
from minefield.models import build_model
from minefield.step import poisoned_objective
from minefield.train import fit, init_stack


def _problem():
    data = load_dataset(DataConfig("blobs", n_train=40, n_test=20, n_poison=20)).to(
        "cpu", torch.float64)
    model = build_model(ModelConfig(widths=(8, 8)), data.input_shape, data.n_classes).double()
    p = {k: v.double() for k, v in init_stack(model, "glorot_uniform", [0, 1, 2]).items()}
    return data, model, p


def test_compiled_fit_equals_eager_float64():
    data, model, p = _problem()
    cfg = TrainConfig(steps=12, log_every=6, lr=0.01, clip_norm=1.0)
    betas = torch.tensor([0.0, 0.3, 0.5])
    eager = fit(model, p, data, cfg, betas, compile_mode="off")
    comp = fit(model, p, data, cfg, betas, compile_mode="on", compile_backend="aot_eager")
    assert eager.compiled["decision"] == "off" and comp.compiled["decision"] == "on"
    for k in p:
        torch.testing.assert_close(comp.params[k], eager.params[k], rtol=1e-12, atol=1e-12)


def test_auto_is_off_on_cpu_and_for_short_fits():
    data, model, p = _problem()
    res = fit(model, p, data, TrainConfig(steps=3, log_every=3), compile_mode="auto")
    assert res.compiled["mode"] == "off"
    short = CompiledObjective(poisoned_objective, "auto", torch.device("cuda"), MIN_STEPS - 1)
    assert short.mode == "off" and not short.timing


def test_decision_keeps_the_faster_after_the_probe():
    obj = CompiledObjective(poisoned_objective, "on", torch.device("cpu"), 1000, probe=3,
                            backend="aot_eager")
    obj.mode = obj.report["decision"] = "auto"  # as on CUDA
    obj.use_compiled = False
    for t in (1.0, 1.0, 1.0):
        obj.record(t)
    assert obj.use_compiled  # the probe moves on to the compiled steps
    for t in (30.0, 0.5, 0.5):  # first compiled step pays a 29.5 s compile
        obj.record(t)
    assert obj.report["decision"] == "compiled" and obj.use_compiled
    assert obj.report["compile_s"] == pytest.approx(29.5) and not obj.timing
    slow = CompiledObjective(poisoned_objective, "on", torch.device("cpu"), 1000, probe=2,
                             backend="aot_eager")
    slow.mode = slow.report["decision"] = "auto"
    slow.use_compiled = False
    for t in (1.0, 1.0, 20.0, 2.0):
        slow.record(t)
    assert slow.report["decision"] == "eager" and not slow.use_compiled


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        CompiledObjective(poisoned_objective, "fast", torch.device("cpu"), 10)


def test_a_shrinking_stack_compiles_once_not_once_per_size():
    # the search compacts its stack as members finish: with static shapes each new size
    # was a recompile (8 of them, then dynamo's limit and eager); automatic dynamic
    # shapes compiled the first size static and the second generically (2 graphs);
    # dynamic shapes from the start compile one graph for every size (but a stack of
    # one: dynamo specialises size-1 dimensions)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    data, model, p = _problem()
    p = {k: torch.cat([v, v]) for k, v in p.items()}  # six members
    cfg = TrainConfig(steps=2, log_every=2, lr=0.01)
    for m in (6, 5, 3, 2):
        q = {k: v[:m] for k, v in p.items()}
        comp = fit(model, q, data, cfg, torch.full((m,), 0.3, dtype=torch.float64),
                   compile_mode="on",
                   compile_backend="aot_eager")
        eager = fit(model, q, data, cfg, torch.full((m,), 0.3, dtype=torch.float64),
                    compile_mode="off")
        for k in q:
            torch.testing.assert_close(comp.params[k], eager.params[k], rtol=1e-12, atol=1e-12)
    assert counters["stats"]["unique_graphs"] == 1


def test_a_first_compilation_that_cannot_pay_is_not_started(monkeypatch):
    # the good run of Fig. 1: 8000 steps of one model at ~1 ms eager save at most 8 s,
    # less than a first compilation costs; the search's segments run the same objective
    # for their whole schedule (the horizon), so they compile
    import minefield.compiled as compiled

    monkeypatch.setattr(compiled, "_PAID", set())

    def probed(steps, horizon=None, scope=None):
        obj = CompiledObjective(poisoned_objective, "on", torch.device("cpu"), steps,
                                probe=3, backend="aot_eager", horizon=horizon, scope=scope)
        obj.mode = obj.report["decision"] = "auto"  # as on CUDA
        obj.use_compiled = False
        for t in (1e-3, 1e-3, 1e-3):
            obj.record(t)
        return obj

    good_run = probed(8000)
    assert not good_run.use_compiled and not good_run.timing
    assert good_run.report["decision"] == "eager"
    assert good_run.report["saving_bound_s"] == pytest.approx(1e-3 * 7997)
    segment = probed(500, horizon=24000)  # a search segment with its schedule ahead
    assert segment.use_compiled and segment.timing
    for t in (20.0, 5e-4, 5e-4):
        segment.record(t)
    assert segment.report["decision"] == "compiled"
    again = probed(500)  # compiled once in this process: a later fit probes it at no risk
    assert again.use_compiled and again.timing
    other = probed(500, scope=object())  # another module: dynamo compiles anew, so it must pay
    assert not other.use_compiled and other.report["decision"] == "eager"
