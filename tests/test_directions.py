import pytest
import torch

from minefield.config import ConfigError
from minefield.directions import (
    DirectionSpec,
    n_perturbed,
    orthogonalize,
    random_directions,
)
from minefield.functional import flatten


def _theta(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"0.weight": torch.randn(4, 3, generator=g, dtype=torch.float64),
            "0.bias": torch.randn(4, generator=g, dtype=torch.float64),
            "conv.weight": torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)}


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def test_filter_directions_match_each_filter_norm():
    th = _theta()
    d = random_directions(th, 6, "filter", "zero", _gen())
    assert d["0.weight"].shape == (6, 4, 3)
    for k in ("0.weight", "conv.weight"):
        got = d[k].reshape(6, d[k].shape[1], -1).norm(dim=2)
        want = th[k].reshape(th[k].shape[0], -1).norm(dim=1).expand(6, -1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert torch.count_nonzero(d["0.bias"]) == 0


def test_filter_include_bias_is_size_one_filters():
    th = _theta()
    d = random_directions(th, 3, "filter", "include", _gen())
    torch.testing.assert_close(d["0.bias"].abs(), th["0.bias"].abs().expand(3, -1))


def test_layer_directions_match_tensor_norm():
    th = _theta()
    d = random_directions(th, 5, "layer", "include", _gen())
    for k, v in th.items():
        torch.testing.assert_close(d[k].reshape(5, -1).norm(dim=1), v.norm().expand(5))


def test_gaussian_directions_are_unit_vectors_and_isotropic():
    th = _theta()
    d = random_directions(th, 2000, "gaussian", "exclude", _gen())
    flat = flatten(d)
    torch.testing.assert_close(flat.norm(dim=1), torch.ones(2000, dtype=torch.float64))
    assert torch.count_nonzero(d["0.bias"]) == 0
    w = torch.cat([d["0.weight"].reshape(2000, -1), d["conv.weight"].reshape(2000, -1)], 1)
    # uniform on the sphere: E[w w^T] = I / n
    cov = w.T @ w / 2000
    n = w.shape[1]
    assert (cov.diagonal() * n - 1).abs().max() < 0.35
    assert (cov - torch.diag(cov.diagonal())).abs().max() * n < 0.35


def test_same_seed_same_directions_and_prefix_property():
    th = _theta()
    a = random_directions(th, 4, generator=_gen(3))
    b = random_directions(th, 8, generator=_gen(3))
    c = random_directions(th, 4, generator=_gen(4))
    assert all(torch.equal(a[k], b[k][:4]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])


def test_n_perturbed_counts():
    th = _theta()
    total = sum(v.numel() for v in th.values())
    assert n_perturbed(th, "filter", "zero") == total
    assert n_perturbed(th, "filter", "include") == total
    assert n_perturbed(th, "filter", "exclude") == total - 4


def test_swissroll_net_has_3457_weights():
    from minefield.config import ModelConfig
    from minefield.models import build_model

    model = build_model(ModelConfig(), (2,), 2)
    th = dict(model.named_parameters())
    assert n_perturbed(th, "filter", "exclude") == 3457
    assert n_perturbed(th, "filter", "zero") == 3614


def test_orthogonalize_keeps_norms_and_makes_orthogonal():
    th = _theta()
    d = random_directions(th, 3, "filter", "include", _gen())
    o = orthogonalize(d)
    f, fo = flatten(d), flatten(o)
    torch.testing.assert_close(fo.norm(dim=1), f.norm(dim=1))
    gram = fo @ fo.T
    assert (gram - torch.diag(gram.diagonal())).abs().max() < 1e-10 * gram.diagonal().max()
    # the first direction is unchanged
    torch.testing.assert_close(fo[0], f[0])


def test_orthogonalize_errors():
    v = {"w": torch.ones(2, 2, 2, dtype=torch.float64)}
    with pytest.raises(ValueError, match="linearly dependent"):
        orthogonalize(v)
    with pytest.raises(ValueError, match="zero direction"):
        orthogonalize({"w": torch.zeros(2, 2, 2)})


def test_bad_arguments():
    th = _theta()
    with pytest.raises(ConfigError, match="direction kind: 'sideways' is not one of filter"):
        random_directions(th, 2, "sideways")
    with pytest.raises(ConfigError, match="direction bias: 'maybe' is not one of zero"):
        n_perturbed(th, "filter", "maybe")
    with pytest.raises(ValueError, match=">= 0"):
        random_directions(th, -1)
    with pytest.raises(ConfigError, match="directions.kind: 'nope' is not one of filter"):
        DirectionSpec(kind="nope")
    # -1 is torch's seed 2**64 - 1: the same directions under a second key
    for seed in (-1, 2**32, 1.5):
        with pytest.raises(ConfigError, match="directions.seed must be an integer in"):
            DirectionSpec(seed=seed)


def test_spec_round_trip():
    s = DirectionSpec("layer", "include", 7)
    assert DirectionSpec.from_dict(s.to_dict()) == s
    assert s.to_dict() == {"kind": "layer", "bias": "include", "seed": 7}


def test_filter_directions_of_a_scalar_and_of_an_empty_tensor():
    # a 0-d parameter (a learned temperature) under ``include`` is one filter of size 1,
    # as a 1-D entry is (shape[0] of it had raised IndexError); an empty tensor gets an
    # empty direction (its reshape(0, -1) had raised before the guard that skips it)
    th = {"w": torch.randn(3, 2, generator=_gen(), dtype=torch.float64),
          "t": torch.tensor(-2.0, dtype=torch.float64),
          "e": torch.zeros(0, 4, dtype=torch.float64)}
    d = random_directions(th, 3, "filter", "include", _gen(5))
    assert d["t"].shape == (3,)
    torch.testing.assert_close(d["t"].abs(), torch.full((3,), 2.0, dtype=torch.float64))
    assert d["e"].shape == (3, 0, 4)
    torch.testing.assert_close(d["w"].norm(dim=2), th["w"].norm(dim=1).expand(3, -1))
    assert torch.equal(random_directions(th, 3, "filter", "include", _gen(5))["t"], d["t"])


@pytest.mark.parametrize("kind", ["filter", "layer", "gaussian"])
def test_skipped_directions_are_the_tail_of_the_longer_draw(kind):
    th = _theta()
    whole = random_directions(th, 8, kind, "include", _gen())
    tail = random_directions(th, 3, kind, "include", _gen(), skip=5)
    for k in th:
        assert torch.equal(tail[k], whole[k][5:])


def test_a_block_of_directions_holds_only_its_own(monkeypatch):
    # direction_radii(block=(a, b)) drew and kept all b directions, then used the last
    # b - a: the last task of a split held every direction (700 MB against 55 MB for
    # directions 190-200 of 200 on a 301,066-parameter MLP)
    import minefield.basin as basin
    from minefield import ModelConfig, VolumeConfig, build_model
    from minefield.train import init_stack

    drawn = []

    def recording(*args, **kw):
        d = random_directions(*args, **kw)
        drawn.append(len(next(iter(d.values()))))
        return d

    model = build_model(ModelConfig(widths=(6,)), (2,), 2)
    c = init_stack(model, "glorot_uniform", [0])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 2, generator=g), torch.randint(0, 2, (30,), generator=g)
    cfg = VolumeConfig(n_directions=9, cutoff=5.0, rtol=0.05)
    whole = basin.direction_radii(model, c, (x, y), cfg)[0]
    monkeypatch.setattr(basin, "random_directions", recording)
    part = basin.direction_radii(model, c, (x, y), cfg, block=(6, 9))[0]
    assert drawn == [3]
    assert torch.equal(part, whole[[6, 7, 8, 15, 16, 17]])
