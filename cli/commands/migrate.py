"""`warden migrate`: run data migrations with a progress bar, and steer them."""

from __future__ import annotations

import getpass
import json
import sys
import time
from typing import Any, NoReturn

import click

# How often the progress bar reads the migration's state (one indexed row).
POLL_SECONDS = 0.5
# Without a terminal (CI, logs): one progress line this often instead of a redrawn bar.
PLAIN_EVERY = 5.0
BAR_WIDTH = 30


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in a bare container
        return "cli:unknown"


def _known(name: str) -> None:
    from tasks.data_migrations import registry

    if name not in registry.names():
        _fail(f"unknown migration {name!r}; known: {', '.join(registry.names())}", 2)


def _service_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from tasks.data_migrations import service
    from workers.db import session_scope
    from workers.oplog import ReasonRequired

    try:
        with session_scope() as s:
            return fn(s, *args, **kwargs)
    except (service.MigrationUnknown, service.MigrationConflict, ReasonRequired) as exc:
        _fail(str(exc))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def render(m: dict[str, Any]) -> str:
    """One progress line: bar, rows, rows/s and ETA over running time only (paused and
    throttled time are shown apart and left out of both)."""
    total, done = m.get("rows_total"), int(m.get("rows_done") or 0)
    share = min(1.0, done / total) if total else 0.0
    filled = int(share * BAR_WIDTH)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    rate = m.get("rows_per_second")
    parts = [f"{m['name']} [{bar}] {share * 100:5.1f}%",
             f"{done:,}/{total:,} rows" if total is not None else f"{done:,} rows",
             f"{rate:,.0f} rows/s" if rate else "-- rows/s",
             f"ETA {_duration(m.get('eta_seconds'))}",
             f"{m['status']}"]
    if m.get("seconds_throttled"):
        parts.append(f"throttled {_duration(m['seconds_throttled'])}")
    if m.get("seconds_paused"):
        parts.append(f"paused {_duration(m['seconds_paused'])}")
    if m.get("rejected"):
        parts.append(f"rejected {m['rejected']:,}")
    return " | ".join(parts)


def _job(job_id: str) -> dict[str, Any] | None:
    from sqlalchemy import text

    from workers.db import session_scope

    with session_scope() as s:
        row = s.execute(text(
            "SELECT status, progress, result, error_code, error_message FROM job_runs "
            "WHERE id = CAST(:id AS uuid)"), {"id": job_id}).mappings().first()
    return dict(row) if row is not None else None


def _watch(name: str, job_id: str) -> int:
    """Redraw the bar until the run ends (following handovers to successor jobs); the exit
    code says how the migration ended."""
    from tasks.data_migrations import service

    tty = sys.stdout.isatty()
    last_plain = 0.0
    while True:
        job = _job(job_id)  # before the state: a finished job's state is then final too
        m = _service_call(service.summary, name)
        line = render(m)
        if tty:
            click.echo("\r" + line + "\033[K", nl=False)
        elif time.monotonic() - last_plain >= PLAIN_EVERY:
            click.echo(line)
            last_plain = time.monotonic()
        if job is not None and job["status"] in ("succeeded", "failed", "dead", "cancelled"):
            successor = (job.get("result") or {}).get("successor")
            if job["status"] == "succeeded" and successor:
                job_id = str(successor)  # the run handed over at its checkpoint
                continue
            click.echo("" if tty else line)  # end the redrawn line, or log the final one
            return _ended(m, job)
        time.sleep(POLL_SECONDS)


