import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from minefield.cli import main
from minefield.search import SearchConfig
from minefield.stages import train_run

FAST = ["--steps", "30", "--milestones", "", "--every", "2", "--quiet"]


def test_search_embed_plot_from_the_command_line(tmp_path, tiny):
    train_run(tiny("good"), tmp_path, progress=False)
    r = CliRunner()
    root = ["--root", str(tmp_path)]
    out = r.invoke(main, root + ["search", "good", *FAST, "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert "2 bad minima (2 new" in out.output
    assert (tmp_path / "good" / "search" / "search.csv").exists()
    again = r.invoke(main, root + ["search", "good", *FAST])
    assert again.exit_code == 0 and "(0 new" in again.output
    clash = r.invoke(main, root + ["search", "good", *FAST, "--lr", "0.1"])
    assert clash.exit_code == 1
    assert clash.output.strip().splitlines() == [
        f"Error: {tmp_path / 'good' / 'search'} holds results for other settings; use --force "
        "to redo them"]
    forced = r.invoke(main, root + ["search", "good", *FAST, "--lr", "0.1", "--force"])
    assert forced.exit_code == 0 and "(2 new" in forced.output
    emb = r.invoke(main, root + ["embed", "good", "--perplexity", "1", "--n-iter", "50"])
    assert emb.exit_code == 0, emb.output
    saved = json.loads((tmp_path / "good" / "embed" / "embed.json").read_text())
    assert saved["kind"].count("bad") == 2
    add = r.invoke(main, root + ["embed", "good", "--add", "trajectory/step_00000020.safetensors",
                                 "--device", "cpu"])
    assert add.exit_code == 0, add.output
    assert "placed 1 new points into the map (1 added in all" in add.output
    again = json.loads((tmp_path / "good" / "embed" / "embed.json").read_text())
    assert again["coords"][:-1] == saved["coords"] and again["kind"][-1] == "added"
    assert "; wrote " in add.output
    same = r.invoke(main, root + ["embed", "good", "--add", "trajectory/step_00000020.safetensors",
                                  "--device", "cpu"])  # already placed: nothing is written
    assert same.exit_code == 0 and "; reused " in same.output and "placed 0 new" in same.output
    bad = r.invoke(main, root + ["embed", "good", "--add", "nope.safetensors"])
    assert bad.exit_code == 1 and len(bad.output.strip().splitlines()) == 1
    assert "missing checkpoint" in bad.output
    fig = tmp_path / "fig" / "mf"
    p = r.invoke(main, root + ["plot", "minefield", "good", "--out", str(fig)])
    assert p.exit_code == 0, p.output
    assert fig.with_suffix(".png").exists() and fig.with_suffix(".pdf").exists()


def test_embed_add_with_force_reports_a_new_map(tmp_path, tiny):
    # regression: `embed --add X --force` over a map with 3 added points printed "placed -2
    # new points into the map (1 added in all; the map's points did not move)": the map
    # had been fitted anew
    train_run(tiny("good"), tmp_path, progress=False)
    r = CliRunner()
    root = ["--root", str(tmp_path)]
    assert r.invoke(main, root + ["search", "good", *FAST, "--device", "cpu"]).exit_code == 0
    emb = ["embed", "good", "--perplexity", "1", "--n-iter", "50", "--device", "cpu"]
    assert r.invoke(main, root + emb).exit_code == 0
    three = [a for s in (0, 20, 40) for a in ("--add", f"trajectory/step_{s:08d}.safetensors")]
    out = r.invoke(main, root + emb + three)
    assert "placed 3 new points into the map (3 added in all; the map's points did" in out.output
    out = r.invoke(main, root + emb + ["--add", "trajectory/step_00000060.safetensors", "--force"])
    assert out.exit_code == 0, out.output
    assert "placed 1 new points into the map (1 added in all; a new map)" in out.output


def test_a_poisoned_search_of_a_run_without_poison_set_is_refused_up_front(tmp_path, tiny):
    # regression: each stack failed inside its task ("1 of 1 tasks failed (...); run the
    # same command again to redo only those", which failed again), after search/ was made
    cfg = tiny("clean").replace(data=tiny().data.replace(n_poison=0))
    train_run(cfg, tmp_path, progress=False)
    r = CliRunner()
    root = ["--root", str(tmp_path)]
    for beta in ("0.43", "concat"):
        out = r.invoke(main, root + ["search", "clean", *FAST, "--beta", beta])
        assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1, out.output
        assert "needs a poison set" in out.output and "again" not in out.output
        assert not (tmp_path / "clean" / "search").exists()
    out = r.invoke(main, root + ["search", "clean", *FAST, "--beta", "0"])  # plain retraining
    assert out.exit_code == 0, out.output


def test_search_errors_are_one_line(tmp_path):
    r = CliRunner()
    out = r.invoke(main, ["--root", str(tmp_path), "search", "nope"])
    assert out.exit_code == 1
    assert out.output.strip() == "Error: no such run: nope"
    out = r.invoke(main, ["--root", str(tmp_path), "search", "nope", "--beta", "2"])
    assert out.exit_code == 2 and "beta must be in [0, 1)" in out.output


def test_a_diverging_search_says_what_to_change(tmp_path, tiny):
    """Seeded, so not 'run the same command again'; no 'last good checkpoint: step 0'."""
    train_run(tiny("good"), tmp_path, progress=False)
    out = CliRunner().invoke(main, ["--root", str(tmp_path), "search", "good", *FAST,
                                    "--optimizer", "adam", "--lr", "1e30"])
    assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1, out.output
    assert "(a searched model): lower --lr or pass --clip" in out.output
    assert "run the same command" not in out.output and "last good" not in out.output


def test_fresh_poison_options(tmp_path, tiny):
    train_run(tiny("good"), tmp_path, progress=False)
    r = CliRunner()
    root = ["--root", str(tmp_path)]
    out = r.invoke(main, root + ["search", "good", *FAST, "--extra-poison", "5",
                                 "--extra-share", "0"])
    assert out.exit_code == 1
    assert out.output.strip() == ("Error: search.extra_poison=5 fresh points need a share of "
                                  "the poison term (search.extra_share > 0)")
    out = r.invoke(main, root + ["search", "good", *FAST, "--extra-poison", "5"])
    assert out.exit_code == 1
    assert out.output.strip() == ("Error: dataset 'blobs' cannot draw fresh points (only "
                                  "spiral, swissroll can)")
    assert not (tmp_path / "good" / "search").exists()


def test_adaptive_poison_factor_options(tmp_path, tiny):
    train_run(tiny("good"), tmp_path, progress=False)
    r = CliRunner()
    root = ["--root", str(tmp_path)]
    bad = r.invoke(main, root + ["search", "good", *FAST, "--poison-cap", "2"])
    assert bad.exit_code == 2 and "must be in [0, 1], got 2.0" in bad.output
    assert not (tmp_path / "good" / "search").exists()
    # checks every 500 steps: 600 steps with the cap at 0 raise each beta once
    out = r.invoke(main, root + ["search", "good", "--steps", "600", "--milestones", "",
                                 "--every", "2", "--quiet", "--poison-cap", "0",
                                 "--adapt-from", "0", "--beta-step", "0.1", "--beta", "0.2",
                                     "--no-continue-poison"])
    assert out.exit_code == 0, out.output
    saved = json.loads((tmp_path / "good" / "search" / "search.json").read_text())
    assert [row["beta"] for row in saved["rows"]] == pytest.approx([0.3, 0.3])
    off = r.invoke(main, root + ["search", "good", *FAST, "--poison-cap", "none", "--force"])
    assert off.exit_code == 0, off.output
    saved = json.loads((tmp_path / "good" / "search" / "search.json").read_text())
    assert saved["search"]["poison_cap"] is None
    assert {row["beta"] for row in saved["rows"]} == {SearchConfig().beta}


def test_search_refuses_a_batchnorm_model_and_writes_nothing(tmp_path, tiny):
    from minefield.config import DataConfig, ModelConfig
    cfg = tiny("bn").replace(data=DataConfig("digits", n_train=32, n_test=16, n_poison=16),
                             model=ModelConfig("resnet20", widths=(2, 2, 2)))
    cfg = cfg.replace(train=cfg.train.replace(steps=2, log_every=2, checkpoint_every=2))
    train_run(cfg, tmp_path, progress=False)
    out = CliRunner().invoke(main, ["--root", str(tmp_path), "search", "bn", *FAST])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert out.output.strip().splitlines() == [
        "Error: run bn's model has BatchNorm: the search does not carry running statistics "
        "from its starts to its minima yet, so their accuracies (and stopping rules) would "
        "be wrong; search a model without BatchNorm"]
    assert not (tmp_path / "bn" / "search").exists()


def _readme_paper_search() -> list[str]:
    """The README's "paper's own search" command, as arguments after ``minefield``."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text[text.index("# the paper's own search instead"):].split("\nminefield ", 1)[1]
    lines = [block.split("\n", 1)[0]]
    for line in block.split("\n")[1:]:
        if not lines[-1].endswith("\\"):
            break
        lines.append(line)
    return shlex.split(" ".join(ln.rstrip("\\") for ln in lines))


def test_the_readme_paper_search_turns_every_addition_of_ours_off(monkeypatch):
    # regression: the README's "paper's exact search" left continuation on (--continue-below
    # defaults to 0.9): 3 of 5 searches ran 375 steps, not 300, ending at beta 0.474, not 0.504
    import minefield.cli.search as cli

    got = {}

    def fake_search(run, cfg, **_):
        got["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(cli, "open_run", lambda ctx, name: name)
    monkeypatch.setattr(cli, "search_run", fake_search)
    args = _readme_paper_search()
    assert args[:2] == ["search", "mf"]
    CliRunner().invoke(main, args)
    cfg = got["cfg"]
    assert cfg.train.optimizer.value == "rmsprop" and cfg.train.lr == 0.001
    assert cfg.train.milestones == () and cfg.train.steps == 40000 and cfg.train.l2 == 0
    assert cfg.train.batch_size is None  # full batch on train ∪ untraining set
    assert cfg.beta is None and cfg.n_extra("spiral") == 0  # concat, untraining set only
    assert cfg.stopping.value == "fixed" and cfg.poison_cap is None  # one beta, no stopping
    assert cfg.extra_steps == 0 and cfg.continue_below is None  # no continuation
    assert not cfg.continue_poison and cfg.retries == 0
    # the Known-gaps sentence names the same switches
    gaps = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    gaps = " ".join(gaps[gaps.index("## Known gaps"):].split())
    flags = [a for a in args if a.startswith("--") and a not in (
        "--every", "--optimizer", "--lr", "--milestones", "--steps", "--beta", "--force")]
    sentence = gaps[gaps.index("`--extra-poison 0"):].split("`", 2)[1]
    assert sorted(a for a in sentence.split() if a.startswith("--")) == sorted(flags)


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_forced_search_checks_its_starts_before_it_clears_the_old_one(tmp_path, tiny):
    """A corrupt start checkpoint had been found after --force deleted every minimum."""
    train_run(tiny("good"), tmp_path, progress=False)
    r = CliRunner()
    root = ["--root", str(tmp_path)]
    assert r.invoke(main, root + ["search", "good", *FAST]).exit_code == 0
    before = _tree(tmp_path / "good" / "search")
    (tmp_path / "good" / "trajectory" / "step_00000020.safetensors").write_bytes(b"x" * 50)
    out = r.invoke(main, root + ["search", "good", *FAST, "--lr", "0.1", "--force"])
    assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1, out.output
    assert "corrupt checkpoint" in out.output and "step_00000020" in out.output
    assert _tree(tmp_path / "good" / "search") == before
