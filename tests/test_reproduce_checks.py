"""Reproduction checks and the report at their edges: no training, seconds."""

import importlib
import json
import math

import pytest
from click.testing import CliRunner

from minefield.cli import main
from minefield.config import DataConfig, ExperimentConfig
from minefield.data import fresh_points, load_dataset
from minefield.reproduce.common import Check, Section
from minefield.reproduce.fig1 import start_beta
from minefield.reproduce.swissroll import radius_ratio
from minefield.search import SearchConfig, poison_set
from minefield.train import effective_beta

rep = importlib.import_module("minefield.reproduce")  # the package (minefield exports a
# function of the same name)


def test_check_4_fails_when_both_basins_are_empty():
    # regression: a zero bad radius made the ratio inf, so check 4 (good >= 10x bad) held
    # when the good model's radius was 0 too (both centres above the cutoff)
    assert not radius_ratio(0.0, 0.0) >= 10
    assert math.isnan(radius_ratio(0.0, 0.0))
    assert radius_ratio(0.2, 0.0) == math.inf and radius_ratio(0.2, 0.01) == pytest.approx(20)


def test_fig1_start_beta_resolves_none_as_the_search_does():
    # regression: exp_minefield computed `scfg.beta + 1e-9`, a TypeError after the whole
    # search when the search's beta was None (benchmarks/fig1_seeds.py --set beta=none)
    cfg = ExperimentConfig(name="x", data=DataConfig("spiral"))
    data = load_dataset(cfg.data)
    assert start_beta(SearchConfig(), cfg, data) == SearchConfig().beta
    scfg = SearchConfig.make(beta=None)
    extra = fresh_points(cfg.data, scfg.n_extra("spiral"), scfg.seed)
    want = effective_beta(None, poison_set(data, scfg, extra)[0], scfg.train)
    assert start_beta(scfg, cfg, data) == want and 0 < want < 1


def test_only_images_without_data_dir_keeps_the_last_report(tmp_path):
    # regression: it ran nothing, then replaced the full report by "0 of 0 hold", exit 0
    figs = tmp_path / "figures"
    figs.mkdir()
    (figs / "REPORT.md").write_text("the full report\n")
    r = CliRunner().invoke(main, ["--root", str(tmp_path / "runs"), "reproduce", "--scale",
                                  "tiny", "--only", "images", "--figures", str(figs)])
    assert r.exit_code == 1 and "--data-dir" in r.output, r.output
    assert (figs / "REPORT.md").read_text() == "the full report\n"
    assert not (figs / "report.json").exists()


def test_a_stopped_run_leaves_no_report_of_older_figures(tmp_path, monkeypatch):
    # regression: the report was written only at the end, so a run stopped after part 1
    # left the last run's REPORT.md beside part 1's new figures, its checks still "held"
    figs = tmp_path / "figures"
    figs.mkdir()
    (figs / "REPORT.md").write_text("Reproduction checks (PAPER.md): **11 of 11 hold**.\n")

    def first(ctx):
        fig = ctx.figures / "fig3_swissroll.png"
        fig.write_bytes(b"new figure")
        return Section("first", "First", checks=[Check("2", "x", False, "50%")], figures=[fig])

    def second(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(rep, "EXPERIMENTS", {"first": first, "second": second})
    with pytest.raises(KeyboardInterrupt):
        rep.reproduce("tiny", tmp_path / "runs", figs, "cpu", log=lambda _: None)
    md = (figs / "REPORT.md").read_text()
    assert "11 of 11" not in md and "**Incomplete**" in md and "second" in md
    assert "0 of 1 hold" in md and "![fig3_swissroll](fig3_swissroll.png)" in md
    data = json.loads((figs / "report.json").read_text())
    assert data["pending"] == ["second"] and list(data["sections"]) == ["first"]
    # a finished run says nothing of the kind
    monkeypatch.setattr(rep, "EXPERIMENTS", {"first": first})
    rep.reproduce("tiny", tmp_path / "runs", figs, "cpu", log=lambda _: None)
    assert "Incomplete" not in (figs / "REPORT.md").read_text()
    assert json.loads((figs / "report.json").read_text())["pending"] == []
