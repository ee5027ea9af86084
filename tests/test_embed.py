import json

import numpy as np
import pytest
import torch
from conftest import interrupt_training

from minefield.config import ConfigError, ModelConfig
from minefield.embed import EmbedConfig, TSNEMap, embed_points, fit_map, weight_matrix
from minefield.plotting.minefield import outlier_mask, plot_minefield
from minefield.runs import Run, RunError
from minefield.search import SearchConfig
from minefield.stages import embed_run, load_embedding, load_map, search_run, train_run


def _clusters(n=30, k=3, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g, dtype=torch.float64) * 10
    x = torch.cat([c + torch.randn(n, d, generator=g, dtype=torch.float64) for c in centres])
    return x, torch.arange(k).repeat_interleave(n)


def _knn_accuracy(z: torch.Tensor, y: torch.Tensor, k: int = 5) -> float:
    d = torch.cdist(z, z)
    d.fill_diagonal_(float("inf"))
    nn_labels = y[d.topk(k, largest=False).indices]
    return float((nn_labels.mode(1).values == y).double().mean())


def test_tsne_keeps_knn_accuracy_of_separated_clusters():
    x, y = _clusters()
    assert _knn_accuracy(x, y) == 1.0  # oracle in the original space
    z = embed_points(x, EmbedConfig(perplexity=10, n_iter=250, pca_dims=10))
    assert z.shape == (90, 2)
    assert _knn_accuracy(z, y) >= 0.95


def test_embedding_is_deterministic_given_the_seed():
    x, _ = _clusters(n=15)
    cfg = EmbedConfig(perplexity=5, n_iter=100)
    a, b = embed_points(x, cfg), embed_points(x, cfg)
    assert torch.equal(a, b)
    assert not torch.allclose(a, embed_points(x, cfg.replace(seed=1)))


def test_weight_matrix_drops_biases_unless_asked():
    p = {"0.weight": torch.ones(2, 3, 4), "0.bias": torch.ones(2, 3)}
    assert weight_matrix(p).shape == (2, 12)
    assert weight_matrix(p, kernels_only=False).shape == (2, 15)
    with pytest.raises(ValueError, match="no weight matrices"):
        weight_matrix({"0.bias": torch.ones(2, 3)})


def test_embed_points_errors():
    with pytest.raises(ValueError, match="need at least 4 points"):
        embed_points(torch.zeros(3, 5))


@pytest.mark.parametrize("kw, msg", [(dict(pca_dims=1), "pca_dims must be >= 2"),
                                     (dict(perplexity=0), "perplexity must be > 0"),
                                     (dict(n_iter=0), "n_iter must be >= 1")])
def test_embed_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        EmbedConfig(**kw)


def test_outlier_mask_needs_both_coordinates():
    xy = np.array([[0.0, 0], [1, 0], [0, 1], [-1, 0], [0, -1], [9, 9], [9, 0]])
    assert outlier_mask(xy, 1.5).tolist() == [False] * 5 + [True, False]


def test_embed_run_save_load_and_plot(tmp_path, tiny):
    run = train_run(tiny("good"), tmp_path, progress=False).run
    with pytest.raises(RunError, match="has no bad minima"):
        embed_run(run, device="cpu")
    with pytest.raises(RunError, match="has no embedding"):
        load_embedding(run)
    search_run(run, SearchConfig.make(every=1, steps=30, log_every=10, milestones=()), device="cpu")
    cfg = EmbedConfig(perplexity=2, n_iter=50)
    res = embed_run(run, cfg, device="cpu")
    assert res.kind == ["trajectory"] * 3 + ["bad"] * 3
    assert res.step == [20, 40, 60] * 2
    back = load_embedding(run)
    assert torch.equal(back.coords, res.coords) and back.kind == res.kind
    torch.testing.assert_close(back.test_acc, res.test_acc.double())
    ax = plot_minefield(back, drop_outliers=True)
    assert "final iterate: train" in ax.get_title() and "3 bad minima" in ax.get_title()
    with pytest.raises(ConfigError, match="checkpoints: 'some' is not one of searched, all"):
        embed_run(run, cfg, device="cpu", checkpoints="some")
    # a hand-edited embed.json: one "corrupt" line, not an IndexError in the plot
    path = run.file("embed/embed.json")
    saved = json.loads(path.read_text())
    for key, cut in (("coords", 3), ("test_acc", 5), ("kind", 5)):
        path.write_text(json.dumps({**saved, key: saved[key][:cut]}))
        with pytest.raises(RunError, match="embed.json is corrupt .* lengths disagree"):
            load_embedding(run)


