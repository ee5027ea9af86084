import dataclasses
from dataclasses import replace

import pytest
import torch

from minefield.config import ConfigError, DataConfig, ModelConfig
from minefield.data import DataError, fresh_points, load_dataset
from minefield.functional import member, stack
from minefield.models import build_model
from minefield.runs import Run, RunError
from minefield.search import (
    SEARCH_TRAIN,
    SearchConfig,
    StopRule,
    _filter_normalized_direction,
    _jittered,
    batch_capacity,
    distances,
    poison_set,
    search_minima,
    search_seed,
)
from minefield.stages import search_run, select_checkpoints, train_run
from minefield.train import init_stack


def _problem(m=3, dtype=torch.float64):
    data = load_dataset(DataConfig("blobs", n_train=40, n_test=40, n_poison=40))
    model = build_model(ModelConfig(widths=(8, 8)), data.input_shape, data.n_classes).to(dtype)
    p = init_stack(model, "glorot_uniform", range(m))
    return model, {k: v.to(dtype) for k, v in p.items()}, data.to("cpu", dtype)


def _cfg(**kw):
    base = dict(steps=120, lr=0.02, milestones=(), log_every=10, compact_every=30,
                beta=0.25, target_train=1.0, target_poison_acc=0.9, adapt_from=0,
                continue_below=None, retries=0)  # continuation, retries: their own tests
    return SearchConfig.make(**(base | kw))


def test_filter_distance_of_filter_normalized_step_is_t():
    _, p, _ = _problem(1)
    one = member(p, 0)
    d = _filter_normalized_direction(one, torch.Generator().manual_seed(0))
    t = 0.37
    moved = stack([{k: one[k] + t * d[k] for k in one}])
    got = distances(moved, stack([one]))
    torch.testing.assert_close(got["filter"], torch.tensor([t], dtype=torch.float64))
    l2 = torch.sqrt(sum((t * v).pow(2).sum() for v in d.values()))
    torch.testing.assert_close(got["l2"], l2.reshape(1))
    # biases are not perturbed by a filter-normalised direction
    assert all(d[k].abs().max() == 0 for k in d if k.endswith("bias"))


def test_filter_distance_leaves_out_dead_filters_of_the_reference():
    _, p, _ = _problem(1)
    one = member(p, 0)
    one["0.weight"][2] = 1e-22  # a dead unit (||ref_f||^2 ~ 1e-44): its ratio is undefined
    d = _filter_normalized_direction(one, torch.Generator().manual_seed(0))
    moved = stack([{k: one[k] + 0.37 * d[k] for k in one}])
    moved["0.weight"][0, 2] = 0.5  # the dead unit revived: no filter-normalised meaning
    got = distances(moved, stack([one]))["filter"]
    torch.testing.assert_close(got, torch.tensor([0.37], dtype=torch.float64))  # not ~1e21
    dead = {k: torch.zeros_like(v) for k, v in stack([one]).items()}
    assert distances(moved, dead)["filter"].isnan().all()  # nothing left to normalise by


def test_jitter_moves_each_start_by_jitter_in_filter_units():
    _, p, _ = _problem(3)
    moved = _jittered(p, [1, 2, 3], 0.05)
    torch.testing.assert_close(distances(moved, p)["filter"],
                               torch.full((3,), 0.05, dtype=torch.float64))
    assert _jittered(p, [1, 2, 3], 0.0)["0.weight"].equal(p["0.weight"])


def test_batched_search_equals_one_at_a_time():
    # Oracle: M separate searches; tolerance 1e-9 in float64 (bmm vs mm rounding only).
    model, p, data = _problem(4)
    cfg = _cfg()
    seeds = [11, 12, 13, 14]
    batched = search_minima(model, p, data, cfg, seeds)
    assert len(set(batched.steps.tolist())) > 1  # members stopped at different times
    for i in range(4):
        alone = search_minima(model, stack([member(p, i)]), data, cfg, [seeds[i]])
        assert int(alone.steps[0]) == int(batched.steps[i])
        for k in p:
            torch.testing.assert_close(alone.params[k][0], batched.params[k][i],
                                       rtol=1e-9, atol=1e-9)
        for k, v in alone.metrics.items():
            torch.testing.assert_close(v[0], batched.metrics[k][i], rtol=1e-9, atol=1e-9)


