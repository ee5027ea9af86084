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

__all__ = ["write_report", "machine", "cpu", "cpu_from_cpuinfo"]


def _order(c) -> tuple[int, str]:
    # "8" < "8+" < "9" < "10"; ids without a number go last
    digits = "".join(ch for ch in c.id if ch.isdigit())
    return (int(digits) if digits else 10**6, c.id)


_CPUINFO = Path("/proc/cpuinfo")  # Linux; elsewhere the model comes from ``platform``
_ISA_FLAGS = ("avx512f", "avx2")  # the vector extensions oneDNN / MKL pick kernels by


def cpu_from_cpuinfo(text: str) -> tuple[str, list[str]]:
    r"""The CPU model and which of :data:`_ISA_FLAGS` it has, from ``/proc/cpuinfo``'s text.

    Same seed, same numbers holds only on the same instruction set: oneDNN and MKL
    choose their matmul and convolution kernels by it, and those kernels round
    differently. So the report names the CPU, not just its architecture.

    >>> cpu_from_cpuinfo("model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx2 fma\n")
    ('AMD EPYC 7B13', ['avx2'])
    >>> cpu_from_cpuinfo("processor : 0\n")  # e.g. ARM: no 'model name' line
    ('', [])
    """
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, [f for f in _ISA_FLAGS if f in flags]


def cpu() -> str:
    """The CPU model and vector extensions, e.g. ``"AMD EPYC 7B13 (avx2; torch AVX2)"``.
    Off Linux (no ``/proc/cpuinfo``) the model is ``platform.processor()``; torch's own
    ``get_cpu_capability()`` (the kernels it dispatches to) is there on every platform."""
    try:
        model, flags = cpu_from_cpuinfo(_CPUINFO.read_text())
    except OSError:
        model, flags = "", []
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    isa = f"torch {torch.backends.cpu.get_cpu_capability()}"
    return f"{model} ({'; '.join(filter(None, [', '.join(flags), isa]))})"


def machine() -> str:
    """One line describing where the numbers were measured: architecture, CPU model and
    vector extensions, cores, torch version and threads, GPU."""
    dev = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    return (f"{platform.machine()}, {cpu()}, {os.cpu_count()} CPU cores, torch "
            f"{torch.__version__} with {torch.get_num_threads()} threads, {dev}")


def _cell(x: object) -> str:
    """A Markdown table cell: ``|`` escaped (``|error|`` would split the row)."""
    return str(x).replace("|", "\\|")


def _rel(p: Path, base: Path) -> str:
    try:
        return os.path.relpath(p, base)
    except ValueError:
        return str(p)


def write_report(sections, ctx, seconds: float, partial: bool = False,
                 pending: list[str] | tuple[str, ...] = ()) -> Path:
    """Write REPORT.md (and report.json) into ``ctx.figures``; returns the Markdown path.
    ``partial``: the sections are those of ``--only``, and the header says so.
    ``pending``: experiments not run yet (a run in progress, or one that stopped): the
    header says the report is incomplete."""
    out = ctx.figures
    checks = [c for s in sections for c in s.checks]
    n_ok = sum(c.passed for c in checks)
    lines = [
        f"# Reproduction report: Huang et al. (2019), scale `{ctx.scale.name}`",
        "",
        f"Made by `minefield reproduce --scale {ctx.scale.name}` on {time.strftime('%Y-%m-%d')}"
        f" in {seconds / 60:.1f} minutes on {machine()}" + (
            f" (only {', '.join([s.key for s in sections] + list(pending))})." if partial
            else "."),
        *([f"**Incomplete**: not finished (still running, or stopped): {', '.join(pending)}; "
           "the checks below are those of the parts that finished."] if pending else []),
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
        "scale": ctx.scale.name, "seconds": seconds, "machine": machine(), "cpu": cpu(),
        "partial": partial, "pending": list(pending),
        "checks": [{"id": c.id, "text": c.text, "passed": c.passed, "measured": c.measured}
                   for c in checks],
        "sections": {s.key: {"runs": s.runs, "commands": s.commands, "seconds": s.seconds,
                             "data": s.data,
                             "figures": [_rel(f, out) for f in s.figures]} for s in sections},
    }
    write_json(out / "report.json", data)
    return md
