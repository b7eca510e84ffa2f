"""`warden report [--json] [--period H] [--alert]`: the health report of DOMAIN.md.

Submits a report.health job (the worker computes and stores it), waits and prints it;
`--inline` computes and stores it in this process against WARDEN_DATABASE_URL
(cli/inline.py). Exit 0 healthy, 1 degraded, 2 error. `--alert` lets a degraded report POST
its alert to WARDEN_ALERT_WEBHOOK_URL (beat's hourly report always may; the CLI's only when
asked, as the seed's `monitor_validation --alert`).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from cli.commands.audit import (
    EXIT_CLEAN,
    EXIT_FINDINGS,
    dump,
    errors_exit_2,
    fail,
    inline_option,
    run_job,
    to_stderr,
)


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
    # Two populations, said as such: requests *created* in the period by their state now,
    # and the decisions *made* in it. "requests={'Denied': 0} decisions=14" read as a
    # contradiction (drill D5): those 14 were requests created before the period.
    created = " ".join(f"{k}={v}" for k, v in sorted(xp["requests"].items()))
    click.echo(f"  xp_activity      requests created in the period: {created}; decided in "
               f"the period: {xp['decisions']} (approved {xp['approved']}, denied "
               f"{xp['denied']}), approval_rate={rate} penalty={xp['penalty']}")
    click.echo(f"  scene_xp_awards  played in the period: finished={scenes['finished']} "
               f"awarded={scenes['awarded']}; awaiting XP (played any time)="
               f"{scenes['awaiting']} penalty={scenes['penalty']}")
    click.echo(f"  character_stats  total={stats['total']} by_status={stats['by_status']} "
               f"average_xp={stats['average_xp']}")
    if stored["alert_state"] not in ("none",):
        click.echo(f"  alert: {stored['alert_state']}")


@click.command("report")
@click.option("--json", "as_json", is_flag=True, help="print the report's JSON")
@click.option("--period", "period", default=24, show_default=True,
              type=click.IntRange(1, 24 * 366), help="hours every activity figure covers")
@click.option("--alert", is_flag=True, help="POST an alert if the report is degraded")
@click.option("--timeout", default=600.0, show_default=True,
              help="seconds to wait for the job (not used with --inline)")
@inline_option("the report")
def report(as_json: bool, period: int, alert: bool, timeout: float, inline: bool) -> None:
    """Compute and store the health report; exit 0 healthy, 1 degraded, 2 error.

    --inline computes and stores it here, on the database WARDEN_DATABASE_URL names, and
    prints the same. It is still a report.health job of that database: its job_runs row
    (source cli-inline, run by this process, never retried) is the job_id of the stored
    report. --alert is refused with --inline: the alert is a job of its own, delivered and
    retried by a worker, and a report of a restored copy must not page anyone.
    """
    if inline and alert:
        fail("--alert needs a worker (the alert is a job, retried with backoff); drop "
             "--inline to send it, or --alert to only compute the report")
    with errors_exit_2():
        if inline:
            stored = _report_inline(period)
        else:
            stored = run_job("report.health", {"period_hours": period, "alert": alert},
                             timeout)["result"]
    if as_json:
        dump(stored["report"])
    else:
        _print(stored)
    sys.exit(EXIT_CLEAN if stored["status"] == "healthy" else EXIT_FINDINGS)


def _report_inline(period: int) -> dict[str, Any]:
    """What the report.health task does, in this process, with no alert; returns the job's
    result (the stored report)."""
    from cli import inline
    from tasks.reports import service
    from tasks.reports.schemas import Health
    from workers.settings import get_settings

    params = Health(period_hours=period, alert=False)
    webhook = get_settings().alert_webhook_url is not None
    with (inline.run("report.health", params, echo=to_stderr) as job,
          job.session() as session):
        stored = service.create_report(session, params.period_hours, job_id=job.id,
                                       alert=params.alert, webhook_configured=webhook)
        return dict(job.complete(session, stored))


COMMANDS: list[click.Command] = [report]
