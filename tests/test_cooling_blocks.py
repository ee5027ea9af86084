"""Gaussian cooling in blocks of replicates: block identity seeds, pooled interval, tasks.

Oracles: the unblocked :func:`cooling_volume` (one block is exactly it), a box of
known volume (coverage of the pooled interval over seeds), and the unsplit basin
estimate of a trained net (blocks as executor tasks must give it bit for bit).
"""

from __future__ import annotations

import json

import pytest
import torch

from minefield import ModelConfig, VolumeConfig, basin_run, train_run
from minefield.bodies import Box, Ellipsoid, log_spaced_axes
from minefield.config import ConfigError
from minefield.cooling import cooling_volume
from minefield.cooling_blocks import block_replicates, cooling_block, cooling_cost, merge_blocks
from minefield.executor import LocalExecutor
from minefield.precondition import Preconditioner
from minefield.volume import VolumeEstimate

pytestmark = pytest.mark.filterwarnings("ignore::minefield.basin.BasinWarning")
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_replicates_are_shared_evenly():
    assert block_replicates(8, 3) == [3, 3, 2] and block_replicates(8, 1) == [8]
    with pytest.raises(ConfigError, match="7 replicates cannot make 4 blocks of at least 2"):
        block_replicates(7, 4)
    with pytest.raises(ConfigError, match="cannot make 0 blocks"):
        block_replicates(8, 0)


def test_one_block_is_the_unblocked_estimate():
    body = Box(torch.tensor([1.0, 0.5], dtype=F64))
    whole = cooling_volume(body, 2, body.cutoff, 8, 4, _gen(3), 4.0, 1e-3, walk_length=3)
    block = cooling_block(body, 2, body.cutoff, 0, 1, n_chains=8, n_replicates=4,
                          generator=_gen(3), r_max=4.0, rtol=1e-3, walk_length=3)
    assert json.dumps(merge_blocks([block], 1e-3).to_dict()) == json.dumps(whole.to_dict())


def test_a_block_depends_on_its_index_only():
    body = Box(log_spaced_axes(3, 1.0))
    args = dict(seed=5, n_chains=8, n_replicates=6, r_max=10.0, rtol=1e-3, walk_length=3)
    second = cooling_block(body, 3, body.cutoff, 1, 3, **args)
    again = [cooling_block(body, 3, body.cutoff, j, 3, **args) for j in (2, 1)][1]
    assert second.details["replicates"] == again.details["replicates"]
    first = cooling_block(body, 3, body.cutoff, 0, 3, **args)
    assert first.details["replicates"] != second.details["replicates"]
    merged = merge_blocks([first, second, cooling_block(body, 3, body.cutoff, 2, 3, **args)],
                          1e-3)
    reps = torch.tensor(merged.details["replicates"], dtype=F64)
    assert len(reps) == 6 and merged.details["blocks"] == 3 and merged.n_samples == 48
    assert merged.log_volume == pytest.approx(float(reps.mean() + reps.var() / 2), rel=1e-12)
    with pytest.raises(ConfigError, match="block 3 is not one of the 3 blocks"):
        cooling_block(body, 3, body.cutoff, 3, 3, **args)


@pytest.mark.slow
def test_pooled_blocks_cover_a_box_at_their_rate():
    # 20 seeds of a 95% interval: Binomial(20, 0.95) <= 16 has probability 0.016
    n = 3
    a = log_spaced_axes(n, 1.0)
    body, pre = Box(a), Preconditioner.diagonal(a.pow(-2))
    hits = 0
    for seed in range(20):
        parts = [cooling_block(body, n, body.cutoff, j, 2, seed=seed, n_chains=64,
                               n_replicates=8, r_max=10.0, rtol=1e-3, preconditioner=pre,
                               walk_length=8) for j in range(2)]
        est = merge_blocks(parts, 1e-3)
        hits += est.ci[0] <= body.log_volume <= est.ci[1]
    assert hits >= 17