def _ended(m: dict[str, Any], job: dict[str, Any] | None) -> int:
    status = m["status"]
    if status == "succeeded":
        extra = f"; {m['rejected']:,} malformed records rejected (warden migrate status " \
                f"{m['name']})" if m["rejected"] else ""
        click.echo(f"{m['name']} succeeded: {m['rows_done']:,} rows, {m['rows_changed']:,} "
                   f"changed, {m['batches_done']:,} batches, longest batch "
                   f"{m['longest_batch_seconds']:.3f} s{extra}")
        return 0
    if status == "paused":
        reason = (m.get("paused") or {}).get("reason", "")
        click.echo(f"{m['name']} paused ({reason}); resume with: warden migrate resume "
                   f"{m['name']}")
        return 0
    if status == "cancelled":
        click.echo(f"{m['name']} cancelled at {m['rows_done']:,} rows")
        return 1
    error = m.get("last_error") or (job or {}).get("error_message") or "unknown error"
    click.echo(f"error: {m['name']} {status}: {error}", err=True)
    click.echo(f"  retry with: warden migrate retry {m['name']}", err=True)
    return 1


def _watch_dry(job_id: str) -> int:
    tty = sys.stdout.isatty()
    while True:
        job = _job(job_id)
        if job is None:
            _fail(f"job {job_id} vanished")
        progress = job.get("progress") or {}
        if tty and progress:
            done, total = progress.get("done", 0), progress.get("total")
            click.echo(f"\rdry run: {done:,}/{total or 0:,} rows\033[K", nl=False)
        if job["status"] in ("succeeded", "failed", "dead", "cancelled"):
            if tty:
                click.echo()
            if job["status"] != "succeeded":
                click.echo(f"error: dry run {job['status']}: {job['error_message']}", err=True)
                return 1
            click.echo(json.dumps(job["result"], indent=2, default=str))
            return 0
        time.sleep(POLL_SECONDS)


@click.group()
def migrate() -> None:
    """Data migrations: batched, resumable, throttled (see docs/jobs.md)."""


@migrate.command("data")
@click.argument("name")
@click.option("--dry-run", is_flag=True, help="transform and roll back each batch: counts only")
@click.option("--batch-size", type=click.IntRange(1, 1_000_000), default=None,
              help="fixed rows per batch (default: adapts to WARDEN_MIGRATION_BATCH_SECONDS)")
@click.option("--detach", is_flag=True, help="enqueue and return without the progress bar")
def data(name: str, dry_run: bool, batch_size: int | None, detach: bool) -> None:
    """Run (or resume) migration NAME and show its progress; Ctrl-C leaves it running."""
    from tasks.data_migrations import service
    from workers.enqueue import submit

    _known(name)
    params: dict[str, Any] = {"name": name, "dry_run": dry_run}
    if batch_size is not None:
        params["batch_size"] = batch_size
    if not dry_run:
        current = _service_call(service.summary, name)
        if current["status"] in ("queued", "running") and current["job_status"] in (
                "queued", "running", "retrying"):
            click.echo(f"{name} is already {current['status']} (job {current['job_id']}); "
                       "showing its progress", err=True)
            if not detach:
                sys.exit(_watch(name, current["job_id"]))
            return
        if current["status"] == "paused":
            # the state change and its run commit together (review N6)
            resumed = _service_call(service.resume_run, name, actor=_actor(),
                                    reason="warden migrate data", source="cli",
                                    params=params)
            resumed.publish()  # committed; if this send fails, the relay sends it
            job_id = resumed.job_id
        else:
            job_id = str(submit("migration.run", params, source="cli").job["id"])
    else:
        job_id = str(submit("migration.run", params, source="cli").job["id"])
    click.echo(f"{'dry run of ' if dry_run else ''}{name}: job {job_id}", err=True)
    if detach:
        click.echo(job_id)
        return
    try:
        sys.exit(_watch_dry(job_id) if dry_run else _watch(name, job_id))
    except KeyboardInterrupt:
        click.echo(f"\nstill running; watch again with: warden migrate data {name}", err=True)
        sys.exit(130)


