"""`warden backup list|show|create|verify|prune` and `warden restore`.

create/verify/prune submit jobs (the worker runs them, the job core keeps one of each at a
time); `--wait` follows the job to its end. `prune --dry-run` and `restore` run here.
"""

from __future__ import annotations

import getpass
import json
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

import click

from tasks.backups.schemas import human_size

if TYPE_CHECKING:
    from tasks.backups.restore import RestoreReport


def _fail(message: str, code: int = 1) -> NoReturn:
    """One clear line on stderr and a non-zero exit (as cli.main.fail)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(0, seconds))
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


# A plain PostgreSQL identifier: what an operator would type for a copy. Anything else
# ('bad name;drop') is quoted safely, but is much more likely a slip than a wish (drill D9).
_DB_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,62}"


def _database_name(value: str) -> str:
    import re

    if not re.fullmatch(_DB_NAME, value):
        raise click.BadParameter(f"{value!r} is not a plain database name (letters, digits and "
                                 "_, at most 63, not starting with a digit)")
    return value


def _submit_and_maybe_wait(job_type: str, params: dict[str, Any], wait: bool, timeout: float,
                           key: str | None = None) -> None:
    from workers import jobstore
    from workers.enqueue import submit

    sub = submit(job_type, params, idempotency_key=key, source="cli")
    job_id = str(sub.job["id"])
    if not wait:
        click.echo(f"job {job_id} ({job_type}) {sub.job['status']}; follow it with "
                   f"`warden job {job_id}`")
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = jobstore.get(job_id)
        if row is not None and row["status"] in ("succeeded", "failed", "dead", "cancelled"):
            click.echo(json.dumps({"job_id": job_id, "status": row["status"],
                                   "result": row["result"], "error_code": row["error_code"],
                                   "error_message": row["error_message"]}, indent=2,
                                  default=str))
            sys.exit(0 if row["status"] == "succeeded" else 1)
        time.sleep(0.25)
    from cli.waiting import not_finished

    _fail(not_finished(job_id, timeout))


@click.group()
def backup() -> None:
    """Backups: list them, make one, verify one, apply retention."""


@backup.command("list")
@click.option("--all", "include_pruned", is_flag=True, help="include pruned backups")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="one JSON object per backup")
def list_cmd(include_pruned: bool, limit: int, as_json: bool) -> None:
    """Each backup with its size, age, verdict and measured restore time."""
    from tasks.backups import service
    from workers.db import session_scope

    with session_scope() as s:
        rows = service.list_backups(s, include_pruned=include_pruned, limit=limit)
    if as_json:
        for r in rows:
            click.echo(json.dumps(r, default=str))
        return
    if not rows:
        click.echo("no backups yet: `warden backup create --wait` makes one")
        return
    click.echo(f"{'ID':>6}  {'TAKEN (UTC)':<19}  {'AGE':>8}  {'SIZE':>10}  {'STATUS':<9}  "
               f"{'VERDICT':<9}  {'RESTORE':>9}")
    for r in rows:
        taken = r["snapshot_at"] or r["started_at"]
        verdict = "verifying" if r["verifying"] else (r["verdict"] or "-")
        restore = f"{r['restore_seconds']:.1f} s" if r["restore_seconds"] is not None else "-"
        click.echo(f"{r['id']:>6}  {taken:%Y-%m-%d %H:%M:%S}  {_age(r['age_seconds']):>8}  "
                   f"{human_size(r['bytes']):>10}  {r['status']:<9}  {verdict:<9}  {restore:>9}")


@backup.command("show")
@click.argument("backup_id", type=click.IntRange(1))
def show_cmd(backup_id: int) -> None:
    """One backup as JSON: manifest row counts and the last verification report."""
    from tasks.backups import service
    from workers.db import session_scope

    with session_scope() as s:
        row = service.get_backup(s, backup_id)
    if row is None:
        _fail(f"no backup {backup_id}")
    click.echo(json.dumps(row, indent=2, default=str))


@backup.command("create")
@click.option("--no-verify", is_flag=True, help="do not verify the new backup afterwards")
@click.option("--wait", is_flag=True, help="wait for the backup job; exit 1 unless it succeeds")
@click.option("--timeout", default=3600.0, show_default=True, help="seconds --wait waits")
def create_cmd(no_verify: bool, wait: bool, timeout: float) -> None:
    """Submit a backup.create job (its verification follows unless --no-verify)."""
    _submit_and_maybe_wait("backup.create", {"verify": not no_verify}, wait, timeout)


@backup.command("verify")
@click.argument("backup_id", type=click.IntRange(1))
@click.option("--wait", is_flag=True, help="wait for the verdict; exit 1 unless it passed")
@click.option("--timeout", default=3600.0, show_default=True, help="seconds --wait waits")
def verify_cmd(backup_id: int, wait: bool, timeout: float) -> None:
    """Submit a backup.verify job: restore the backup into a scratch database and check it."""
    from tasks.backups import service
    from workers.db import session_scope

    # Refused here, not by a job that fails `backup_not_found` and stays in the failed list.
    with session_scope() as s:
        if service.get_backup(s, backup_id) is None:
            _fail(f"no backup {backup_id} (`warden backup list` shows them); nothing submitted")
    _submit_and_maybe_wait("backup.verify", {"backup_id": backup_id}, wait, timeout)


@backup.command("prune")
@click.option("--dry-run", is_flag=True, help="list what would be deleted; delete nothing")
@click.option("--keep-daily", type=click.IntRange(0), default=None,
              help="default WARDEN_BACKUP_KEEP_DAILY")
@click.option("--keep-weekly", type=click.IntRange(0), default=None,
              help="default WARDEN_BACKUP_KEEP_WEEKLY")
@click.option("--keep-monthly", type=click.IntRange(0), default=None,
              help="default WARDEN_BACKUP_KEEP_MONTHLY")
@click.option("--wait", is_flag=True, help="wait for the prune job")
@click.option("--timeout", default=600.0, show_default=True, help="seconds --wait waits")
def prune_cmd(dry_run: bool, keep_daily: int | None, keep_weekly: int | None,
              keep_monthly: int | None, wait: bool, timeout: float) -> None:
    """Apply retention; never the newest verified backup nor one being verified."""
    if not dry_run:
        _submit_and_maybe_wait("backup.prune", {"keep_daily": keep_daily,
                                                "keep_weekly": keep_weekly,
                                                "keep_monthly": keep_monthly}, wait, timeout)
        return
    from tasks.backups import service
    from workers.db import session_scope

    policy = service.policy_from_settings(keep_daily, keep_weekly, keep_monthly)
    with session_scope() as s:
        plan = service.prune_backups(s, policy, dry_run=True)
    click.echo(f"policy: daily={policy.daily} weekly={policy.weekly} monthly={policy.monthly}")
    for kept in plan["kept"]:
        click.echo(f"keep    {kept['backup_id']:>6}  {', '.join(kept['reasons'])}")
    for gone in plan["deleted"]:
        click.echo(f"delete  {gone['backup_id']:>6}  {gone['snapshot_at'][:19]}  "
                   f"{human_size(gone['bytes'])}  {gone['path']}")
    click.echo(f"would delete {len(plan['deleted'])} backups ({human_size(plan['bytes_freed'])}); "
               "nothing was deleted (--dry-run)")


@backup.command("adopt")
def adopt_cmd() -> None:
    """Rebuild the backups table from the manifests in WARDEN_BACKUP_DIR (after a restore:
    a dump never holds the table's rows)."""
    from tasks.backups.restore import adopt_manifests

    added = adopt_manifests()
    click.echo(f"{added} backups added from their manifests")


@click.command()
@click.argument("backup_id", type=click.IntRange(1))
@click.option("--target-db", required=True, callback=lambda _c, _p, v: _database_name(v),
              help="database to restore into (created if absent): letters, digits and _, "
                   "at most 63, not starting with a digit")
@click.option("--force", count=True,
              help="restore over a non-empty database; twice for the live application database")
@click.option("--reason", default=None, help="recorded in the operator log")
def restore(backup_id: int, target_db: str, force: int, reason: str | None) -> None:
    """Restore a backup into a database: checksum first, row counts after.

    The jobs the backup held unfinished (queued, retrying, running, waiting) are cancelled
    in the restored database before anything is reported (error_code restored_copy, a
    message naming the backup, the database and when): no worker started on a copy ever
    runs them, and over the live database (--force twice) nothing from the backup's time
    runs again by itself either; an operator submits again what should still run.
    """
    from tasks.backups import restore as restoring
    from workers.errors import JobError

    try:
        report = restoring.restore(backup_id, target_db, force=force, actor=_actor(),
                                 reason=reason, echo=lambda line: click.echo(line, err=True))
    except restoring.RestoreRefused as exc:
        _fail(str(exc))
    except JobError as exc:  # client tools too old, and the like
        _fail(str(exc))
    made = "a new database" if report.created else "an existing database"
    click.echo(f"restored backup {backup_id} into {target_db} ({made}) in "
               f"{report.seconds:.1f} s, from the {report.source}")
    width = max([len(t) for t in report.counts] + [5])
    click.echo(f"{'TABLE':<{width}}  {'BACKUP':>10}  {'RESTORED':>10}")
    for table, (expected, restored) in report.counts.items():
        mark = ("  (not in the backup)" if expected is None
                else "" if expected == restored else "  MISMATCH")
        click.echo(f"{table:<{width}}  {'-' if expected is None else expected:>10}  "
                   f"{'-' if restored is None else restored:>10}{mark}")
    if report.adopted:
        click.echo(f"backups table rebuilt from {report.adopted} manifests in the backup dir")
    click.echo(_jobs_line(report))
    if not report.ok:
        _fail("restored row counts differ from the backup's manifest (see MISMATCH above)")
    counted = sum(1 for expected, _ in report.counts.values() if expected is not None)
    click.echo(f"all {counted} tables of the backup match its row counts")
    if not report.over_live:
        click.echo(f"audit the copy in this process (no broker, no worker): "
                   f"WARDEN_DATABASE_URL={_copy_url(target_db)} warden audit --inline")


def _jobs_line(report: RestoreReport) -> str:
    """What the restore did to the unfinished jobs the backup held."""
    from tasks.backups.restore import RESTORED_JOB_CODE

    n = sum(report.jobs_stopped.values())
    where = "of the backup" if report.over_live else "in the copy"
    line = f"{n} unfinished job(s) {where} cancelled"
    if not n:
        return line
    states = ", ".join(f"{k} {v}" for k, v in sorted(report.jobs_stopped.items()))
    line += f" ({states}; error_code {RESTORED_JOB_CODE}): "
    if report.over_live:
        return line + ("nothing from the backup's time runs again by itself; `warden jobs "
                       "--status cancelled` lists them, submit again what should still run")
    return line + "no worker or relay started on the copy will run them"


def _copy_url(target_db: str) -> str:
    """The application database's URL with the copy's name (the password hidden)."""
    from sqlalchemy.engine import make_url

    from workers.settings import get_settings

    url = make_url(get_settings().libpq_dsn()).set(database=target_db)
    return url.render_as_string(hide_password=True)


COMMANDS = [backup, restore]