def test_map_places_new_points_beside_their_nearest_old_neighbours():
    x, y = _clusters(n=30, k=3, d=20, seed=0)
    tmap = fit_map(x, EmbedConfig(perplexity=10, n_iter=250, pca_dims=10))
    old = tmap.coords.clone()
    new, y_new = _clusters(n=6, k=3, d=20, seed=0)  # same centres, fresh noise
    new = new + 0.3 * torch.randn(new.shape, generator=torch.Generator().manual_seed(1),
                                  dtype=torch.float64)
    z = tmap.transform(new)
    assert z.shape == (18, 2) and z.dtype == torch.float64
    assert torch.equal(tmap.coords, old)  # the map's own points never move
    # oracle: the nearest old point in weight space, and where the map put it
    nearest = torch.cdist(new, x).argmin(1)
    assert torch.equal(y[nearest], y_new)
    d_map = torch.cdist(z, old)
    assert torch.equal(y[d_map.argmin(1)], y_new)  # lands in its own cluster
    # and closer to its weight-space neighbour than to any point of another cluster
    own = d_map[torch.arange(18), nearest]
    other = d_map.masked_fill(y[None, :] == y_new[:, None], float("inf")).min(1).values
    assert (own < other).all()
    assert torch.equal(tmap.transform(new), z)  # deterministic


def test_map_round_trips_through_plain_tensors():
    x, _ = _clusters(n=10, k=2, d=6)
    for pca in (3, 50):  # with and without a PCA (d = 6 < 50 keeps the rows)
        tmap = fit_map(x, EmbedConfig(perplexity=3, n_iter=50, pca_dims=pca))
        assert tmap.components.shape == ((3, 6) if pca == 3 else (0, 6))
        back = TSNEMap.from_tensors(*tmap.to_tensors())
        assert torch.equal(back.coords, tmap.coords) and back.perplexity == tmap.perplexity
        assert torch.equal(back.transform(x[:2]), tmap.transform(x[:2]))
    assert torch.equal(tmap.coords, embed_points(x, EmbedConfig(perplexity=3, n_iter=50)))
    with pytest.raises(ValueError, match=r"new points must be \(n, 6\)"):
        tmap.transform(torch.zeros(2, 5))
    t, meta = tmap.to_tensors()
    with pytest.raises(ValueError, match="inconsistent shapes"):
        TSNEMap.from_tensors({**t, "coords": t["coords"][:3]}, meta)


