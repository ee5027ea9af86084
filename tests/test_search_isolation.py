"""A search's minima do not depend on how its members are grouped (issue 13, item 2).

The oracle is the slow obvious computation: each member searched alone, in a
stack of one. Isolated steps (:func:`minefield.step.isolated`) must equal it bit
for bit, in float64 and float32, in stacks of every size and at every position;
so must whole searches batched 1, 2, 3 or all at a time, a search killed at every
boundary (after each saved minimum, and while a stack trains) and resumed with
another ``--max-batch``, and the issue's own command with ``--max-batch 1`` and
``2`` (at a small scale).
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from click.testing import CliRunner

from minefield.cli import main
from minefield.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from minefield.data import load_dataset
from minefield.functional import member, stack
from minefield.lock import release
from minefield.models import build_model
from minefield.runs import Run, RunError
from minefield.search import SearchConfig, StopRule, search_minima
from minefield.stages import search_run, train_run
from minefield.step import Batch, Hyper, isolated, train_step
from minefield.train import fit, init_stack, make_optimizer

_STAGE = importlib.import_module("minefield.stages.search")

# --- one step --------------------------------------------------------------------------------

# (dataset, model config): a one-output sigmoid MLP (gemv vs gemm), ten classes with tanh
# (log-sum-exp), and a CNN (the vmap path)
_MODELS = {
    "binary-relu": ("spiral", ModelConfig(widths=(25, 25))),
    "digits-tanh": ("digits", ModelConfig(widths=(16,), activation="tanh")),
    "cnn": ("digits", ModelConfig(name="cnn", widths=(4, 4))),
}


def _step_problem(kind: str, dtype: torch.dtype, m: int):
    name, mcfg = _MODELS[kind]
    sizes = {} if name == "spiral" else {"n_train": 50, "n_test": 10, "n_poison": 30}
    data = load_dataset(DataConfig(name, **sizes))  # the spiral's sizes are the paper's
    data = data.to("cpu", dtype)
    model = build_model(mcfg, data.input_shape, data.n_classes).to(dtype)
    p = {k: v.to(dtype) for k, v in init_stack(model, "glorot_uniform", range(m)).items()}
    batch = Batch(torch.cat([data.x_train, data.x_poison]), data.y_train, data.y_poison)
    return model, p, batch


def _steps(model, params, batch, idx: list[int], n: int = 3):
    """``n`` isolated Adam steps of members ``idx`` (each with its own beta and l2)."""
    leaves = {k: v[idx].clone().requires_grad_() for k, v in params.items()}
    opt = make_optimizer(TrainConfig(lr=0.01), list(leaves.values()))
    beta, l2 = 0.2 + 0.05 * torch.tensor(idx), 1e-3 * (1 + torch.tensor(idx))
    hyper = Hyper(beta, l2, clip_norm=0.5, flip=True, isolated=True)
    losses = [train_step(model, leaves, {}, opt, batch, hyper, isolated()) for _ in range(n)]
    return torch.stack(losses), {k: v.detach() for k, v in leaves.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", sorted(_MODELS))
def test_an_isolated_step_is_the_same_in_every_stack(kind, dtype):
    torch.set_num_threads(1)
    model, p, batch = _step_problem(kind, dtype, 5)
    alone = [_steps(model, p, batch, [i]) for i in range(5)]
    for m in (2, 3, 5):
        for off in range(0, 6 - m):
            losses, got = _steps(model, p, batch, list(range(off, off + m)))
            for j in range(m):
                want_loss, want = alone[off + j]
                assert losses[:, j].equal(want_loss[:, 0]), (m, off, j)
                for k in got:  # bit for bit
                    assert got[k][j].equal(want[k][0]), (m, off, j, k)


def test_isolated_clipping_and_beta_are_each_members_own():
    model, p, batch = _step_problem("binary-relu", torch.float64, 2)
    _, both = _steps(model, p, batch, [0, 1])
    # a member with a huge gradient (clipped hard) does not change its neighbour
    wild = {k: torch.stack([v[0], 50 * v[1]]) for k, v in p.items()}
    _, mixed = _steps(model, wild, batch, [0, 1])
    assert all(mixed[k][0].equal(both[k][0]) for k in both)
    assert not mixed["0.weight"][1].equal(both["0.weight"][1])


# --- whole searches -------------------------------------------------------------------------


def _search_problem(m: int, dtype: torch.dtype):
    data = load_dataset(DataConfig("blobs", n_train=40, n_test=40, n_poison=40))
    model = build_model(ModelConfig(widths=(8, 8)), data.input_shape, data.n_classes).to(dtype)
    p = {k: v.to(dtype) for k, v in init_stack(model, "glorot_uniform", range(m)).items()}
    g = torch.Generator().manual_seed(5)
    extra = (torch.randn(30, 2, generator=g, dtype=dtype), torch.randint(0, 2, (30,),
                                                                        generator=g))
    # everything that could couple members: per-member adaptive beta, target stopping with
    # compaction, minibatches, fresh poison points, clipping and l2
    cfg = SearchConfig.make(steps=150, lr=0.02, milestones=(120,), log_every=10, compact_every=30,
                            beta=0.4, target_train=1.0, target_poison_acc=0.9, poison_cap=0.93,
                            beta_step=0.05, adapt_from=0, batch_size=16, clip_norm=5.0, l2=1e-4,
                            extra_poison=30, extra_share=0.2)
    return model, p, data.to("cpu", dtype), cfg, extra


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_search_minima_do_not_depend_on_batching(dtype):
    torch.set_num_threads(1)
    model, p, data, cfg, extra = _search_problem(5, dtype)
    seeds = [7, 8, 9, 10, 11]
    ref = search_minima(model, p, data, cfg, seeds, extra=extra)
    # the members really differ in when they stop and how far their beta was raised
    assert len(set(ref.steps.tolist())) > 1 and len(set(ref.betas.tolist())) > 1
    for cap in (1, 2, 3):
        parts = [search_minima(model, {k: v[i:i + cap] for k, v in p.items()}, data, cfg,
                               seeds[i:i + cap], extra=extra) for i in range(0, 5, cap)]
        assert torch.cat([r.steps for r in parts]).equal(ref.steps)
        assert torch.cat([r.betas for r in parts]).equal(ref.betas)
        for k in p:  # bit for bit, float32 included
            assert torch.cat([r.params[k] for r in parts]).equal(ref.params[k]), (cap, k)
        for k in ref.metrics:
            assert torch.cat([r.metrics[k] for r in parts]).equal(ref.metrics[k]), (cap, k)
    one = search_minima(model, stack([member(p, 3)]), data, cfg, [seeds[3]], extra=extra)
    assert all(one.params[k][0].equal(ref.params[k][3]) for k in p)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base") / "runs"
    train_run(ExperimentConfig(name="good", data=DataConfig("blobs", n_train=40, n_test=40,
                                                            n_poison=40),
                               model=ModelConfig(widths=(8, 8)),
                               train=TrainConfig(steps=60, lr=0.05, log_every=20,
                                                 checkpoint_every=20), device="cpu"),
              root, progress=False)
    return root


def _minima(root: Path) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    run = Run(root / "good")
    out = {}
    for p in sorted(run.file("search", "minima").iterdir()):
        ck = run.load_checkpoint(p)
        out[p.name] = (ck.params, ck.meta["row"])
    return out


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler sees it."""


