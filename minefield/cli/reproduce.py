"""``minefield reproduce``: every experiment of the paper, with a report."""

from __future__ import annotations

from pathlib import Path

import click

from ..reproduce import EXPERIMENTS, SCALES, reproduce
from ._common import device_option, force_option, friendly, main, quiet_option, root_of


@main.command("reproduce")
@click.option("--scale", type=click.Choice(list(SCALES)), default="small", show_default=True,
              help="small: 7-17 min on 2 CPU cores (by CPU model); paper: the paper's "
              "sizes (GPU).")
@click.option("--only", multiple=True, type=click.Choice(list(EXPERIMENTS)),
              help="Run only these experiments (repeatable); the report in --figures then "
              "holds only them (give another --figures to keep a full report).")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False),
              help="CIFAR-10 or SVHN on disk, for the real-image experiment.")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path),
              default=Path("figures"), show_default=True)
@click.option("--strict", is_flag=True, help="Exit with status 3 when a check fails (for "
              "CI); by default the report says so and the exit status is 0.")
@device_option
@force_option
@quiet_option
@click.pass_context
@friendly
def reproduce_cmd(ctx, scale, only, data_dir, figures, strict, device, force, quiet):
    """Reproduce the paper end to end; writes figures/ and figures/REPORT.md.

    Each experiment has its own run directory; re-running skips what is done.
    """
    sections = reproduce(scale, root_of(ctx), figures, device, force, data_dir,
                         tuple(only) or None, progress=not quiet, log=click.echo)
    click.echo("")
    click.echo(f"{'check':<7}{'holds':<7}measured")
    for s in sections:
        for c in s.checks:
            click.echo(f"{c.id:<7}{'yes' if c.passed else 'NO':<7}{c.measured}")
    click.echo(f"report: {figures / 'REPORT.md'}")
    failed = [str(c.id) for s in sections for c in s.checks if not c.passed]
    if strict and failed:
        click.echo(f"Error: check(s) {', '.join(failed)} failed", err=True)
        raise SystemExit(3)
