"""``fit`` on a stack of 3 members against 3 plain runs: one ``nn.Sequential``, ``torch.optim``,
a Python loop over minibatches and poison batches, the poisoned loss written out from its
formula, ``clip_grad_norm_`` and a hand-set step schedule; float64, to 1e-10."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from minefield import ModelConfig
from minefield.config import TrainConfig
from minefield.data import Dataset
from minefield.models import build_model
from minefield.train import fit, init_stack


def _data(k: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(44, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (44,), generator=g)
    return Dataset("toy", x[:23], y[:23], x[34:], y[34:], x[23:34], y[23:34], k)


def _rows(n: int, bs: int, seed: int, step: int) -> torch.Tensor:
    if bs >= n:
        return torch.arange(n)
    epoch, k = divmod(step, math.ceil(n / bs))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * bs:(k + 1) * bs]


def _alone(mc, p0, data, cfg, beta, lr, l2):
    net = build_model(mc, (2,), data.n_classes).double()
    with torch.no_grad():
        for k, v in net.named_parameters():
            v.copy_(p0[k])
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=lr, momentum=cfg.momentum),
           "adam": lambda p: torch.optim.Adam(p, lr=lr),
           "rmsprop": lambda p: torch.optim.RMSprop(p, lr=lr, alpha=0.9, eps=1e-7),
           }[cfg.optimizer.value](net.parameters())
    n_t, n_p = len(data.y_train), len(data.y_poison)
    bs = cfg.batch_size or n_t
    bs_p = cfg.poison_batch_size or (n_p if bs >= n_t else math.ceil(n_p * bs / n_t))

    def ce(z, y):  # -log p(y|x), per point
        if z.shape[-1] == 1:
            return F.binary_cross_entropy_with_logits(z[:, 0], y.double(), reduction="none")
        return F.cross_entropy(z, y, reduction="none")

    def wrong(z, y):  # -log(1 - p(y|x)), per point, straight from the probabilities
        if z.shape[-1] == 1:
            return ce(z, 1 - y)
        return -torch.log1p(-torch.softmax(z, -1).gather(1, y[:, None])[:, 0])

    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr * cfg.gamma ** sum(step >= m for m in cfg.milestones)
        it = _rows(n_t, bs, cfg.seed, step)
        loss = ce(net(data.x_train[it]), data.y_train[it]).mean()
        if beta > 0:
            ip = _rows(n_p, bs_p, cfg.seed + 1, step)
            bad = wrong(net(data.x_poison[ip]), data.y_poison[ip]).mean()
            loss = (1 - beta) * loss + beta * bad
        loss = loss + l2 * sum(w.pow(2).sum() for w in net.parameters() if w.dim() >= 2)
        opt.zero_grad()
        loss.backward()
        if cfg.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_norm)
        opt.step()
    return {k: v.detach() for k, v in net.named_parameters()}


@pytest.mark.parametrize("k, kw", [
    (2, {"optimizer": "adam"}),
    (3, {"optimizer": "adam", "batch_size": 5, "poison_batch_size": 3, "clip_norm": 0.05}),
    (2, {"optimizer": "sgd", "batch_size": 7, "milestones": (0, 5, 100), "gamma": 0.5}),
    (3, {"optimizer": "sgd", "momentum": 0.0, "batch_size": 6, "poison_batch_size": 50}),
    (2, {"optimizer": "rmsprop", "batch_size": 4, "clip_norm": 0.1, "milestones": (9,)}),
])
def test_stack_equals_members_trained_alone_with_torch_optim(k, kw):
    torch.set_num_threads(1)
    data, mc = _data(k), ModelConfig(widths=(5, 4))
    model = build_model(mc, (2,), k).double()
    cfg = TrainConfig(steps=20, log_every=1000, checkpoint_every=1000, **kw)
    p0 = {n: v.double() for n, v in init_stack(model, "torch", [1, 2, 3]).items()}
    betas, lrs, l2s = [0.0, 0.3, 0.6], [0.05, 0.02, 0.01], [0.0, 1e-3, 1e-2]
    res = fit(model, p0, data, cfg, torch.tensor(betas, dtype=torch.float64), lrs=lrs, l2s=l2s)
    for i in range(3):
        ref = _alone(mc, {n: v[i] for n, v in p0.items()}, data, cfg, betas[i], lrs[i], l2s[i])
        for n, v in ref.items():
            torch.testing.assert_close(res.params[n][i], v, rtol=0, atol=1e-10)


def test_a_batchnorm1d_without_running_statistics_trains_as_torch_optim_does():
    """Full batch, SGD with momentum, no poison: fit's one-input output-count check raised
    torch's "Expected more than 1 value per channel" for this model (hunt 36)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4),
                                torch.nn.BatchNorm1d(4, track_running_stats=False),
                                torch.nn.ReLU(), torch.nn.Linear(4, 3)).double()
    data = _data(3)
    ref = copy.deepcopy(model).train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(ref(data.x_train), data.y_train).backward()
        opt.step()
    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, steps=20, log_every=10)
    out = fit(model, {k: v.detach().clone()[None] for k, v in model.named_parameters()},
              data, cfg)
    for k, v in ref.named_parameters():
        torch.testing.assert_close(out.params[k][0], v.detach(), rtol=1e-10, atol=1e-12)
