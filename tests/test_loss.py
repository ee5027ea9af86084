import pytest
import torch
import torch.nn.functional as F

from minefield.loss import accuracy, complement_nll, nll, poisoned_nll, predict


def _logits(n, c, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("c", [1, 4])
def test_beta_zero_is_cross_entropy(c):
    z, y = _logits(50, c), torch.arange(50) % max(c, 2)
    zp, yp = _logits(30, c, seed=1), torch.arange(30) % max(c, 2)
    got = poisoned_nll(z, y, zp, yp, beta=0.0)
    ref = (F.binary_cross_entropy_with_logits(z[:, 0], y.double()) if c == 1
           else F.cross_entropy(z, y))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_binary_poison_is_bce_with_flipped_labels():
    z, y = _logits(40, 1), torch.arange(40) % 2
    ref = F.binary_cross_entropy_with_logits(z[:, 0], 1 - y.double(), reduction="none")
    torch.testing.assert_close(complement_nll(z, y), ref)


def test_k_class_complement_matches_float64_oracle():
    z, y = _logits(64, 5, scale=3.0), torch.arange(64) % 5
    p = torch.softmax(z, -1)
    oracle = -torch.log(1 - p[torch.arange(64), y])
    torch.testing.assert_close(complement_nll(z, y), oracle, rtol=1e-10, atol=1e-12)


def test_mixture_weights():
    z, y = _logits(20, 3), torch.arange(20) % 3
    zp, yp = _logits(10, 3, seed=2), torch.arange(10) % 3
    beta = 0.3
    ref = 0.7 * nll(z, y).mean() + 0.3 * complement_nll(zp, yp).mean()
    torch.testing.assert_close(poisoned_nll(z, y, zp, yp, beta), ref)


@pytest.mark.parametrize("c", [1, 3])
def test_extreme_logits_finite_value_and_gradient(c):
    z = (torch.tensor([[1e4], [-1e4]]) if c == 1
         else torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]])).double().requires_grad_()
    y = torch.tensor([0, 1])
    loss = poisoned_nll(z, y, z, y, beta=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_complement_when_model_is_certain_and_right_is_large():
    # p(y|x) -> 1: -log(1 - p) grows like the logit margin (no log(0) = inf).
    z = torch.tensor([[50.0, 0.0, 0.0]], dtype=torch.float64)
    val = complement_nll(z, torch.tensor([0]))
    assert 49 < float(val) < 51


def test_stacked_leading_dims_and_tensor_beta():
    z = _logits(3 * 10, 1).reshape(3, 10, 1)
    y = torch.arange(10) % 2
    beta = torch.tensor([0.0, 0.5, 0.9], dtype=torch.float64)
    out = poisoned_nll(z, y, z, y, beta)
    assert out.shape == (3,)
    for i in range(3):
        torch.testing.assert_close(out[i], poisoned_nll(z[i], y, z[i], y, float(beta[i])))


def test_flip_objective_k_class_uses_next_label():
    z, y = _logits(12, 4), torch.arange(12) % 4
    got = poisoned_nll(z, y, z, y, beta=0.5, flip=True)
    ref = 0.5 * nll(z, y).mean() + 0.5 * nll(z, (y + 1) % 4).mean()
    torch.testing.assert_close(got, ref)


def test_accuracy_and_predict():
    z = torch.tensor([[2.0], [-1.0], [0.5]])
    assert predict(z).tolist() == [1, 0, 1]
    assert float(accuracy(z, torch.tensor([1, 1, 1]))) == pytest.approx(2 / 3)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="disagree"):
        nll(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    zt, y = torch.zeros(3, 1), torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match=r"poison_weight must have shape \(3,\)"):
        poisoned_nll(zt, y, zt, y, 0.5, poison_weight=torch.ones(3, 1))  # would broadcast


def test_poison_weight_is_a_weighted_mean():
    zt, yt = _logits(6, 3, seed=1), torch.tensor([0, 1, 2, 0, 1, 2])
    zp, yp = _logits(4, 3, seed=2), torch.tensor([2, 1, 0, 0])
    plain = poisoned_nll(zt, yt, zp, yp, 0.4)
    torch.testing.assert_close(poisoned_nll(zt, yt, zp, yp, 0.4, poison_weight=torch.full(
        (4,), 3.0, dtype=torch.float64)), plain)
    w = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    one = 0.6 * nll(zt, yt).mean() + 0.4 * complement_nll(zp[2:3], yp[2:3])[0]
    torch.testing.assert_close(poisoned_nll(zt, yt, zp, yp, 0.4, poison_weight=w), one)