_SEARCH = dict(every=1, start=0, steps=60, lr=0.02, milestones=(), log_every=10,
               compact_every=20, beta=0.3, target_train=1.0, target_poison_acc=0.9,
               poison_cap=0.2, adapt_from=0, stopping=StopRule.TARGET)
# four minima (trajectory steps 0, 20, 40, 60) in stacks of 3 and 1: killed after each of the
# first three saves (the first two fall between saves of one stack), and while each stack trains
_KILLS = [("save", 1), ("save", 2), ("save", 3), ("train", 1), ("train", 2)]


@pytest.mark.parametrize("where,k", _KILLS, ids=[f"{w}{k}" for w, k in _KILLS])
def test_search_killed_at_every_boundary_resumes_to_the_same_minima(base, tmp_path, where, k):
    torch.set_num_threads(1)
    ref_root = tmp_path / "ref"
    shutil.copytree(base, ref_root)
    ref = search_run("good", SearchConfig.make(max_batch=3, **_SEARCH), root=ref_root,
                     device="cpu")
    assert len(ref.rows) == 4
    want = _minima(ref_root)
    root = tmp_path / "killed"
    shutil.copytree(base, root)
    calls = []
    real = {"save": Run.save_checkpoint, "train": _STAGE.search_minima}

    def die_after(*a, **kw):
        calls.append(1)
        if where == "train" and len(calls) == k:
            raise _Killed
        out = real[where](*a, **kw)
        if where == "save" and len(calls) == k:
            raise _Killed
        return out

    target = (mock.patch.object(Run, "save_checkpoint", lambda self, *a, **kw:
                                die_after(self, *a, **kw)) if where == "save" else
              mock.patch.object(_STAGE, "search_minima", die_after))
    with target, pytest.raises(_Killed):
        search_run("good", SearchConfig.make(max_batch=3, **_SEARCH), root=root, device="cpu")
    release(root / "good")  # the killed process's lock dies with it
    saved = len(_minima(root)) if (root / "good" / "search" / "minima").exists() else 0
    assert saved == {"save": k, "train": 3 * (k - 1)}[where]
    # resumed with another grouping: only the missing minima are trained, in stacks of 2
    again = search_run("good", SearchConfig.make(max_batch=2, **_SEARCH), root=root,
                       device="cpu")
    assert again.new == 4 - saved
    got = _minima(root)
    assert got.keys() == want.keys()
    for name, (params, row) in want.items():  # bit for bit
        assert row == got[name][1], f"{where} {k}: {name}"
        assert all(v.equal(got[name][0][p]) for p, v in params.items())
    assert again.rows == ref.rows


