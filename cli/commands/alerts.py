"""`warden alerts render [--check]`: write compose/alerts.yml from the hand-written rules and
one staleness rule per beat entry (workers/alerts.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from workers import alerts


@click.group("alerts")
def alerts_group() -> None:
    """Prometheus alert rules."""


@alerts_group.command("render")
@click.option("--check", is_flag=True,
              help="write nothing; exit 1 when the file differs from what would be written")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              default=alerts.OUTPUT, show_default=True)
def render(check: bool, output: Path) -> None:
    """Render the rules: compose/alerts.static.yml plus a rule per schedules/ entry."""
    text = alerts.render()
    if check:
        current = output.read_text() if output.exists() else ""
        if current != text:
            click.echo(f"{output} is stale: run `warden alerts render`", err=True)
            sys.exit(1)
        click.echo(f"{output} is current")
        return
    output.write_text(text)
    click.echo(f"wrote {output} ({text.count('- alert: ')} rules)")


COMMANDS = [alerts_group]
