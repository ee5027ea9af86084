import math

import pytest
import torch

from minefield.config import ConfigError, ModelConfig
from minefield.functional import stacked_forward
from minefield.models import ModelError, build_model, init_params
from minefield.stacked import flatten, member, stack, unflatten


def count(m, weights_only=False):
    return sum(p.numel() for p in m.parameters() if p.dim() > 1 or not weights_only)


@pytest.mark.parametrize("cfg,shape,k,n", [
    (ModelConfig("mlp", (23, 16, 26, 32, 28, 31)), (2,), 2, 3614),  # paper's swiss roll
    (ModelConfig("mlp", (25, 25, 25, 25)), (2,), 2, 2051),  # paper's minefield net
    (ModelConfig("resnet20"), (3, 32, 32), 10, 269_722),  # paper's SVHN net
])
def test_paper_parameter_counts(cfg, shape, k, n):
    assert count(build_model(cfg, shape, k)) == n


def test_swissroll_weight_count():
    assert count(build_model(ModelConfig(), (2,), 2), weights_only=True) == 3457


@pytest.mark.parametrize("scheme", ["glorot_normal", "glorot_uniform", "he_normal", "torch"])
def test_init_is_seeded_and_has_expected_scale(scheme):
    m = build_model(ModelConfig("mlp", (400, 400)), (2,), 2)
    a = init_params(m, scheme, torch.Generator().manual_seed(3))
    b = init_params(m, scheme, torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    w = a["2.weight"]  # 400 x 400
    fan = 400
    expected = {"glorot_normal": math.sqrt(2 / (2 * fan)), "glorot_uniform": math.sqrt(1 / fan),
                "he_normal": math.sqrt(2 / fan), "torch": math.sqrt(1 / (3 * fan))}[scheme]
    assert float(w.std()) == pytest.approx(expected, rel=0.03)
    if scheme != "torch":
        assert float(a["2.bias"].abs().max()) == 0.0


def test_init_does_not_touch_global_rng():
    state = torch.get_rng_state()
    init_params(build_model(ModelConfig(), (2,), 2), "glorot_uniform", torch.Generator())
    assert torch.equal(state, torch.get_rng_state())


def test_stacked_forward_matches_module_loop():
    m = build_model(ModelConfig("cnn"), (1, 8, 8), 10).double()
    ps = [init_params(m, "torch", torch.Generator().manual_seed(s)) for s in range(3)]
    p = {k: v.double() for k, v in stack(ps).items()}
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = stacked_forward(m, p, x)
    for i in range(3):
        m.load_state_dict(member(p, i))
        torch.testing.assert_close(out[i], m(x))


def test_flatten_roundtrip():
    m = build_model(ModelConfig(widths=(4,)), (2,), 2)
    p = stack([init_params(m, "torch", torch.Generator().manual_seed(s)) for s in range(2)])
    f = flatten(p)
    assert f.shape == (2, count(m))
    back = unflatten(f, p)
    assert all(torch.equal(back[k], p[k]) for k in p)


def test_unknown_model_and_init_and_activation():
    with pytest.raises(ModelError, match="unknown model 'vgg'"):
        build_model(ModelConfig("vgg"), (2,), 2)
    with pytest.raises(ConfigError, match="model.init: 'zeros' is not one of glorot_normal"):
        ModelConfig(init="zeros")
    with pytest.raises(ConfigError, match="model.activation: 'gelu' is not one of relu, tanh"):
        ModelConfig(activation="gelu")


def test_two_outputs_for_two_classes_is_papers_fig8_head():
    # PAPER.md's Fig. 8 net is 2->100x9->2 (softmax CE); the registry used to give every
    # binary problem one sigmoid logit, whatever was asked
    cfg = ModelConfig(widths=(100,) * 9, init="torch", outputs=2)
    model = build_model(cfg, (2,), 2)
    assert count(model) == 2 * 100 + 100 + 8 * (100 * 100 + 100) + 100 * 2 + 2
    assert count(model) - count(build_model(cfg.replace(outputs=None), (2,), 2)) == 101
    assert build_model(cfg.replace(outputs=1), (2,), 2)(torch.zeros(3, 2)).shape == (3, 1)
    assert build_model(ModelConfig(widths=(4,), outputs=10), (2,), 10)(
        torch.zeros(3, 2)).shape == (3, 10)
    with pytest.raises(ModelError, match="model.outputs=3 does not fit 2 classes: give 1"):
        build_model(ModelConfig(widths=(4,), outputs=3), (2,), 2)
    with pytest.raises(ConfigError, match="model.outputs must be >= 1"):
        ModelConfig(outputs=0)
    # configs saved before the field existed (run keys) equal today's default
    assert "outputs" not in ModelConfig().to_dict()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_image_model_on_vector_data():
    for name in ("cnn", "resnet20", "resnet18"):
        with pytest.raises(ModelError, match="needs image input"):
            build_model(ModelConfig(name), (2,), 2)