def test_the_issues_command_gives_the_same_minima_with_max_batch_1_and_2(base, tmp_path):
    # the issue's `search mf --checkpoints 20,60 --steps 2000 --milestones 1500,1800
    # --adapt-from 500 --max-batch 1` (and 2), at a tenth of the steps on the blobs run
    rows, minima = {}, {}
    for b in ("1", "2"):
        root = tmp_path / f"b{b}"
        shutil.copytree(base, root)
        res = CliRunner().invoke(main, ["--threads", "1", "--root", str(root), "search", "good",
                                        "--checkpoints", "20,60", "--steps", "200",
                                        "--milestones", "150,180", "--adapt-from", "50",
                                        "--max-batch", b, "--device", "cpu", "-q"])
        assert res.exit_code == 0, res.output
        rows[b] = (root / "good" / "search" / "search.csv").read_text()
        minima[b] = _minima(root)
    assert rows["1"] == rows["2"]
    for name, (params, _) in minima["1"].items():
        assert all(v.equal(minima["2"][name][0][p]) for p, v in params.items()), name


def test_a_batched_search_resumes_only_with_its_own_grouping(base, tmp_path):
    # isolate=False: rounding depends on the stack, so another --max-batch is another search
    root = tmp_path / "runs"
    shutil.copytree(base, root)
    cfg = SearchConfig.make(max_batch=3, isolate=False, **_SEARCH)
    with mock.patch.object(_STAGE, "search_minima", side_effect=[_Killed]), \
            pytest.raises(_Killed):
        search_run("good", cfg, root=root, device="cpu")
    release(root / "good")
    key = json.loads((root / "good" / "search" / "config.json").read_text())["search"]
    assert key["isolate"] is False and key["max_batch"] == 3
    # nothing saved yet: the new grouping simply starts over
    search_run("good", cfg.replace(max_batch=2), root=root, device="cpu")
    with pytest.raises(RunError, match="holds results for other settings"):
        search_run("good", cfg, root=root, device="cpu")


