"""The README's scripted study runs as printed (at a tiny scale) and prints what it shows."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
STUDY = "A scripted study, train -> basin -> tidy table"


def _study() -> tuple[str, str]:
    """The study's code block and the output block after it."""
    text = README.read_text()
    blocks = re.findall(r"```(\w*)\n(.*?)```", text[text.index(STUDY):], re.S)
    (lang, code), (_, shown) = blocks[0], blocks[1]
    assert lang == "python"
    return code, shown


def test_lr_study_in_the_readme_runs_and_prints_its_table(tmp_path, monkeypatch, capsys):
    code, shown = _study()
    assert len(code.strip().splitlines()) < 15
    tiny = code.replace("steps=3000", "steps=5").replace("n_directions=200", "n_directions=2")
    assert tiny.count("steps=5") == 1 and tiny.count("n_directions=2") == 1
    monkeypatch.chdir(tmp_path)  # the study writes runs/lr-* under the working directory
    exec(compile(tiny, "README study", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == shown.splitlines()[0].split()  # the same columns
    assert len(printed) == len(shown.strip().splitlines()) == 9  # header + 8 learning rates
    assert [float(r.split()[0]) for r in printed[1:]] == [
        float(r.split()[0]) for r in shown.strip().splitlines()[1:]]
    assert len(list((tmp_path / "runs").glob("lr-*"))) == 8


def test_make_bench_runs_the_benchmarks_the_readme_says_and_names_the_others():
    # regression: the README said `make bench` "measures everything"; it runs 3 of 8 scripts
    make = (README.parent / "Makefile").read_text()
    recipe = make[make.index("\nbench:"):].split("\n\n")[0]
    ran = set(re.findall(r"benchmarks/(\w+\.py)", recipe))
    perf = README.read_text()
    perf = perf[perf.index("## Performance"):]
    said = perf[:perf.index("The others run by hand")]
    others = perf[perf.index("The others run by hand"):perf.index("The machine is shared")]
    assert set(re.findall(r"`(\w+\.py)`", said)) == ran and len(ran) == 3
    scripts = {p.name for p in (README.parent / "benchmarks").glob("*.py")} - {"plain.py"}
    assert set(re.findall(r"`(\w+\.py)`", others)) == scripts - ran


def test_the_default_run_all_the_readme_names_is_the_local_loop(tmp_path):
    """README, Studies -> Executors: the named default takes ``(specs, root)``, as
    ``study_run(..., run_all=)`` calls it, and gives the default's table."""
    import torch

    import minefield as mf

    name = re.search(r"the default, `(\w+)`", README.read_text()).group(1)
    torch.set_num_threads(1)
    base = mf.ExperimentConfig(name="ra", train=mf.TrainConfig(steps=5),
                               model=mf.ModelConfig(widths=(4,)))
    cfg = mf.StudyConfig(grid={"train.seed": [0]}, volume=mf.VolumeConfig(n_directions=2))
    plain = mf.study_run(base, cfg, tmp_path, progress=False)
    named = mf.study_run(base.replace(name="ra2"), cfg, tmp_path, progress=False,
                         run_all=getattr(mf, name))
    assert [r["test_acc"] for r in named.rows] == [r["test_acc"] for r in plain.rows]


def _command(block_start: str) -> str:
    """The README command line starting with ``block_start``, continuation lines joined."""
    text = README.read_text()
    i = text.index(block_start)
    lines = []
    for line in text[i:].splitlines():
        lines.append(line.split("  #")[0].rstrip().rstrip("\\"))
        if not line.split("  #")[0].rstrip().endswith("\\"):
            break
    return " ".join(lines)


def test_the_fig1_train_command_is_the_reproductions_good_run():
    # regression: "The command line" trained Fig. 1's good run on all 132 points with a
    # checkpoint every 0.8 epoch (no --fit-first 118), the run the README says was off-spec
    import shlex

    from minefield.cli.train import config_from_options
    from minefield.reproduce import fig1

    cmd = _command("minefield train --name mf --dataset spiral")
    cli_cfg = _train_config(shlex.split(cmd)[2:], config_from_options)
    src = Path(fig1.__file__).read_text()
    assert "fit_first=118" in src and "checkpoint_every=4" in src
    t = cli_cfg.train
    assert (t.fit_first, t.batch_size, t.checkpoint_every, t.steps) == (118, 32, 4, 8000)
    assert (t.optimizer.value, t.lr, t.l2) == ("rmsprop", 0.01, 0.001)


def _train_config(args, config_from_options):
    """The ExperimentConfig ``minefield train ARGS`` builds (its options parsed by click)."""
    from minefield.cli import main

    with main.commands["train"].make_context("train", list(args)) as ctx:
        return config_from_options(ctx.params)


def test_the_reliability_table_size_the_readme_names_is_the_tables():
    # regression: the README said 162 bad inputs after the table had grown to 170
    import sys

    sys.path.insert(0, str(README.parent / "tests"))
    import test_reliability

    said = re.search(r"tests/test_reliability\.py` runs the (\d+) bad inputs", README.read_text())
    assert int(said.group(1)) == len(test_reliability.CASES)
