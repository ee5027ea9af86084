"""figures/REPORT.md: every table row has its header's cells."""

import json
import re
from types import SimpleNamespace

from minefield import report
from minefield.reproduce.common import Check, Section


def _cells(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line)) - 1


def test_cells_holding_a_pipe_are_escaped_so_rows_keep_their_columns(tmp_path):
    # regression: check 9's "|error| in log10 V" had 6 cells under a 4-column header, and
    # "max |r - sqrt(2c/a)|" 5 under 3, so the rendered 'measured' / 'holds' columns shifted
    sec = Section(key="oracle", title="Oracle", commands=["minefield x"],
                  numbers=[("max |r - sqrt(2c/a)|", "4.47e-07", "0 (exact)")],
                  checks=[Check("9", "bowl: r = sqrt(2c/a)", True, "|error| in log10 V 8.2e-04")])
    ctx = SimpleNamespace(figures=tmp_path, scale=SimpleNamespace(name="tiny"))
    md = report.write_report([sec], ctx, 60.0).read_text().splitlines()
    tables, header = 0, None
    for line in md:
        if not line.startswith("|"):
            header = None
            continue
        if header is None:
            header, tables = _cells(line), tables + 1
        assert _cells(line) == header, line
    assert tables == 2
    row = next(ln for ln in md if ln.startswith("| 9 "))
    assert row.endswith("| yes |") and r"\|error\| in log10 V 8.2e-04" in row
    # the JSON keeps the text as measured
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["checks"][0]["measured"] == "|error| in log10 V 8.2e-04"
