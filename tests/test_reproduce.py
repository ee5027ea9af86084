"""The whole pipeline at the tiny scale: every figure and the report, consistent with runs."""

import json
import shlex

import pytest
from click.testing import CliRunner

from minefield.cli import main
from minefield.cooling_blocks import cooling_cost
from minefield.runs import Run


@pytest.fixture(scope="module")
def tiny_repro(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repro")
    runner = CliRunner()
    r = runner.invoke(main, ["--root", str(tmp / "runs"), "reproduce", "--scale", "tiny",
                             "--figures", str(tmp / "figures"), "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    # later tests re-run parts, which rewrites the report: keep the full one
    (tmp / "report-full.json").write_bytes((tmp / "figures" / "report.json").read_bytes())
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
        basin = run.read_json("basin/repro.json")["members"][0]
        assert sw[which]["basin"]["log10_volume"] == basin["log10_volume"]
    # mcmc is not run at n = 3457: the report gives its cost bound at the measured rate
    mc = sw["estimators"]["mcmc"]
    bound = cooling_cost(sw["good"]["basin"]["n"])
    assert mc["run"] is False and mc["phases_at_least"] == bound.phases
    for which in ("good", "bad"):
        assert mc["evaluations_per_s"][which] > 0
        assert mc["hours_at_least"][which] == pytest.approx(
            bound.hours(mc["evaluations_per_s"][which]))
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
    rep = json.loads((tmp / "figures" / "report.json").read_text())
    assert rep["partial"] and list(rep["sections"]) == ["swissroll"]  # and it says so
    assert "(only swissroll)." in (tmp / "figures" / "REPORT.md").read_text()


def test_strict_exits_3_when_a_check_fails(tiny_repro, tmp_path):
    # the tiny scale is too small to hold every check (its radius ratio is under 10x):
    # the default exits 0 with the report saying so; --strict (for CI) exits 3, one line
    tmp, _ = tiny_repro
    r = CliRunner().invoke(main, ["--root", str(tmp / "runs"), "reproduce", "--scale", "tiny",
                                  "--figures", str(tmp_path / "fig"), "--device", "cpu",
                                  "--quiet", "--only", "swissroll", "--strict"])
    rep = json.loads((tmp_path / "fig" / "report.json").read_text())
    failed = [str(c["id"]) for c in rep["checks"] if not c["passed"]]
    assert failed, "the tiny scale held every swiss-roll check: pick another failing case"
    assert r.exit_code == 3, r.output
    assert r.output.strip().splitlines()[-1] == f"Error: check(s) {', '.join(failed)} failed"


def test_plot_basin_reads_what_reproduce_wrote(tiny_repro):
    # regression: reproduce wrote a second basin/<tag>.json layout that `plot basin` crashed on
    tmp, _ = tiny_repro
    out = tmp / "basin_plot"
    r = CliRunner().invoke(main, ["--root", str(tmp / "runs"), "plot", "basin",
                                  "repro-tiny-swiss-good", "repro-tiny-swiss-bad", "--tag",
                                  "repro", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.with_suffix(".png").stat().st_size > 5_000


def _files(root, run, names):
    return {n: (root / run / n).read_bytes() for n in names}


def test_printed_commands_reproduce_the_results(tiny_repro, tmp_path):
    # regression: the report printed commands that disagreed with what ran (cutoff, directions)
    tmp, _ = tiny_repro
    rep = json.loads((tmp / "report-full.json").read_text())
    again = tmp_path / "runs"
    expect = {"swissroll": ["summary.json", "basin/repro.json"],
              "minefield": ["summary.json", "search/search.csv", "embed/embed.json"]}
    for key, names in expect.items():
        commands = rep["sections"][key]["commands"]
        assert commands and all(c.startswith("minefield ") for c in commands)
        for cmd in commands:
            words = shlex.split(cmd)[1:]
            if words[0] == "plot":
                continue
            r = CliRunner().invoke(main, ["--root", str(again), *words, "--quiet"]
                                   if words[0] in ("train", "search") else
                                   ["--root", str(again), *words])
            assert r.exit_code == 0, (cmd, r.output)
        for run in rep["sections"][key]["runs"]:
            assert _files(again, run, names) == _files(tmp / "runs", run, names), run


def test_unknown_scale_is_one_line():
    r = CliRunner().invoke(main, ["reproduce", "--scale", "huge"])
    assert r.exit_code == 2 and "Invalid value for '--scale'" in r.output


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_a_bad_data_dir_is_refused_before_anything_trains(tmp_path, folder):
    data = tmp_path / "data"
    if folder == "empty":
        data.mkdir()
    r = CliRunner().invoke(main, ["--root", str(tmp_path / "runs"), "reproduce", "--scale",
                                  "tiny", "--only", "swissroll", "--only", "images",
                                  "--data-dir", str(data), "--figures", str(tmp_path / "f")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert ("does not exist" if folder == "missing" else "holds neither SVHN") in r.output
    assert not (tmp_path / "runs").exists()  # the swiss-roll experiment never started
