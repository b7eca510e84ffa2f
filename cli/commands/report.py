"""`warden report [--json] [--period H] [--alert]`: the health report of DOMAIN.md.

Submits a report.health job (the worker computes and stores it), waits and prints it.
Exit 0 healthy, 1 degraded, 2 error. `--alert` lets a degraded report POST its alert to
WARDEN_ALERT_WEBHOOK_URL (beat's hourly report always may; the CLI's only when asked, as
the seed's `monitor_validation --alert`).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from cli.commands.audit import EXIT_CLEAN, EXIT_FINDINGS, dump, errors_exit_2, run_job


def _print(stored: dict[str, Any]) -> None:
    report = stored["report"]
    c = report["checks"]
    integrity, xp, scenes, stats = (c["data_integrity"], c["xp_activity"],
                                    c["scene_xp_awards"], c["character_stats"])
    click.echo(f"health report {stored['id']} at {report['timestamp']} over the last "
               f"{report['period_hours']} h: score {report['health_score']} "
               f"({report['status']})")
    click.echo(f"  data_integrity   findings={integrity['findings']} "
               f"penalty={integrity['penalty']}")
    rate = "n/a" if xp["approval_rate"] is None else f"{xp['approval_rate']:.1%}"
    click.echo(f"  xp_activity      requests={xp['requests']} decisions={xp['decisions']} "
               f"approval_rate={rate} penalty={xp['penalty']}")
    click.echo(f"  scene_xp_awards  finished={scenes['finished']} awarded={scenes['awarded']} "
               f"awaiting={scenes['awaiting']} penalty={scenes['penalty']}")
    click.echo(f"  character_stats  total={stats['total']} by_status={stats['by_status']} "
               f"average_xp={stats['average_xp']}")
    if stored["alert_state"] not in ("none",):
        click.echo(f"  alert: {stored['alert_state']}")


@click.command("report")
@click.option("--json", "as_json", is_flag=True, help="print the report's JSON")
@click.option("--period", "period", default=24, show_default=True,
              type=click.IntRange(1, 24 * 366), help="hours every activity figure covers")
@click.option("--alert", is_flag=True, help="POST an alert if the report is degraded")
@click.option("--timeout", default=600.0, show_default=True, help="seconds to wait")
def report(as_json: bool, period: int, alert: bool, timeout: float) -> None:
    """Compute and store the health report; exit 0 healthy, 1 degraded, 2 error."""
    with errors_exit_2():
        job = run_job("report.health", {"period_hours": period, "alert": alert}, timeout)
    stored = job["result"]
    if as_json:
        dump(stored["report"])
    else:
        _print(stored)
    sys.exit(EXIT_CLEAN if stored["status"] == "healthy" else EXIT_FINDINGS)


COMMANDS: list[click.Command] = [report]