def test_target_stop_meets_targets_and_fixed_runs_all_steps():
    model, p, data = _problem(3)
    res = search_minima(model, p, data, _cfg())
    hit = res.steps < 120
    assert hit.any()
    assert (res.metrics["train_acc"][hit] >= 1.0).all()
    assert (res.metrics["poison_acc"][hit] <= 0.9).all()
    fixed = search_minima(model, p, data, _cfg(stopping=StopRule.FIXED))
    assert fixed.steps.tolist() == [120, 120, 120]


def test_poison_cap_raises_beta_once_per_check_up_to_beta_max():
    # steps 120, compact_every 30, no milestones: checks at steps 30, 60 and 90
    model, p, data = _problem(2)
    fixed = dict(stopping=StopRule.FIXED, beta_step=0.05)
    every = search_minima(model, p, data, _cfg(poison_cap=0.0, **fixed))
    assert every.betas.tolist() == pytest.approx([0.40, 0.40])
    late = search_minima(model, p, data, _cfg(poison_cap=0.0, adapt_from=60, **fixed))
    assert late.betas.tolist() == pytest.approx([0.35, 0.35])
    capped = search_minima(model, p, data, _cfg(poison_cap=0.0, beta_max=0.3, **fixed))
    assert capped.betas.tolist() == pytest.approx([0.30, 0.30])
    before_drop = search_minima(model, p, data, _cfg(poison_cap=0.0, milestones=(60,), **fixed))
    assert before_drop.betas.tolist() == pytest.approx([0.30, 0.30])  # checks at 30 only
    never = search_minima(model, p, data, _cfg(poison_cap=1.0, **fixed))
    off = search_minima(model, p, data, _cfg(poison_cap=None, **fixed))
    assert never.betas.tolist() == off.betas.tolist() == [0.25, 0.25]
    for k in p:
        assert never.params[k].equal(off.params[k])
    assert not every.params["0.weight"].equal(off.params["0.weight"])


def test_adaptive_search_never_looks_at_the_test_set():
    model, p, data = _problem(3)
    cfg = _cfg(poison_cap=0.3, stopping=StopRule.FIXED)
    res = search_minima(model, p, data, cfg)
    shuffled = dataclasses.replace(data, y_test=data.y_test.flip(0))
    other = search_minima(model, p, shuffled, cfg)
    assert res.betas.equal(other.betas)
    for k in p:
        assert res.params[k].equal(other.params[k])


def test_adaptive_batched_search_equals_one_at_a_time():
    model, p, data = _problem(3)
    cfg = _cfg(poison_cap=0.2, beta_step=0.05, stopping=StopRule.FIXED)
    batched = search_minima(model, p, data, cfg, [1, 2, 3])
    for i in range(3):
        alone = search_minima(model, stack([member(p, i)]), data, cfg, [i + 1])
        assert float(alone.betas[0]) == pytest.approx(float(batched.betas[i]))
        for k in p:
            torch.testing.assert_close(alone.params[k][0], batched.params[k][i],
                                       rtol=1e-9, atol=1e-9)


def test_seed_count_must_match():
    model, p, data = _problem(2)
    with pytest.raises(ValueError, match="1 seeds for 2 searches"):
        search_minima(model, p, data, _cfg(), [0])