def test_embed_run_adds_checkpoints_without_moving_the_map(tmp_path, tiny):
    run = train_run(tiny("good"), tmp_path, progress=False).run
    other = train_run(tiny("other", seed=1), tmp_path, progress=False).run
    fast = SearchConfig.make(every=1, steps=30, log_every=10, milestones=(),
                             continue_below=None)  # minima at step 30
    search_run(run, fast, device="cpu")
    search_run(other, fast, device="cpu")
    with pytest.raises(RunError, match="has no embedding"):
        load_map(run)
    cfg = EmbedConfig(perplexity=2, n_iter=50)
    base = embed_run(run, cfg, device="cpu")
    theirs = sorted((other.path / "search" / "minima").glob("*.safetensors"))
    mine = "trajectory/step_00000040.safetensors"
    res = embed_run(run, device="cpu", add=[*theirs[:2], mine])  # the saved map's settings
    assert res.kind == base.kind + ["added"] * 3
    assert torch.equal(res.coords[:6], base.coords)  # old points exactly where they were
    assert res.added == [str(p.resolve()) for p in theirs[:2]] + [mine]
    # a bad minimum's step is the checkpoint its search started from, not its 30 steps
    starts = [int(p.name.split("_")[1]) for p in theirs[:2]]
    assert res.step[6:] == [*starts, 40] and starts != [30, 30]
    assert res.test_acc[6:].isfinite().all()
    saved = load_embedding(run)
    assert torch.equal(saved.coords, res.coords) and saved.added == res.added
    # placing them again is a no-op; a further file appends, the rest stays put
    text = (run.path / "embed" / "embed.json").read_text()
    assert torch.equal(embed_run(run, cfg, device="cpu", add=[theirs[0]]).coords, res.coords)
    assert (run.path / "embed" / "embed.json").read_text() == text
    more = embed_run(run, cfg, device="cpu", add=[theirs[2]])
    assert torch.equal(more.coords[:9], res.coords) and more.kind[-1] == "added"
    # a minimum searched after the map was made (here: copied in) is added to the same map
    late = run.path / "search" / "minima" / "start_00000060_r09.safetensors"
    late.write_bytes(theirs[2].read_bytes())
    with pytest.raises(RunError, match="holds results for other settings"):
        embed_run(run, cfg, device="cpu")  # the map lacks a minimum the run now has
    latest = embed_run(run, cfg, device="cpu", add=[late])
    assert torch.equal(latest.coords[:10], more.coords)
    assert latest.added[-1] == "search/minima/start_00000060_r09.safetensors"
    # the same file rewritten with other weights is a new point, not the old one reused
    late.write_bytes(theirs[1].read_bytes())
    rewritten = embed_run(run, cfg, device="cpu", add=[late])
    assert len(rewritten.added) == len(latest.added) + 1
    assert rewritten.added[-2:] == [latest.added[-1]] * 2
    assert rewritten.added_sha[-1] != rewritten.added_sha[-2]
    assert load_embedding(run).added_sha == rewritten.added_sha
    late.unlink()
    ax = plot_minefield(more)
    assert "4 points added to the fitted map" in ax.get_title()
    assert "added to the map" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_embed_run_add_errors_change_nothing(tmp_path, tiny, monkeypatch):
    run = train_run(tiny("good"), tmp_path, progress=False).run
    wide = train_run(tiny("wide").replace(model=ModelConfig(widths=(9, 8))), tmp_path,
                     progress=False).run
    search_run(run, SearchConfig.make(every=1, steps=30, log_every=10, milestones=()),
               device="cpu")
    cfg = EmbedConfig(perplexity=2, n_iter=50)
    with pytest.raises(RunError, match="missing checkpoint"):
        embed_run(run, cfg, device="cpu", add=["trajectory/nope.safetensors"])
    assert not (run.path / "embed").exists()  # refused before the map was made
    # regression: a missing relative file under a relative root was named with the run
    # directory twice ('rt/good/rt/good/...'), neither the path given nor where it looked
    monkeypatch.chdir(tmp_path.parent)
    rel = Run.open("good", tmp_path.name)
    with pytest.raises(RunError) as err:
        embed_run(rel, cfg, device="cpu", add=["runs/mf2/nope.safetensors"])
    assert str(err.value) == (f"missing checkpoint: runs/mf2/nope.safetensors (not in the "
                              f"working directory, nor in {tmp_path.name}/good)")
    embed_run(run, cfg, device="cpu")
    emb = run.path / "embed"
    files = {p.name: p.read_bytes() for p in emb.iterdir()}
    wrong = wide.trajectory()[-1]
    with pytest.raises(RunError, match="does not match the model of run good"):
        embed_run(run, cfg, device="cpu", add=[wrong])
    with pytest.raises(RunError, match="holds results for other settings"):
        embed_run(run, cfg.replace(seed=1), device="cpu", add=[run.trajectory()[0]])
    assert {p.name: p.read_bytes() for p in emb.iterdir()} == files
    (emb / "map.safetensors").rename(emb / "old.safetensors")
    with pytest.raises(RunError, match="no fitted map"):
        embed_run(run, cfg, device="cpu", add=[run.trajectory()[0]])
    (emb / "old.safetensors").rename(emb / "map.safetensors")
    embed_run(run, cfg.replace(seed=1), device="cpu", force=True)
    (emb / "map.safetensors").write_bytes(files["map.safetensors"])  # a map of other settings
    with pytest.raises(RunError, match="does not belong to"):
        load_map(run)


def test_added_file_must_hold_the_maps_member(tmp_path):
    from minefield.runs import Checkpoint
    from minefield.stages.embed import _member_of

    names = {"w": torch.Size([2, 3])}
    ck = Checkpoint(tmp_path / "x.safetensors", {"w": torch.arange(12.).view(2, 2, 3)}, {}, {})
    assert torch.equal(_member_of(ck, names, 1)["w"], ck.params["w"][1])
    single = Checkpoint(ck.path, {"w": ck.params["w"][:1]}, {}, {})
    assert torch.equal(_member_of(single, names, 5)["w"], ck.params["w"][0])
    with pytest.raises(RunError, match="x.safetensors has 2 members; the map shows member 2"):
        _member_of(ck, names, 2)


