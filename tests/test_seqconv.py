import pytest
import torch
from torch import nn
from torch.func import functional_call

from minefield.config import ModelConfig
from minefield.directions import random_directions
from minefield.engine import evaluate_points, evaluate_points_loop
from minefield.models import build_model, init_params
from minefield.seqconv import seq_conv_logits, seq_conv_path
from minefield.stacked import stack

# float64: the shared first layer sums its products in another order than the conv kernel
TOL = dict(rtol=1e-12, atol=1e-12)


def _nets():
    return {
        "digits-like": nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, stride=2),
            nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 3)),
        "strides, dilation, no bias": nn.Sequential(
            nn.Conv2d(3, 5, 3, stride=2, padding=(1, 2), dilation=2, bias=False),
            nn.LeakyReLU(0.1), nn.MaxPool2d(2), nn.Tanh(),
            nn.Conv2d(5, 4, 2, padding=1, padding_mode="reflect", groups=1),
            nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 3 * 3, 2, bias=False)),
        "grouped later conv": nn.Sequential(
            nn.Conv2d(3, 4, (3, 1)), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten()),
        "convolution only": nn.Sequential(nn.Conv2d(3, 2, 1)),
    }


@pytest.mark.parametrize("name", list(_nets()))
def test_seq_conv_logits_equal_module_calls_float64(name):
    net = _nets()[name].double().eval()
    assert seq_conv_path(net)
    g = torch.Generator().manual_seed(0)
    p = {k: torch.randn(3, *v.shape, generator=g, dtype=torch.float64)
         for k, v in net.named_parameters()}
    x = torch.randn(5, net[0].in_channels, 9, 10, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = seq_conv_logits(net, p, x)
        ref = torch.stack([functional_call(net, {k: v[i] for k, v in p.items()}, (x,))
                           for i in range(3)])
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL)
    assert not torch.allclose(out[0], out[1])  # every member kept, not the last one thrice


@pytest.mark.parametrize("net", [
    nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)),  # buffers
    nn.Sequential(nn.Flatten(), nn.Linear(4, 2)),  # no leading convolution
    nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)),
    nn.Sequential(nn.Conv2d(1, 2, 3, padding="same")),
    nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular")),
    nn.Sequential(nn.Conv2d(1, 2, 3), nn.PReLU()),  # a parameter the path does not read
    nn.Sequential(type("StdConv", (nn.Conv2d,), {})(1, 2, 3)),  # a subclass may differ
    nn.Conv2d(1, 2, 3),
])
def test_seq_conv_path_refuses_what_it_cannot_reproduce(net):
    assert not seq_conv_path(net)


def test_a_hooked_conv_net_is_not_run_without_its_hooks():
    # seqconv computed the layers itself: a pre-hook scaling the input was skipped
    # (centre loss 1.1868 for model(x)'s 1.7925, and basin radii of another network)
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(64, 3)).double()
    assert seq_conv_path(net)
    handle = net[0].register_forward_pre_hook(lambda _m, inp: (inp[0] * 3,))
    assert not seq_conv_path(net)
    x = torch.randn(20, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    centre = {k: v.detach()[None] for k, v in net.named_parameters()}
    d = random_directions({k: v[0] for k, v in centre.items()}, 1)
    loss, _ = evaluate_points(net, centre, d, torch.zeros(1, dtype=torch.float64), x, y)
    with torch.no_grad():
        torch.testing.assert_close(loss[0].item(), F.cross_entropy(net(x), y).item(),
                                   rtol=1e-12, atol=0)
    handle.remove()
    assert seq_conv_path(net)


def test_engine_loop_path_runs_seqconv_and_equals_reference_loop(monkeypatch):
    import minefield.engine as eng
    model = build_model(ModelConfig("cnn", widths=(4, 6), init="torch"), (1, 8, 8), 3)
    g = torch.Generator().manual_seed(1)
    th = {k: v.double() for k, v in init_params(model, "torch", g).items()}
    d = random_directions(th, 5, "filter", "include", g)
    x = torch.randn(20, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    calls = []
    monkeypatch.setattr(eng, "seq_conv_logits", lambda *a: calls.append(1) or
                        seq_conv_logits(*a))
    ts = torch.rand(5, 3, generator=g, dtype=torch.float64)
    lo, ac = evaluate_points(model, stack([th]), d, ts, x, y)  # the CPU's rule: loop
    assert calls
    lo_ref, ac_ref = evaluate_points_loop(model, stack([th]), d, ts, x, y)
    torch.testing.assert_close(lo, lo_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ac, ac_ref)


def test_engine_bf16_loop_skips_seqconv_and_stays_near_float32(monkeypatch):
    import minefield.engine as eng
    model = build_model(ModelConfig("cnn", widths=(4, 6)), (1, 8, 8), 3)
    g = torch.Generator().manual_seed(2)
    th = init_params(model, "he_normal", g)
    d = random_directions(th, 4, "filter", "zero", g)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    calls = []
    monkeypatch.setattr(eng, "seq_conv_logits", lambda *a: calls.append(1) or
                        seq_conv_logits(*a))
    ts = torch.full((4,), 0.05)
    lo16, _ = evaluate_points(model, stack([th]), d, ts, x, y, path="loop", precision="bf16")
    assert not calls  # autocast: the module's own (autocast) kernels
    lo32, _ = evaluate_points(model, stack([th]), d, ts, x, y, path="loop")
    assert calls
    torch.testing.assert_close(lo16, lo32, rtol=0.05, atol=0.05)
