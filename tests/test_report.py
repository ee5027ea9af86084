"""figures/REPORT.md: every table row has its header's cells, and the machine line names the CPU."""

import json
import re
from types import SimpleNamespace

from minefield import report
from minefield.reproduce.common import Check, Section

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu vme sse sse2 avx fma avx2 bmi2
processor\t: 1
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu vme sse sse2 avx fma avx2 bmi2
"""


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
    assert data["cpu"] == report.cpu()


def test_cpuinfo_gives_the_model_and_vector_extensions():
    assert report.cpu_from_cpuinfo(CPUINFO) == ("AMD EPYC 7B13 64-Core Processor", ["avx2"])
    with_512 = CPUINFO.replace("avx2 bmi2", "avx2 bmi2 avx512f avx512bw")
    assert report.cpu_from_cpuinfo(with_512)[1] == ["avx512f", "avx2"]
    assert report.cpu_from_cpuinfo("") == ("", [])


def test_machine_names_the_cpu_model_and_instruction_set(tmp_path, monkeypatch):
    # regression: the report said only "x86_64, 2 CPU cores", so a reader could not tell an
    # AVX2 EPYC from an AVX-512 Xeon, whose oneDNN / MKL kernels round differently
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    monkeypatch.setattr(report, "_CPUINFO", info)
    line = report.machine()
    isa = report.torch.backends.cpu.get_cpu_capability()
    assert f"AMD EPYC 7B13 64-Core Processor (avx2; torch {isa})" in line
    assert "CPU cores" in line and "threads" in line


def test_machine_without_proc_cpuinfo_falls_back_to_platform(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_CPUINFO", tmp_path / "absent")
    monkeypatch.setattr(report.platform, "processor", lambda: "arm")
    isa = report.torch.backends.cpu.get_cpu_capability()
    assert report.cpu() == f"arm (torch {isa})"