def test_a_map_of_a_trajectory_that_grew_or_changed_is_not_reused(tmp_path, tiny, monkeypatch):
    # regression: a map made while training was interrupted (2 checkpoints) was reused
    # ("embedded 2 checkpoints ...; reused") after training resumed to 3
    undo = interrupt_training(monkeypatch, 40)
    with pytest.raises(KeyboardInterrupt):
        train_run(tiny("good"), tmp_path, progress=False)
    undo()
    run = Run.open("good", tmp_path)
    search_run(run, SearchConfig.make(every=1, steps=30, log_every=10, milestones=()),
               device="cpu")
    cfg = EmbedConfig(perplexity=2, n_iter=50)
    def shown(res):
        return [s for s, k in zip(res.step, res.kind) if k == "trajectory"]

    # "all": steps 0, 20, 40; "searched": the starts 20, 40 (and the last, 40)
    before = {"all": [0, 20, 40], "searched": [20, 40]}
    for checkpoints in ("all", "searched"):
        res = embed_run(run, cfg, device="cpu", checkpoints=checkpoints, force=True)
        assert shown(res) == before[checkpoints]
        assert embed_run(run, cfg, device="cpu", checkpoints=checkpoints).step == res.step
    train_run(tiny("good"), tmp_path, progress=False)  # resumes to step 60
    for checkpoints in ("all", "searched"):
        with pytest.raises(RunError, match="holds results for other settings"):
            embed_run(run, cfg, device="cpu", checkpoints=checkpoints)
        res = embed_run(run, cfg, device="cpu", checkpoints=checkpoints, force=True)
        assert shown(res) == [*before[checkpoints], 60]
    # the same files, the last one with other weights (retrained in place): stale too
    last = run.trajectory()[-1]
    last.write_bytes(run.trajectory()[0].read_bytes())
    with pytest.raises(RunError, match="holds results for other settings"):
        embed_run(run, cfg, device="cpu", checkpoints="searched")


def test_an_added_checkpoint_of_another_activation_is_refused(tmp_path, tiny):
    """Regression: a tanh run's checkpoint (the map's run: ReLU, the same shapes) was placed
    with accuracies of its weights in the ReLU net (on the spiral: train 0.51 recorded for
    a model whose own is 0.83). A different init scheme is the same model: accepted."""
    run = train_run(tiny("good"), tmp_path, progress=False).run
    cfg = tiny("tanh", seed=1)
    tanh = train_run(cfg.replace(model=cfg.model.replace(activation="tanh")), tmp_path,
                     progress=False).run
    cfg = tiny("he", seed=2)
    he = train_run(cfg.replace(model=cfg.model.replace(init="he_normal")), tmp_path,
                   progress=False).run
    search_run(run, SearchConfig.make(every=1, steps=30, log_every=10, milestones=()),
               device="cpu")
    emb = EmbedConfig(perplexity=2, n_iter=50)
    with pytest.raises(RunError, match="is of another model than run good's"):
        embed_run(run, emb, device="cpu", add=[tanh.trajectory()[-1]])
    assert not (run.path / "embed").exists()
    res = embed_run(run, emb, device="cpu", add=[he.trajectory()[-1]])
    assert res.kind[-1] == "added"


@pytest.mark.parametrize("killed_after", ["map", "embed.json"])
def test_a_redo_killed_between_its_two_files_leaves_a_map_to_add_to(tmp_path, tiny,
                                                                     monkeypatch, killed_after):
    # regression: `embed --force` wrote the new map over the old one before embed.json, so
    # a kill in between left the old embed.json with a map load_map refused ("does not
    # belong"), and `embed --add` failed until redone
    import minefield.stages.embed as emb_mod

    run = train_run(tiny("good"), tmp_path, progress=False).run
    search_run(run, SearchConfig.make(every=1, steps=30, log_every=10, milestones=()),
               device="cpu")
    cfg, other = EmbedConfig(perplexity=2, n_iter=50), EmbedConfig(perplexity=3, n_iter=50)
    old = embed_run(run, cfg, device="cpu")
    emb = run.path / "embed"
    before = {p.name: p.read_bytes() for p in emb.iterdir()}
    with monkeypatch.context() as m:
        if killed_after == "map":  # the new map written, embed.json not yet
            real = Run.write_result

            def killed(self, rel, key, body):
                if rel == "embed/embed.json":
                    raise KeyboardInterrupt
                return real(self, rel, key, body)

            m.setattr(Run, "write_result", killed)
        else:  # embed.json written, the new map not yet renamed into place
            settle, calls = emb_mod._settle_map, []

            def killed(run):
                calls.append(run)
                if len(calls) == 2:  # the first is before anything is written
                    raise KeyboardInterrupt
                settle(run)

            m.setattr(emb_mod, "_settle_map", killed)
        with pytest.raises(KeyboardInterrupt):
            embed_run(run, other, device="cpu", force=True)
    shown = old if killed_after == "map" else load_embedding(run)
    assert shown.config == (cfg if killed_after == "map" else other)
    if killed_after == "map":
        assert {p.name: p.read_bytes() for p in emb.iterdir() if p.name in before} == before
    assert torch.equal(load_map(run).coords, shown.coords)  # the map embed.json names
    added = embed_run(run, device="cpu", add=["trajectory/step_00000020.safetensors"])
    assert torch.equal(added.coords[:len(shown.coords)], shown.coords)
    assert added.kind[-1] == "added" and added.config == shown.config
    assert sorted(p.name for p in emb.iterdir()) == ["embed.json", "map.safetensors"]
    assert torch.equal(load_map(run).coords, shown.coords)
    redone = embed_run(run, other, device="cpu", force=True)  # redoing after it works too
    assert redone.config == other and torch.equal(load_map(run).coords, redone.coords)


