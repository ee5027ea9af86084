"""The whole pipeline at the tiny scale: every figure and the report, consistent with runs."""

import json

import pytest
from click.testing import CliRunner

from minefield.cli import main
from minefield.runs import Run


@pytest.fixture(scope="module")
def tiny_repro(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repro")
    runner = CliRunner()
    r = runner.invoke(main, ["--root", str(tmp / "runs"), "reproduce", "--scale", "tiny",
                             "--figures", str(tmp / "figures"), "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    return tmp, r.output


def test_every_figure_and_the_report_exist(tiny_repro):
    tmp, out = tiny_repro
    figs = tmp / "figures"
    for stem in ("fig1_minefield", "fig3_swissroll", "fig8_circles", "repro-tiny-sweep_sweep",
                 "repro-tiny-sweep_boundaries"):
        for ext in ("png", "pdf"):
            assert (figs / f"{stem}.{ext}").stat().st_size > 5_000, stem
    md = (figs / "REPORT.md").read_text()
    for title in ("Figure 1", "Figure 3", "Figures 5 and 6", "Figure 8", "Check 9", "digits"):
        assert title in md
    assert "![fig1_minefield](fig1_minefield.png)" in md
    assert "report: " in out and "check" in out


def test_report_numbers_match_run_directories(tiny_repro):
    tmp, _ = tiny_repro
    rep = json.loads((tmp / "figures" / "report.json").read_text())
    root = tmp / "runs"
    sw = rep["sections"]["swissroll"]["data"]
    for which in ("good", "bad"):
        run = Run.open(f"repro-tiny-swiss-{which}", root)
        summary = run.read_json("summary.json")
        assert sw[which]["test_acc"] == summary["test_acc"][0]
        basin = run.read_json("basin/repro.json")
        assert sw[which]["basin"]["log10_volume"] == basin["log10_volume"]
    mf = rep["sections"]["minefield"]["data"]
    search = Run.open("repro-tiny-minefield", root).read_json("search/search.json")
    assert mf["search"] == search["stats"]
    sweep = Run.open("repro-tiny-sweep", root).read_json("sweep.json")
    assert rep["sections"]["sweep"]["data"]["rows"] == sweep["rows"]
    assert {c["id"] for c in rep["checks"]} == {str(i) for i in range(1, 11)} | {"8+"}


def test_rerun_resumes_without_retraining(tiny_repro):
    tmp, _ = tiny_repro
    metrics = tmp / "runs" / "repro-tiny-swiss-bad" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    r = CliRunner().invoke(main, ["--root", str(tmp / "runs"), "reproduce", "--scale", "tiny",
                                  "--figures", str(tmp / "figures"), "--device", "cpu",
                                  "--quiet", "--only", "swissroll"])
    assert r.exit_code == 0, r.output
    assert metrics.stat().st_mtime_ns == before


def test_unknown_scale_is_one_line():
    r = CliRunner().invoke(main, ["reproduce", "--scale", "huge"])
    assert r.exit_code == 2 and "Invalid value for '--scale'" in r.output