def test_merge_errors():
    body = Ellipsoid(torch.ones(2, dtype=F64))
    one = cooling_volume(body, 2, body.cutoff, 8, 2, _gen(0), 3.0, 1e-4, walk_length=4)
    with pytest.raises(ConfigError, match="needs the mcmc estimates of one body"):
        merge_blocks([], 1e-4)
    other = cooling_volume(Ellipsoid(torch.ones(3, dtype=F64)), 3, 0.5, 8, 2, _gen(0), 3.0,
                           1e-4, walk_length=4)
    with pytest.raises(ConfigError, match="needs the mcmc estimates of one body"):
        merge_blocks([one, other], 1e-4)


def test_volume_config_blocks_errors():
    with pytest.raises(ConfigError, match="mcmc_blocks=2 needs the mcmc estimator"):
        VolumeConfig(mcmc_blocks=2)
    with pytest.raises(ConfigError, match="at least 2 of the 8 replicates per block"):
        VolumeConfig(estimator="mcmc", mcmc_blocks=5)
    assert "mcmc_blocks" not in VolumeConfig().to_dict()  # old basin keys stay valid


def mcmc_cfg() -> VolumeConfig:
    return VolumeConfig(estimator="mcmc", n_chains=8, n_replicates=4, walk_length=3,
                        r_max=1.0, mcmc_blocks=2)


def test_basin_blocks_as_tasks_equal_the_unsplit_estimate(tiny, tmp_path):
    small = tiny(members=2, steps=30)  # 2 small members (n = 9): a short walk per chain
    train_run(small.replace(model=ModelConfig(widths=(3,))), tmp_path, progress=False)
    whole = basin_run("tiny", mcmc_cfg(), tag="whole", root=tmp_path, n_rollouts=0)
    split = basin_run("tiny", mcmc_cfg(), tag="tasks", root=tmp_path, n_rollouts=0,
                      executor=LocalExecutor())
    assert json.dumps([m.to_dict() for m in whole.members]) == \
        json.dumps([m.to_dict() for m in split.members])
    assert whole.members[0].diagnostics["blocks"] == 2
    assert len(whole.members[0].diagnostics["replicates"]) == 4
    tasks = sorted(p.name for p in (tmp_path / "tiny/basin/tasks.tasks").glob("*.s*"))
    assert tasks == [f"m000{i}-b000{j}.safetensors" for i in range(2) for j in range(2)]


@pytest.mark.parametrize("body, chains, reps, walk", [
    (Ellipsoid(torch.ones(4, dtype=torch.float64)), 8, 4, None),
    (Box(log_spaced_axes(6, 1.0)), 6, 3, 4)])
def test_cost_bound_holds_on_real_runs(body, chains, reps, walk):
    # the bound is what a run needs at least: phases and evaluations of actual runs
    n = len(body.a)
    est = cooling_volume(body, n, body.cutoff, chains, reps, _gen(5), 4.0, 1e-6,
                         walk_length=walk)
    bound = cooling_cost(n, chains, reps, walk)
    assert est.details["phases"] >= bound.phases
    assert est.n_evaluations >= bound.evaluations
    assert bound.hours(bound.evaluations / 3600) == pytest.approx(1.0)


def test_cost_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="cooling_cost needs"):
        cooling_cost(10, max_step=1.0)


def test_merged_blocks_never_exceed_the_volume_within_r_max():
    # two blocks whose replicates disagree by 8 nats: Cox's estimate of the pool (mean
    # -6 + s^2/2 = +4.7) lay above the r_max ball (log V 0.5 here); now it stops there
    def part(reps):
        return VolumeEstimate("mcmc", -6.0, (-7.0, -5.0), 0.95, 3, 10.0, 8, float("nan"), 0,
                              100, [], {"replicates": reps, "phases": 1, "betas": [1.0, 0.0],
                                        "sigma0": 0.1, "walk_length": 10,
                                        "walk": "coordinate", "lag_correlation": 0.0,
                                        "log_ball_ratio": -6.5})
    est = merge_blocks([part([-10.0, -10.0]), part([-2.0, -2.0])], rtol=1e-6)
    assert est.log_volume == pytest.approx(0.5) and est.ci[1] == pytest.approx(0.5 + 3e-6)
    assert est.ci[0] < -6.0 and est.details["log_ball_ratio"] == pytest.approx(0.0)
    assert any("exceeds the volume within r_max" in w for w in est.warnings)
