"""``figures/REPORT.md`` and ``figures/report.json`` from reproduction sections.

The Markdown holds, per experiment: the commands that redo it, our numbers beside
the paper's (tags as in PAPER.md: [P] paper, [D] draft, [C] authors' code,
[R] independent re-run), the reproduction checks, and the figures. The JSON
holds the same numbers in machine-readable form, so a test can compare the
report with the run directories it came from.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .runs import atomic_write, write_json

__all__ = ["write_report", "machine"]


def _order(c) -> tuple[int, str]:
    # "8" < "8+" < "9" < "10"; ids without a number go last
    digits = "".join(ch for ch in c.id if ch.isdigit())
    return (int(digits) if digits else 10**6, c.id)


def machine() -> str:
    """One line describing where the numbers were measured."""
    dev = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch "
            f"{torch.__version__} with {torch.get_num_threads()} threads, {dev}")


def _cell(x: object) -> str:
    """A Markdown table cell: ``|`` escaped (``|error|`` would split the row)."""
    return str(x).replace("|", "\\|")


def _rel(p: Path, base: Path) -> str:
    try:
        return os.path.relpath(p, base)
    except ValueError:
        return str(p)


def write_report(sections, ctx, seconds: float, partial: bool = False) -> Path:
    """Write REPORT.md (and report.json) into ``ctx.figures``; returns the Markdown path.
    ``partial``: the sections are those of ``--only``, and the header says so."""
    out = ctx.figures
    checks = [c for s in sections for c in s.checks]
    n_ok = sum(c.passed for c in checks)
    lines = [
        f"# Reproduction report: Huang et al. (2019), scale `{ctx.scale.name}`",
        "",
        f"Made by `minefield reproduce --scale {ctx.scale.name}` on {time.strftime('%Y-%m-%d')}"
        f" in {seconds / 60:.1f} minutes on {machine()}" + (
            f" (only {', '.join(s.key for s in sections)})." if partial
            else "."),
        f"Reproduction checks (PAPER.md): **{n_ok} of {len(checks)} hold**.",
        "",
        "| check | requirement | measured | holds |",
        "|---|---|---|---|",
    ]
    lines += [f"| {_cell(c.id)} | {_cell(c.text)} | {_cell(c.measured)} | "
              f"{'yes' if c.passed else '**no**'} |" for c in sorted(checks, key=_order)]
    for s in sections:
        lines += ["", f"## {s.title}", "", f"Runs: {', '.join(f'`{r}`' for r in s.runs) or '-'}"
                  f"; {s.seconds:.0f} s.", "", "```", *s.commands, "```", ""]
        if s.numbers:
            lines += ["| quantity | minefield | paper |", "|---|---|---|"]
            lines += [f"| {_cell(a)} | {_cell(b)} | {_cell(c)} |" for a, b, c in s.numbers]
        for f in s.figures:
            if f.suffix == ".png":
                lines += ["", f"![{f.stem}]({_rel(f, out)})"]
    md = out / "REPORT.md"
    atomic_write(md, ("\n".join(lines) + "\n").encode())
    data: dict[str, Any] = {
        "scale": ctx.scale.name, "seconds": seconds, "machine": machine(), "partial": partial,
        "checks": [{"id": c.id, "text": c.text, "passed": c.passed, "measured": c.measured}
                   for c in checks],
        "sections": {s.key: {"runs": s.runs, "commands": s.commands, "seconds": s.seconds,
                             "data": s.data,
                             "figures": [_rel(f, out) for f in s.figures]} for s in sections},
    }
    write_json(out / "report.json", data)
    return md