@migrate.command("status")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable")
def status(name: str | None, as_json: bool) -> None:
    """Every migration (or NAME, with its last batches) with state, progress and last error."""
    from tasks.data_migrations import service

    if name is not None:
        _known(name)

        def detail(s: Any) -> dict[str, Any]:
            out = service.summary(s, name)
            out["batches"] = service.batches(s, name, limit=10)
            out["pauses"] = service.pauses(s, name, limit=10)
            out["rejects"] = service.rejects(s, name, limit=20)
            return out

        rows = [_service_call(detail)]
    else:
        rows = _service_call(service.list_migrations)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for m in rows:
        click.echo(render(m))
        click.echo(f"    run {m['run_no']}, attempt {m['attempts']}/{m['max_attempts']}, "
                   f"batch size {m['batch_size'] or '-'}, longest batch "
                   f"{m['longest_batch_seconds']:.3f} s"
                   + (f", job {m['job_id']} ({m['job_status']})" if m["job_id"] else ""))
        if m.get("paused"):
            click.echo(f"    paused ({m['paused']['kind']}): {m['paused']['reason']}")
        if m["last_error"]:
            click.echo(f"    last error: {m['last_error']}")
        for b in m.get("batches", []):
            click.echo(f"    batch {b['batch_no']} ({b['lower_id']}, {b['upper_id']}] "
                       f"{b['size']} rows {b['status']} x{b['attempts']} "
                       f"{(b['seconds'] or 0):.3f} s {b['error'] or ''}".rstrip())
        for r in m.get("rejects", []):
            click.echo(f"    rejected: character {r['row_id']} record {r['position']}: "
                       f"{r['reason']}")


@migrate.command("pause")
@click.argument("name")
@click.option("--reason", required=True, help="why (operator log)")
def pause(name: str, reason: str) -> None:
    """Stop NAME after its current batch; its job ends (no lock, no worker held)."""
    from tasks.data_migrations import service

    _known(name)
    m = _service_call(service.pause, name, actor=_actor(), reason=reason)
    click.echo(f"{name} {m['status']} at {m['rows_done']:,} rows")


@migrate.command("resume")
@click.argument("name")
@click.option("--reason", default="resumed by an operator", show_default=True)
def resume(name: str, reason: str) -> None:
    """Queue a new run of paused NAME, starting at its checkpoint."""
    from tasks.data_migrations import service

    _known(name)
    # the state change and its run commit together (review N6)
    resumed = _service_call(service.resume_run, name, actor=_actor(), reason=reason,
                            source="cli")
    resumed.publish()  # committed; if this send fails, the relay sends it
    click.echo(f"{name} resumed: job {resumed.job_id}")


@migrate.command("cancel")
@click.argument("name")
@click.option("--reason", required=True, help="why (operator log)")
def cancel(name: str, reason: str) -> None:
    """Stop NAME for good (a later run starts a new pass)."""
    from tasks.data_migrations import service

    _known(name)
    m = _service_call(service.cancel, name, actor=_actor(), reason=reason)
    click.echo(f"{name} {m['status']} at {m['rows_done']:,} rows")


@migrate.command("retry")
@click.argument("name")
@click.option("--reason", default="retried by an operator", show_default=True)
def retry(name: str, reason: str) -> None:
    """Run failed NAME again from its checkpoint (its failed job, retried)."""
    from api_stub.routes.migrations import retry_plan
    from tasks.data_migrations import service

    _known(name)
    plan = _service_call(service.retry, name, actor=_actor(), reason=reason)
    click.echo(f"{name} retried: job {retry_plan(plan)}")


@migrate.command("reverse")
@click.argument("name")
@click.option("--reason", required=True, help="why (operator log)")
def reverse(name: str, reason: str) -> None:
    """Undo what NAME made (batch by batch) and set it back to pending."""
    from workers.enqueue import submit

    _known(name)
    sub = submit("migration.reverse", {"name": name, "reason": reason, "actor": _actor()},
                 source="cli")
    click.echo(f"{name} reverse: job {sub.job['id']}")


COMMANDS = [migrate]