def test_isolate_is_a_command_line_switch_and_part_of_the_key(base, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(base, root)
    cmd = ["--threads", "1", "--root", str(root), "search", "good", "--checkpoints", "20",
           "--steps", "20", "--milestones", "", "--device", "cpu", "-q"]
    res = CliRunner().invoke(main, [*cmd, "--no-isolate"])
    assert res.exit_code == 0, res.output
    key = json.loads((root / "good" / "search" / "config.json").read_text())["search"]
    assert key["isolate"] is False
    res = CliRunner().invoke(main, cmd)  # isolated: other settings, refused in one line
    assert res.exit_code == 1 and "holds results for other settings" in res.output
    key_isolated = SearchConfig.make(**_SEARCH).to_dict()
    assert key_isolated["isolate"] is True


def test_an_isolated_fit_runs_on_one_thread_and_restores_the_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model, p, data, cfg, _ = _search_problem(2, torch.float64)
        seen = []
        fit(model, p, data, cfg.train.replace(steps=3, log_every=1, checkpoint_every=3), 0.3,
            isolated=True, on_log=lambda step, rows: seen.append(torch.get_num_threads()))
        assert seen == [1, 1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --- speculative retries -----------------------------------------------------------------------

def test_speculative_retries_give_each_search_its_sequential_result_bit_for_bit():
    """Training every first retry alongside its search (on CUDA by default) must not
    change any search's result: isolated members do not depend on their stack, and the
    spare attempts of searches that did not fail are dropped."""
    data = load_dataset(DataConfig("blobs", n_train=40, n_test=40, n_poison=40)).to(
        "cpu", torch.float64)
    model = build_model(ModelConfig(widths=(8, 8)), data.input_shape, data.n_classes).double()
    p = {k: v.double() for k, v in init_stack(model, "glorot_uniform", range(6)).items()}
    cfg = SearchConfig.make(steps=120, lr=0.02, milestones=(), log_every=10, compact_every=30,
                            beta=0.25, target_train=1.0, target_poison_acc=0.9,
                            adapt_from=0, continue_below=None, stopping=StopRule.FIXED,
                            poison_cap=0.8, beta_step=0.0, retry_jitter=0.3, retries=2)
    seq = search_minima(model, p, data, cfg, speculate=False)
    spec = search_minima(model, p, data, cfg, speculate=True)
    assert (seq.attempts > 0).any() and (seq.attempts == 0).any()
    for k in p:
        assert torch.equal(spec.params[k], seq.params[k]), k
    for k in seq.metrics:
        assert torch.equal(spec.metrics[k], seq.metrics[k]), k
    for name in ("steps", "betas", "attempts"):
        assert torch.equal(getattr(spec, name), getattr(seq, name)), name
    auto = search_minima(model, p, data, cfg)  # on the CPU: no speculation
    assert torch.equal(auto.params["0.weight"], seq.params["0.weight"])


def test_a_diverging_spare_attempt_does_not_sink_searches_that_never_retry():
    """A spare attempt trains only by speculation: when it diverges, the searches get
    what they get sequentially (here: none failed, so no retry ever runs), not an error."""
    data = load_dataset(DataConfig("blobs", n_train=40, n_test=40, n_poison=40)).to(
        "cpu", torch.float64)
    model = build_model(ModelConfig(widths=(8,)), data.input_shape, data.n_classes).double()
    p = {k: v.double() for k, v in init_stack(model, "glorot_uniform", range(3)).items()}
    cfg = SearchConfig.make(steps=20, lr=0.02, milestones=(), log_every=10, compact_every=10,
                            beta=0.25, stopping=StopRule.FIXED, poison_cap=1.0,
                            retry_jitter=1e200, retries=1, isolate=False)
    seq = search_minima(model, p, data, cfg, speculate=False)
    spec = search_minima(model, p, data, cfg, speculate=True)
    assert (seq.attempts == 0).all()
    for k in p:
        assert torch.equal(spec.params[k], seq.params[k]), k
