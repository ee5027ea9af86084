"""``minefield reproduce``: the paper's experiments end to end, with a report.

Each experiment is one module (``swissroll``, ``sweep``, ``fig1``, ``oracle``,
``circles``, ``images``) that trains into its own run directories
(``runs/repro-<scale>-*``) through :mod:`minefield.stages`, so re-running
skips what is done (training resumes, searches keep finished minima, basin,
sweep and embedding results are reused when their configs match), and returns
a :class:`Section`: the commands that redo it by hand (generated from the
configs that ran, :mod:`minefield.commands`), the numbers measured beside the
paper's (``PAPER.md``), the reproduction checks and the figures.
:func:`minefield.report.write_report` turns the sections into
``figures/REPORT.md`` and ``figures/report.json``.

Scales: ``tiny`` (the end-to-end test: seconds), ``small`` (7-17 minutes on
2 CPU cores, meets the CPU checks) and ``paper`` (the paper's sizes; for a GPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..config import DataConfig
from ..data import load_dataset
from ..lock import locking
from ..runs import DEFAULT_ROOT
from .circles import exp_circles
from .common import SCALES, Check, Context, Scale, Section
from .fig1 import exp_minefield
from .images import exp_digits
from .oracle import exp_volume_oracle
from .paper_images import exp_images, image_dataset
from .sweep import exp_sweep
from .swissroll import exp_swissroll

__all__ = ["Scale", "SCALES", "Section", "Check", "Context", "reproduce", "EXPERIMENTS"]

EXPERIMENTS: dict[str, Callable[[Context], Section | None]] = {
    "swissroll": exp_swissroll,
    "sweep": exp_sweep,
    "minefield": exp_minefield,
    "oracle": exp_volume_oracle,
    "circles": exp_circles,
    "digits": exp_digits,
    "images": exp_images,
}


@locking
def reproduce(scale: str = "small", root: Path | str = DEFAULT_ROOT,
              figures: Path | str = Path("figures"), device: str = "auto", force: bool = False,
              data_dir: str | None = None, only: tuple[str, ...] | None = None,
              progress: bool = True, log: Callable[[str], None] = print) -> list[Section]:
    """Run the paper's experiments at ``scale``; write figures and ``figures/REPORT.md``.

    Returns the report's sections. Re-running resumes; ``force`` redoes everything.
    """
    from ..report import write_report

    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose from {', '.join(SCALES)}")
    keys = list(only or EXPERIMENTS)
    unknown = [k for k in keys if k not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; choose from {list(EXPERIMENTS)}")
    if data_dir and "images" in keys:  # a bad folder is refused now, not after the rest
        load_dataset(DataConfig(image_dataset(Path(data_dir)), data_dir=str(data_dir)))
    if not data_dir and set(keys) <= {"images"}:  # else an empty report replaced the last
        raise ValueError("--only images needs --data-dir (CIFAR-10 or SVHN); nothing to run")
    ctx = Context(SCALES[scale], Path(root), Path(figures), device, force, progress,
                  data_dir, log)
    ctx.figures.mkdir(parents=True, exist_ok=True)
    sections: list[Section] = []
    t_all = time.perf_counter()

    def report(pending: list[str]) -> None:
        write_report(sections, ctx, time.perf_counter() - t_all, partial=bool(only),
                     pending=pending)

    # the last report goes now, not at the end: the parts rewrite its figures as they run,
    # and an interrupted or failed run had left it beside figures it never measured
    report(keys)
    for i, key in enumerate(keys, 1):
        log(f"[{i}/{len(keys)}] {key}")
        t0 = time.perf_counter()
        sec = EXPERIMENTS[key](ctx)
        if sec is None:
            log("  skipped (no --data-dir)")
            report(keys[i:])
            continue
        sec.seconds = time.perf_counter() - t0
        sections.append(sec)
        log(f"  done in {sec.seconds:.0f} s: " + "; ".join(
            f"check {c.id} {'ok' if c.passed else 'FAILED'}" for c in sec.checks))
        report(keys[i:])
    return sections
