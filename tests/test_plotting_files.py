"""Saved figures: the same figure gives the same bytes whenever it is written."""

import matplotlib.pyplot as plt

from minefield.plotting import save_figure


def _write(path, monkeypatch, epoch: str):
    # matplotlib dates a PDF by $SOURCE_DATE_EPOCH when set, else by the clock: two
    # epochs stand for two runs of the same command at different times
    monkeypatch.setenv("SOURCE_DATE_EPOCH", epoch)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1, 2], [1, 0, 2])
    return {p.suffix: p.read_bytes() for p in save_figure(fig, path)}


def test_figures_are_byte_identical_between_identical_runs(tmp_path, monkeypatch):
    # regression: the PDF stored its CreationDate, so identical runs differed in it
    a = _write(tmp_path / "a" / "fig", monkeypatch, "100")
    b = _write(tmp_path / "b" / "fig", monkeypatch, "2000000000")
    assert set(a) == {".png", ".pdf"}
    assert a == b
    assert b"CreationDate" not in a[".pdf"]
