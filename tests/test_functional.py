import pytest
import torch
from torch import nn

from minefield.config import ModelConfig
from minefield.functional import mlp_fast_path, stack, stacked_forward
from minefield.models import build_model, init_params


def _stacked_mlp(widths=(7, 5), classes=3, m=4, n=11):
    model = build_model(ModelConfig(widths=widths, init="torch"), (2,), classes)
    ps = [{k: v.double() for k, v in init_params(model, "torch",
                                                  torch.Generator().manual_seed(s)).items()}
          for s in range(m)]
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    return model, stack(ps), x, ps


def _grads(model, params, x, path):
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = stacked_forward(model, leaves, x, path=path)
    out.pow(2).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def test_mlp_matmul_path_equals_vmap_and_the_module_float64():
    model, params, x, ps = _stacked_mlp()
    assert mlp_fast_path(model)
    out, g = _grads(model, params, x, "auto")
    ref, g_ref = _grads(model, params, x, "vmap")
    assert out.shape == (4, 11, 3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-12, atol=1e-12)
    # each member against the plain module with that member's weights loaded
    for i, p in enumerate(ps):
        one = build_model(ModelConfig(widths=(7, 5), init="torch"), (2,), 3).double()
        one.load_state_dict(p)
        torch.testing.assert_close(out[i], one(x).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", [nn.Tanh(), nn.LeakyReLU(0.1)])
def test_matmul_path_handles_other_activations_and_no_bias(act):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6, bias=False), act, nn.Linear(6, 2))
    assert mlp_fast_path(model)
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(3, *v.shape, generator=g, dtype=torch.float64)
              for k, v in model.named_parameters()}
    x = torch.randn(5, 2, 2, generator=g, dtype=torch.float64)
    out, gr = _grads(model.double(), params, x, "auto")
    ref, gr_ref = _grads(model, params, x, "vmap")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for k in gr:
        torch.testing.assert_close(gr[k], gr_ref[k], rtol=1e-12, atol=1e-12)


def test_matmul_path_leaves_the_input_alone():
    model = nn.Sequential(nn.Tanh(), nn.ReLU(), nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    assert mlp_fast_path(model)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before = x.clone()
    params = {k: v.detach().double().unsqueeze(0).repeat(2, *[1] * v.dim())
              for k, v in model.named_parameters()}
    out = stacked_forward(model, params, x)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    torch.testing.assert_close(out, stacked_forward(model, params, x, path="vmap"))


def test_non_mlps_are_not_on_the_matmul_path():
    cnn = build_model(ModelConfig(name="cnn", widths=(4, 4)), (1, 6, 6), 3)
    assert not mlp_fast_path(cnn)
    assert not mlp_fast_path(nn.Sequential(nn.Linear(2, 3), nn.Flatten(), nn.Linear(3, 1)))
    assert not mlp_fast_path(nn.Sequential(nn.ReLU()))


def test_unknown_forward_path():
    model, params, x, _ = _stacked_mlp()
    with pytest.raises(ValueError, match="unknown forward path"):
        stacked_forward(model, params, x, path="mlp")


class _SiLU(nn.ReLU):  # a subclass that computes something else
    def forward(self, x):
        return nn.functional.silu(x)


class _Masked(nn.Linear):
    def __init__(self, *a):
        super().__init__(*a)
        self.register_buffer("mask", (torch.arange(self.weight.numel()) % 2).view_as(
            self.weight).to(self.weight.dtype))

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class _Tempered(nn.Sequential):
    def forward(self, x):
        return super().forward(x) / 4


def _tied():
    m = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5),
                      nn.ReLU(), nn.Linear(5, 2))
    m[4].weight = m[2].weight
    return m


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(3, 5), _SiLU(), nn.Linear(5, 2)),
    lambda: nn.Sequential(nn.Linear(3, 5), nn.ReLU(), _Masked(5, 2)),
    lambda: _Tempered(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)),
    _tied], ids=["silu-subclass", "masked-linear", "sequential-subclass", "tied"])
def test_subclassed_or_tied_layers_run_their_own_forward(make):
    # the fast paths (batched matmuls, the R-operator) know only the exact torch classes;
    # anything else must take the general path and give the module's own outputs
    from minefield.pearlmutter import mlp_plan
    torch.manual_seed(0)
    model = make().double()
    assert not mlp_fast_path(model) and mlp_plan(model) is None
    p = {k: v.detach().unsqueeze(0).clone() for k, v in model.named_parameters()}
    x = torch.randn(7, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(stacked_forward(model, p, x)[0], model(x),
                                   rtol=0, atol=1e-14)


def test_activation_sizes_follow_the_module_not_its_id():
    from minefield.functional import activation_elements

    net = nn.Sequential(nn.Linear(8, 1))
    x = torch.randn(3, 8)
    assert activation_elements(net, x) == 1
    net[0] = nn.Linear(8, 4096)  # resized in place: the same object, other sizes
    net.append(nn.ReLU())
    assert activation_elements(net, x) == 2 * 4096
    # cached weakly per module: a freed module's entry goes with it (an id() is reused)
    from minefield.functional import _ACT_CACHE

    other = nn.Sequential(nn.Linear(8, 2))
    activation_elements(other, x)
    assert other in _ACT_CACHE
    n = len(_ACT_CACHE)
    import gc
    import weakref

    ref = weakref.ref(other)
    del other
    gc.collect()
    assert ref() is None  # freed: its entry went with it (others freed may go too)
    assert len(_ACT_CACHE) <= n - 1



@pytest.mark.parametrize("where", ["layer", "layer-pre", "model-pre", "global"])
def test_a_model_with_hooks_runs_them_as_the_module_does(where):
    # the oracle is the module itself, whose __call__ runs the hooks; the first call
    # caches "plain", so a hook added afterwards must be noticed, and one removed too
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    p = {k: v.detach().unsqueeze(0).repeat(2, *[1] * v.dim())
         for k, v in model.named_parameters()}
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert mlp_fast_path(model)
    plain = stacked_forward(model, p, x)
    register = {
        "layer": lambda: model[1].register_forward_hook(lambda m, i, o: o * 0.5),
        "layer-pre": lambda: model[2].register_forward_pre_hook(lambda m, i: (i[0] - 1,)),
        "model-pre": lambda: model.register_forward_pre_hook(lambda m, i: (i[0] * 2,)),
        "global": lambda: nn.modules.module.register_module_forward_hook(
            lambda m, i, o: o + 1 if m is model[0] else None),
    }[where]
    handle = register()
    try:
        assert not mlp_fast_path(model)
        want, got = model(x).detach(), stacked_forward(model, p, x)
        assert (want - plain[0]).abs().max() > 0.1  # the hook changes the function
        for i in range(2):
            torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)
    finally:
        handle.remove()
    assert mlp_fast_path(model)
