import pytest
import torch
from torch.func import functional_call, grad, vmap

from minefield import stacked
from minefield.stacked import Stacked, check_single, flatten, member, one, select, stack, unflatten


def _stack(m=3):
    return {"w": torch.arange(m * 4.0).reshape(m, 2, 2), "b": torch.arange(m * 2.0).reshape(m, 2)}


def test_members_of_a_stack_against_plain_indexing():
    p = _stack()
    s = Stacked(p)
    assert s.n_members == stacked.n_members(p) == 3
    for i in range(3):
        assert all(torch.equal(s.member(i)[k], p[k][i]) for k in p)
        first = s.one(i)
        assert isinstance(first, Stacked) and first["w"].shape == (1, 2, 2)
        assert type(one(p, i)) is dict  # the functions hand torch.func plain dicts
        assert all(torch.equal(first[k][0], p[k][i]) for k in p)
        assert first["w"].data_ptr() == p["w"][i].data_ptr()  # a view, no copy
        assert all(torch.equal(one(p, i)[k], first[k]) for k in p)
        assert all(torch.equal(member(p, i)[k], p[k][i]) for k in p)
    mask = torch.tensor([True, False, True])
    assert all(torch.equal(select(p, mask)[k], torch.stack([p[k][0], p[k][2]])) for k in p)
    assert torch.equal(s.select(slice(1, 3))["b"], p["b"][1:3])
    assert one(None, 0) is None


def test_the_single_member_check():
    first = Stacked(_stack()).one(1)
    assert check_single(first) is first and first.check_single() is first
    for f in (lambda: check_single(_stack(), "the centre"),
              lambda: Stacked(_stack()).check_single("the centre")):
        with pytest.raises(ValueError, match=r"the centre must be a single member \(1, ...\), "
                                             "got 3 members"):
            f()


def test_flatten_is_the_concatenation_in_dict_order_and_unflatten_inverts_it():
    p = _stack()
    f = flatten(p)
    oracle = torch.stack([torch.cat([p["w"][i].reshape(-1), p["b"][i]]) for i in range(3)])
    assert torch.equal(f, oracle) and torch.equal(Stacked(p).flatten(), oracle)
    back = Stacked(p).unflatten(f[:2])  # K = 2 rows in the layout of a 3-member stack
    assert isinstance(back, Stacked) and list(back) == ["w", "b"]
    assert all(torch.equal(unflatten(f[:2], p)[k], back[k]) for k in p)
    assert all(torch.equal(back[k], p[k][:2]) for k in p)
    with pytest.raises(ValueError, match=r"expected \(K, 6\) flat parameters, got \(3, 5\)"):
        unflatten(f[:, :5], p)


def test_stack_of_models_and_torch_func_treat_it_as_a_dict():
    net = torch.nn.Linear(2, 1).double()
    models = [{k: v.detach() + i for k, v in net.named_parameters()} for i in range(3)]
    s = Stacked.of(models)
    assert isinstance(s, Stacked) and s.n_members == 3
    assert type(stack(models)) is dict and all(torch.equal(stack(models)[k], s[k]) for k in s)
    assert all(torch.equal(s.member(i)[k], models[i][k]) for i in range(3) for k in s)
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def f(p):
        return functional_call(net, p, (x,)).sum()

    plain = vmap(grad(f))(dict(s))
    mapped = vmap(grad(f))(s)
    assert isinstance(mapped, Stacked)
    assert all(torch.equal(mapped[k], plain[k]) for k in s)
    for i in range(3):  # the loop oracle
        g = torch.func.grad(f)(models[i])
        assert all(torch.allclose(mapped[k][i], g[k], rtol=0, atol=1e-12) for k in s)