def test_a_small_maps_own_points_added_again_land_on_themselves():
    # regression: transform used openTSNE's perplexity 5 (15 neighbours) whatever the map's
    # size, while the fit lowered its perplexity to (N - 1) / 3: in a map of under 16
    # points every neighbour weighed alike, and a copy of an old point was placed near
    # the map's middle (4.2 units from itself, beside another point, in a map of 5)
    for n in (5, 6, 9):
        x = torch.randn(n, 30, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        tmap = fit_map(x, EmbedConfig(perplexity=30, n_iter=250, pca_dims=10))
        z = tmap.transform(x)
        assert torch.equal(torch.cdist(z, tmap.coords).argmin(1), torch.arange(n)), n


def test_adding_to_a_map_of_a_search_redone_with_other_settings_is_refused(tmp_path, tiny):
    # regression: after `minefield search --force` with other settings, `embed --add` placed
    # the new search's minima into the map of the old one (deleted), mixing both searches
    # in one figure; so did a map of a trajectory that had grown since
    run = train_run(tiny("good"), tmp_path, progress=False).run
    fast = SearchConfig.make(every=1, steps=30, log_every=10, milestones=(),
                             continue_below=None)
    search_run(run, fast, device="cpu")
    cfg = EmbedConfig(perplexity=2, n_iter=50)
    embed_run(run, cfg, device="cpu")
    mine = "search/minima/start_00000020_r00.safetensors"
    assert embed_run(run, device="cpu", add=[mine]).kind[-1] == "added"  # same search: fine
    # a minimum the search made after the map (here: its first, redone) may be added too
    (run.path / mine).unlink()
    embed_run(run, cfg, device="cpu", force=True)  # a map without start 20
    search_run(run, fast, device="cpu")  # resumed: start 20's minimum is back
    assert embed_run(run, device="cpu", add=[mine]).kind[-1] == "added"
    text = (run.path / "embed" / "embed.json").read_text()
    search_run(run, fast.replace(train=fast.train.replace(lr=0.05)), device="cpu", force=True)
    with pytest.raises(RunError, match="holds results for other settings"):
        embed_run(run, device="cpu", add=[mine])
    assert (run.path / "embed" / "embed.json").read_text() == text  # nothing written
    res = embed_run(run, cfg, device="cpu", add=[mine], force=True)  # redone: one search
    assert res.kind.count("bad") == 3 and res.kind[-1] == "added"
    # a trajectory that grew since (here: its last checkpoint copied one step on)
    grown = run.path / "trajectory" / "step_00000080.safetensors"
    grown.write_bytes((run.path / "trajectory" / "step_00000060.safetensors").read_bytes())
    with pytest.raises(RunError, match="holds results for other settings"):
        embed_run(run, device="cpu", add=["trajectory/step_00000020.safetensors"])


@pytest.mark.parametrize("text", ["{", '{"key": 1}', '{"key": {}}'])
def test_force_redoes_an_embedding_whose_file_is_corrupt(tmp_path, tiny, text):
    # regression: the error said "use --force to redo it", and --force said it again
    run = train_run(tiny("good"), tmp_path, progress=False).run
    search_run(run, SearchConfig.make(every=1, steps=30, log_every=10, milestones=(),
                                      continue_below=None), device="cpu")
    cfg = EmbedConfig(perplexity=2, n_iter=50)
    (run.path / "embed").mkdir()
    (run.path / "embed" / "embed.json").write_text(text)
    with pytest.raises(RunError, match="corrupt"):
        embed_run(run, cfg, device="cpu")
    assert (run.path / "embed" / "embed.json").read_text() == text  # untouched
    res = embed_run(run, cfg, device="cpu", force=True)
    assert res.kind.count("bad") == 3 and load_embedding(run).kind == res.kind
    assert embed_run(run, device="cpu", add=["trajectory/step_00000020.safetensors"]).added