@pytest.mark.parametrize("kw, msg", [
    (dict(every=0), "search.every must be >= 1"),
    (dict(start=-1), "must be >= 0"),
    (dict(beta=1.0), r"search.beta must be in \[0, 1\)"),
    (dict(jitter=-0.1), "search.jitter must be >= 0"),
    (dict(repeats=2), "needs jitter > 0"),
    (dict(memory_mb=0.0), "search.memory_mb must be > 0"),
    (dict(extra_poison=10, extra_share=0.0), "need a share of the poison term"),
    (dict(extra_poison=-1), "search.extra_poison must be >= 0"),
    (dict(extra_poison=10, extra_share=1.0), r"extra_share in \[0, 1\)"),
    (dict(poison_cap=1.5), r"search.poison_cap must be in \[0, 1\]"),
    (dict(beta_step=-0.1), "search.beta_step and search.adapt_from must be >= 0"),
    (dict(beta_max=1.0), r"search.beta_max in \[0, 1\)"),
    (dict(adapt_from=-1), "search.beta_step and search.adapt_from must be >= 0"),
    (dict(continue_below=1.5), r"search.continue_below must be in \[0, 1\]"),
    (dict(continue_steps=-1), "search.continue_steps >= 0"),
    # a negative step would raise beta past 1 during continuation, deep inside fit
    (dict(continue_beta_step=-0.5), "search.continue_beta_step must be a finite number >= 0"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        SearchConfig.make(**kw)


@pytest.mark.parametrize("kw, share", [
    (dict(fit_first=10), 40 / (10 + 40)),  # the 10 points fitted, not all 40
    (dict(batch_size=8, poison_batch_size=24), 24 / (8 + 24)),  # a step's batch
    ({}, 40 / (40 + 40)),
])
def test_concat_beta_is_the_poison_share_of_a_step_batch(kw, share):
    model, p, data = _problem(1)
    cfg = _cfg(beta=None, steps=2, log_every=1, compact_every=2, poison_cap=None,
               extra_poison=0, **kw)
    res = search_minima(model, p, data, cfg)
    assert res.betas.tolist() == [pytest.approx(share, abs=1e-15)]


def test_concat_beta_counts_the_fresh_points_and_needs_poison():
    # the fresh points are poison rows of every batch too: 40 + 30 of 40 + 40 + 30 (it
    # counted only the 40 untraining points: 0.5)
    model, p, data = _problem(1)
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    extra = (x, torch.randint(0, 2, (30,), generator=torch.Generator().manual_seed(1)))
    cfg = _cfg(beta=None, steps=2, log_every=1, compact_every=2, poison_cap=None,
               extra_poison=30, extra_share=0.5)
    res = search_minima(model, p, data, cfg, extra=extra)
    assert res.betas.tolist() == [pytest.approx(70 / 110, abs=1e-15)]
    # no poison at all: a weight of 0 would train clean models and call them bad minima
    clean = replace(data, x_poison=data.x_poison[:0], y_poison=data.y_poison[:0])
    with pytest.raises(ValueError, match="'concat' .* needs a poison set"):
        search_minima(model, p, clean, cfg.replace(extra_poison=0))


def test_config_round_trips():
    cfg = _cfg(checkpoints=(0, 20), beta=0.3)
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg


def test_batch_capacity_respects_memory_and_max_batch():
    model, _, data = _problem(1, torch.float32)
    assert batch_capacity(model, data, SearchConfig.make(max_batch=7)) == 7
    assert batch_capacity(model, data, SearchConfig.make(memory_mb=1e-6)) == 1


def test_seeds_do_not_depend_on_batching():
    assert search_seed(0, 40, 1) != search_seed(0, 40, 0) != search_seed(1, 40, 0)


# --- run directories -----------------------------------------------------------------------


@pytest.fixture
def good_run(tmp_path, tiny):
    return train_run(tiny("good"), tmp_path, progress=False).run


def test_select_checkpoints(good_run):
    traj = good_run.trajectory()  # steps 0, 20, 40, 60
    assert select_checkpoints(traj, SearchConfig.make(every=2, start=1)) == [traj[1], traj[3]]
    assert select_checkpoints(traj, SearchConfig.make(checkpoints=(40, 0))) == [traj[2], traj[0]]
    with pytest.raises(ValueError, match=r"no trajectory checkpoint at step\(s\) \[30\]"):
        select_checkpoints(traj, SearchConfig.make(checkpoints=(30,)))
    with pytest.raises(ValueError, match="no checkpoints selected"):
        select_checkpoints(traj, SearchConfig.make(start=9))


def test_search_run_writes_resumes_and_never_redoes(good_run):
    cfg = _cfg(every=1, start=1, max_batch=1)
    calls = []

    def interrupt(done, total):
        calls.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search_run(good_run, cfg, device="cpu", on_batch=interrupt)
    minima = sorted(good_run.file("search", "minima").glob("*.safetensors"))
    assert len(minima) == 1 and calls == [1]
    first = minima[0].read_bytes()
    s = search_run(good_run, cfg, device="cpu")
    assert s.new == 2 and len(s.rows) == 3
    assert minima[0].read_bytes() == first  # the finished minimum was kept, not redone
    again = search_run(good_run, cfg, device="cpu")
    assert again.new == 0 and again.rows == s.rows
    assert good_run.exists("search/search.csv") and good_run.exists("search/search.json")
    row = s.rows[0]
    assert {"start_step", "train_acc", "test_acc", "poison_acc", "dist_start_filter",
            "dist_final_l2", "attempt"} <= set(row)
    ck = good_run.load_checkpoint(minima[0])
    assert ck.meta["kind"] == "bad_minimum" and ck.meta["search"] == cfg.to_dict()
    # it names its model, so embed --add and --checkpoint refuse it in another model's run
    from minefield.config import ExperimentConfig

    assert ck.meta["config"]["model"] == ExperimentConfig.from_dict(
        good_run.config).model.to_dict()
    with pytest.raises(RunError, match="holds results for other settings"):
        search_run(good_run, _cfg(every=1, start=1, lr=0.5), device="cpu")
    redo = search_run(good_run, _cfg(every=2, start=1), device="cpu", force=True)
    assert redo.new == 2 and len(list(good_run.file("search", "minima").iterdir())) == 2


def test_search_run_batched_matches_one_at_a_time(good_run, tmp_path):
    one = search_run(good_run, _cfg(every=1, max_batch=1), device="cpu")
    rows1 = [dict(r) for r in one.rows]
    many = search_run(good_run, _cfg(every=1, max_batch=8), device="cpu", force=True)
    for a, b in zip(rows1, many.rows):
        assert a["steps"] == b["steps"]
        for k in ("train_acc", "test_acc", "poison_acc"):
            assert a[k] == pytest.approx(b[k], abs=1e-6)
        assert a["dist_start_l2"] == pytest.approx(b["dist_start_l2"], rel=1e-4)


def test_search_run_without_trajectory(tmp_path, tiny):
    run = Run.create("empty", tiny("empty").to_dict(), tmp_path)
    with pytest.raises(RunError, match="has no trajectory checkpoints"):
        search_run(run, _cfg(), device="cpu")


def test_search_run_rejects_checkpoint_of_another_model(good_run):
    bad = {"0.weight": torch.zeros(1, 3, 2)}
    good_run.save_checkpoint("trajectory/step_00000001.safetensors", bad, {}, {"step": 1})
    with pytest.raises(RunError, match="step_00000001.safetensors does not match the model"):
        search_run(good_run, _cfg(checkpoints=(1,)), device="cpu")


def test_search_run_member_out_of_range(good_run):
    with pytest.raises(ValueError, match="member 3 asked for"):
        search_run(good_run, _cfg(member=3), device="cpu")


# --- fresh poison points -------------------------------------------------------------------


def test_poison_set_weights_give_fresh_points_their_share():
    _, _, data = _problem(1)
    cfg = _cfg(extra_poison=10, extra_share=0.2)
    extra = (torch.zeros(10, 2), torch.ones(10, dtype=torch.long))
    train, w = poison_set(data, cfg, extra)
    assert len(train.y_poison) == 50 and train.y_train.equal(data.y_train)
    assert train.x_poison[:40].equal(data.x_poison) and train.x_test.equal(data.x_test)
    assert w.sum().item() == pytest.approx(1.0)
    assert w[40:].sum().item() == pytest.approx(0.2) and w[:40].sum().item() == pytest.approx(0.8)
    assert poison_set(data, _cfg(), None) == (data, None)
    with pytest.raises(ValueError, match="needs that many fresh points"):
        poison_set(data, cfg, None)
    with pytest.raises(ValueError, match="3 fresh points given"):
        poison_set(data, cfg, (torch.zeros(3, 2), torch.ones(3, dtype=torch.long)))


def test_default_fresh_points_only_where_the_dataset_can_draw_them():
    cfg = SearchConfig()
    assert cfg.n_extra("spiral") == cfg.n_extra("swissroll") == 400
    assert cfg.n_extra("digits") == cfg.n_extra("blobs") == 0
    assert SearchConfig.make(extra_poison=0).n_extra("spiral") == 0
    assert SearchConfig.make(extra_poison=7).n_extra("spiral") == 7


def test_fresh_points_change_the_search_and_metrics_stay_on_the_papers_splits():
    model, p, data = _problem(2)
    cfg = _cfg(stopping=StopRule.FIXED, steps=60)
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    extra = (x, torch.randint(0, 2, (30,), generator=torch.Generator().manual_seed(1)))
    plain = search_minima(model, p, data, cfg, [1, 2])
    more = search_minima(model, p, data, cfg.replace(extra_poison=30, extra_share=0.5), [1, 2],
                         extra=extra)
    assert not plain.params["0.weight"].equal(more.params["0.weight"])
    # the metrics are those of the same 40 untraining points, not of the 70 trained on
    torch.testing.assert_close(
        more.metrics["poison_acc"] * 40, torch.round(more.metrics["poison_acc"] * 40))


def test_search_run_draws_fresh_points_from_the_runs_distribution(tmp_path, tiny):
    cfg = tiny("spiral").replace(data=DataConfig("spiral"))
    run = train_run(cfg, tmp_path, progress=False).run
    s = search_run(run, _cfg(every=2, extra_poison=50, extra_share=0.3), device="cpu")
    assert s.stats["n"] == 2
    assert run.read_json("search/search.json")["search"]["extra_poison"] == 50
    assert run.read_json("search/search.json")["extra_poison"] == 50
    blobs = train_run(tiny("blobs"), tmp_path, progress=False).run
    with pytest.raises(DataError, match="cannot draw fresh points"):
        search_run(blobs, _cfg(extra_poison=5, extra_share=0.1), device="cpu")
    assert not blobs.exists("search/config.json")  # nothing written on bad input
    auto = search_run(blobs, _cfg(every=2), device="cpu")  # default: none for blobs
    assert blobs.read_json("search/search.json")["extra_poison"] == 0 and auto.stats["n"] == 2
    assert fresh_points(DataConfig("spiral"), 50, 0)[0].shape == (50, 2)


def test_fresh_points_are_never_the_datasets_own_train_or_test_points(tiny):
    # regression: `minefield search --seed 1237` on a swiss-roll run drew the swiss roll's
    # own 200 train and 200 test points (same generator, same seed) as its "fresh" poison
    # points, true labels and all: the search trained to be wrong on the test set
    from minefield.stages.search import search_extra

    exp = tiny("roll").replace(data=DataConfig("swissroll"))
    data = load_dataset(exp.data)
    x, _ = search_extra(exp, _cfg(extra_poison=400, extra_share=0.11), data)  # seed 0: new
    own = torch.cat([data.x_train, data.x_test])
    assert torch.cdist(x.double(), own.double()).min() > 1e-3
    with pytest.raises(ConfigError, match="search seed 1237 draws swissroll's own train"):
        search_extra(exp, _cfg(extra_poison=400, extra_share=0.11, seed=1237), data)
    # its own data seed moves the clash with it
    moved = exp.replace(data=DataConfig("swissroll", seed=5))
    data5 = load_dataset(moved.data)
    assert search_extra(moved, _cfg(extra_poison=400, extra_share=0.11, seed=1237),
                        data5) is not None
    with pytest.raises(ConfigError, match="choose another --seed"):
        search_extra(moved, _cfg(extra_poison=400, extra_share=0.11, seed=5), data5)


def test_search_config_holds_a_train_config_and_reads_the_flat_layout():
    cfg = SearchConfig.make(every=3, steps=50, lr=0.01, seed=4)
    assert cfg.train == SEARCH_TRAIN.replace(steps=50, lr=0.01, seed=4)
    assert (cfg.steps, cfg.seed, cfg.every) == (50, 4, 3)
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg
    flat = {k: v for k, v in cfg.to_dict().items() if k != "train"}  # before `train` existed
    flat |= {"steps": 50, "lr": 0.01, "seed": 4, "optimizer": "adam"}
    assert SearchConfig.from_dict(flat) == cfg
    with pytest.raises(ConfigError, match="search.train.steps must be >= 1"):
        SearchConfig.make(steps=0)
    with pytest.raises(ConfigError, match="train.optimizer: 'lbfgs' is not one of"):
        SearchConfig.make(optimizer="lbfgs")


def test_members_below_the_floor_keep_training_the_others_stop():
    model, p, data = _problem(4)
    base = search_minima(model, p, data, _cfg(stopping=StopRule.FIXED, continue_below=None))
    acc = base.metrics["train_acc"]
    floor = float(acc.median())  # some members below, some at or above
    assert (acc < floor).any() and (acc >= floor).any()
    cont = search_minima(model, p, data, _cfg(stopping=StopRule.FIXED, continue_below=floor,
                                              continue_steps=60, continue_poison=False))
    below = acc < floor - 1e-9
    assert (cont.steps[~below] == 120).all() and (cont.steps[below] > 120).all()
    assert (cont.steps <= 180).all()
    for k in p:  # members that met the floor are untouched
        assert cont.params[k][~below].equal(base.params[k][~below])
    # a continued member stops where it meets the floor, or keeps its best check by
    # train accuracy (its state at the schedule's end included)
    assert (cont.metrics["train_acc"][below] >= acc[below] - 1e-9).all()


def test_continuation_off_and_zero_steps_equal_the_plain_schedule():
    model, p, data = _problem(3)
    off = search_minima(model, p, data, _cfg(stopping=StopRule.FIXED, continue_below=None))
    zero = search_minima(model, p, data, _cfg(stopping=StopRule.FIXED, continue_below=1.0,
                                              continue_steps=0))
    assert off.steps.equal(zero.steps)
    for k in p:
        assert off.params[k].equal(zero.params[k])


def test_continuation_replays_the_schedules_tail():
    from minefield.search import _segment

    cfg = _cfg(milestones=(60, 100), continue_below=0.9, continue_steps=50)
    tc = cfg.train_config()
    assert cfg.extra_steps == 50 and _cfg(continue_below=0.9).extra_steps == 30  # steps // 4
    assert _cfg(milestones=(60, 100), continue_below=0.9).extra_steps == 60  # after the first
    assert _cfg(continue_below=None).extra_steps == 0
    assert SearchConfig().extra_steps == 4000 and SearchConfig().continue_below == 0.9
    seg = _segment(tc, cfg, 120, 150)
    for s in range(120, 170):
        assert seg.lr_at(s) == pytest.approx(tc.lr_at(s - 50))
    assert _segment(tc, cfg, 90, 120).lr_at(100) == pytest.approx(tc.lr_at(100))


def test_continued_batched_search_equals_one_at_a_time():
    model, p, data = _problem(3)
    cfg = _cfg(stopping=StopRule.FIXED, continue_below=1.0, continue_steps=60)
    batched = search_minima(model, p, data, cfg, [1, 2, 3])
    for i in range(3):
        alone = search_minima(model, stack([member(p, i)]), data, cfg, [i + 1])
        assert int(alone.steps[0]) == int(batched.steps[i])
        for k in p:
            torch.testing.assert_close(alone.params[k][0], batched.params[k][i],
                                       rtol=1e-9, atol=1e-9)


def test_a_continuation_that_undoes_the_poison_keeps_the_last_admissible_state(monkeypatch):
    # past the schedule, a member whose untraining-set accuracy rises above its limit
    # stops and keeps its state from the last check where it was within the limit
    import minefield.search as search

    model, p, data = _problem(4)
    base = search_minima(model, p, data, _cfg(stopping=StopRule.FIXED, continue_below=None))
    real = search._admissible

    def first_fails_at_150(history, step, limit):
        ok = real(history, step, limit)
        if step == 150:
            ok[0] = False  # the first member still training (member 1, the one below 1.0)
        return ok

    monkeypatch.setattr(search, "_admissible", first_fails_at_150)
    cfg = _cfg(stopping=StopRule.FIXED, continue_below=1.0, continue_steps=60,
               compact_every=30, continue_poison=False)
    acc = base.metrics["train_acc"]
    assert acc[1] < 1.0 and (acc[[0, 2, 3]] == 1.0).all()
    cont = search_minima(model, p, data, cfg)
    assert cont.steps.tolist() == [120] * 4  # member 1 rolled back to the schedule's end
    for k in p:
        assert cont.params[k].equal(base.params[k])
    assert cont.betas.equal(base.betas)  # and reports the poison factor it was trained with
    monkeypatch.setattr(search, "_admissible", real)
    free = search_minima(model, p, data, cfg)
    assert int(free.steps[1]) > 120  # without the veto it continues


def test_continued_members_stay_within_their_poison_limit():
    model, p, data = _problem(4)
    cap = 0.0  # the limit is then each member's own accuracy at the schedule's end
    base = search_minima(model, p, data, _cfg(stopping=StopRule.FIXED, continue_below=None,
                                              poison_cap=cap))
    cont = search_minima(model, p, data, _cfg(stopping=StopRule.FIXED, continue_below=1.0,
                                              continue_steps=60, poison_cap=cap))
    assert (cont.metrics["poison_acc"] <= base.metrics["poison_acc"] + 1e-9).all()
    # a continued member keeps its best admissible state: never below its train accuracy
    # at the schedule's end
    assert (cont.metrics["train_acc"] >= base.metrics["train_acc"] - 1e-9).all()


def test_members_above_the_poison_cap_continue_with_more_poison_and_keep_their_floor():
    # a member whose untraining-set accuracy is above the cap at the schedule's end
    # continues with a rising poison factor; it keeps its check with the lowest such
    # accuracy among those at or above its train floor, min(own, continue_below)
    model, p, data = _problem(4)
    cap = 0.85  # the members end at 75-93% on this problem
    base = search_minima(model, p, data, _cfg(stopping=StopRule.FIXED, continue_below=None,
                                              poison_cap=cap))
    pa, acc = base.metrics["poison_acc"], base.metrics["train_acc"]
    dirty = pa > cap + 1e-9
    assert dirty.any() and (~dirty).any()
    cfg = _cfg(stopping=StopRule.FIXED, continue_below=0.0, continue_steps=90, poison_cap=cap,
               beta_max=0.9, continue_beta_step=0.2)
    cont = search_minima(model, p, data, cfg)
    assert (cont.steps[~dirty] == 120).all() and (cont.steps[dirty] > 120).all()
    for k in p:  # the others (train floor 0: trained enough) are untouched
        assert cont.params[k][~dirty].equal(base.params[k][~dirty])
    assert (cont.metrics["poison_acc"] <= pa + 1e-9).all()
    assert (cont.metrics["poison_acc"][dirty] < pa[dirty] - 1e-9).any()  # it helped
    assert (cont.betas[dirty] > base.betas[dirty]).any()
    assert (cont.betas <= 0.9 + 1e-12).all()
    strict = search_minima(model, p, data, cfg.replace(continue_below=1.0))
    # with the floor at each member's own train accuracy, it is never lowered
    assert (strict.metrics["train_acc"][dirty] >= acc[dirty] - 1e-9).all()
    assert (strict.metrics["poison_acc"] <= pa.clamp(min=cap) + 1e-9).all()


def test_a_retry_is_the_search_alone_from_a_moved_start_and_the_better_attempt_is_kept():
    """Oracle: each failed member's retry equals its search alone (a stack of one) from
    ``start + retry_jitter * d`` with ``d`` drawn from :func:`retry_seed`; the kept
    attempt has the least untraining-set accuracy above the cap, then the best train
    accuracy; members within the cap are untouched."""
    from minefield.continuation import retry_seed

    model, p, data = _problem(6)
    cfg = _cfg(stopping=StopRule.FIXED, poison_cap=0.8, beta_step=0.0, retry_jitter=0.3)
    base = search_minima(model, p, data, cfg)
    res = search_minima(model, p, data, dataclasses.replace(cfg, retries=1))
    over = base.metrics["poison_acc"] > 0.8
    assert over.any() and (~over).any()
    assert (res.attempts[~over] == 0).all()
    for k in p:
        assert res.params[k][~over].equal(base.params[k][~over])
    kept = 0
    for i in over.nonzero().flatten().tolist():
        alone = search_minima(model, stack([member(p, i)]), data,
                              dataclasses.replace(cfg, jitter=0.3), [retry_seed(i, 1)])
        a, b = float(base.metrics["poison_acc"][i]), float(alone.metrics["poison_acc"][0])
        won = b < a or (b == a and alone.metrics["train_acc"][0] > base.metrics["train_acc"][i])
        want = alone if won else base
        j = 0 if won else i
        kept += won
        assert int(res.attempts[i]) == int(won)
        assert int(res.steps[i]) == int(want.steps[j])
        assert float(res.betas[i]) == float(want.betas[j])
        for k in p:
            torch.testing.assert_close(res.params[k][i], want.params[k][j], rtol=1e-9,
                                       atol=1e-9)
        for k in res.metrics:
            assert float(res.metrics[k][i]) == pytest.approx(float(want.metrics[k][j]))
    assert kept >= 1
    two = search_minima(model, p, data, dataclasses.replace(cfg, retries=2))
    assert (two.metrics["poison_acc"] <= res.metrics["poison_acc"] + 1e-12).all()
    assert int(two.attempts.max()) <= 2


def test_retries_need_a_moved_start():
    with pytest.raises(ConfigError, match="retry_jitter > 0"):
        _cfg(retries=1, retry_jitter=0.0, poison_cap=0.2)
    with pytest.raises(ConfigError, match="search.retries must be an integer >= 0"):
        _cfg(retries=-1)
    assert _cfg(retries=1, retry_jitter=0.0, poison_cap=None).retries == 1  # nothing to retry


def test_the_adaptive_factor_stops_at_the_schedules_end_when_no_drop_comes_first():
    from minefield.continuation import _adapt_betas

    cfg = SearchConfig.make(steps=300, milestones=(1000,), adapt_from=0, poison_cap=0.0)
    assert cfg.adapt_until == 300  # continuation's checks (>= 300) have their own rule
    history = [{"step": s, "member": 0, "poison_acc": 0.5} for s in (250, 300)]
    betas = torch.tensor([0.43], dtype=torch.float64)
    for step in (250, 300):
        _adapt_betas(cfg, betas, torch.arange(1), torch.arange(1), history, step)
    assert betas.item() == pytest.approx(0.43 + cfg.beta_step)  # 250 only
    assert SearchConfig.make(steps=300, milestones=(200,)).adapt_until == 200
