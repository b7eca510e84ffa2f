"""`warden audit [--fix --reason WHY] [--json] [--verbose] [--check NAME] [--inline]`,
`warden audit runs|show|undo`.

`warden audit` submits an audit.integrity job (the worker runs it; the job core keeps one
at a time), waits for it and prints the stored run. With `--inline` it runs the audit in
this process against WARDEN_DATABASE_URL (cli/inline.py: no broker, no worker, no Redis),
which is how a restored copy is audited. Exit codes, for cron and CI: 0 clean, 1 findings
remain, 2 error (the job failed, timed out, or the database is unreachable).
`--fix` is an operator action: it needs `--reason`, and the fix is recorded in the
operator log with who (cli:<login>) and why, as `undo` is. `undo` runs here, in one
transaction.
"""

from __future__ import annotations

import getpass
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from domain import rules

FINAL = ("succeeded", "failed", "dead", "cancelled")
EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """One clear line on stderr and a non-zero exit (as cli.main.fail; 2 = error here)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


@contextmanager
def errors_exit_2() -> Iterator[None]:
    """Expected failures as one line and exit 2 (cli.main would exit 1, which here means
    'findings remain')."""
    import redis
    import sqlalchemy.exc

    from workers.errors import JobError
    from workers.settings import SettingsError

    try:
        yield
    except SettingsError as exc:
        fail(str(exc))
    except sqlalchemy.exc.OperationalError as exc:
        first = str(exc.orig).splitlines()[0] if exc.orig else str(exc)
        fail(f"database unreachable or busy: {first}")
    except redis.RedisError as exc:
        fail(f"Redis unreachable: {exc}")
    except JobError as exc:
        fail(str(exc))


def run_job(job_type: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Submit a job as the CLI, wait for its end; its row (exit 2 unless it succeeded)."""
    from pydantic import ValidationError

    from workers import jobstore
    from workers.enqueue import submit

    try:
        sub = submit(job_type, params, source="cli")
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"param {'.'.join(str(p) for p in first['loc'])}: {first['msg']}")
    job_id = str(sub.job["id"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = jobstore.get(job_id)
        if row is not None and row["status"] in FINAL:
            if row["status"] != "succeeded":
                fail(f"job {job_id} {row['status']}: {row['error_code']}: "
                     f"{(row['error_message'] or '').splitlines()[0][:300]}")
            return dict(row)
        time.sleep(0.2)
    from cli.waiting import not_finished

    fail(not_finished(job_id, timeout))


def to_stderr(line: str) -> None:
    """A note for the operator that keeps stdout what scripts parse."""
    click.echo(line, err=True)


def inline_option(what: str) -> Callable[[Any], Any]:
    """`--inline`, the same on every command that works on a database."""
    return click.option(
        "--inline", is_flag=True,
        help=f"run {what} in this process against WARDEN_DATABASE_URL: no broker, no worker, "
             "no Redis (how a restored copy is checked: without it the job is only queued "
             "in that database, and run by whichever worker takes the message)")


def dump(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, sort_keys=False))


def _print_run(run: dict[str, Any]) -> None:
    click.echo(f"audit run {run['id']} ({run['mode']}, rules {run['rules_version']}) "
               f"{run['started_at']:%Y-%m-%d %H:%M:%S} -> {run['finished_at']:%H:%M:%S}")
    for name in run["checks"]:
        t = run["totals"].get(name, {})
        extra = "".join(f"  {k}={v}" for k, v in t.items()
                        if k not in ("findings", "reports") and v)
        reports = f"  reports={t['reports']}" if t.get("reports") else ""
        click.echo(f"  {name:<28} findings={t.get('findings', 0)}{reports}{extra}")
    click.echo(f"findings={run['findings']} fixed={run['fixed']} remaining={run['remaining']} "
               f"changed_rows={run['changed_rows']} "
               f"forced_status_changes={run['forced_status_changes']}")
    if run["mode"] == "fix" and run["changed_rows"] and not run["undone_at"]:
        click.echo(f"undo with: warden audit undo {run['id']}")


def _each_finding(run_id: int, check: str | None) -> Iterator[dict[str, Any]]:
    from tasks.audits import service
    from workers.db import session_scope

    after: tuple[str, int] | None = None
    while True:
        with session_scope() as s:
            page = service.findings(s, run_id, check=check, limit=1000, after=after)
        yield from page
        if len(page) < 1000:
            return
        after = (page[-1]["check"], page[-1]["id"])


def _finding_line(f: dict[str, Any]) -> str:
    outcome = f" [{f['outcome']}]" if f["outcome"] else ""
    fix = f"  fix {json.dumps(f['fix'])}" if f["fixable"] and f["fix"] is not None else ""
    return (f"  {f['check']:<26} {f['entity']} {f['entity_id']:<10} {f['field']}="
            f"{json.dumps(f['value'])}  expected {f['expected']}{fix}{outcome}")


def _show(run_id: int, *, as_json: bool, verbose: bool, check: str | None) -> dict[str, Any]:
    from tasks.audits import service
    from tasks.audits.schemas import AuditRunOut, FindingOut
    from workers.db import session_scope

    with session_scope() as s:
        run = service.get_run(s, run_id)
    if as_json:
        out: dict[str, Any] = AuditRunOut(**run).model_dump(mode="json")
        if verbose:  # the API's {run, findings} shape, with every finding
            out = {"run": out, "findings": [FindingOut(**f).model_dump(mode="json")
                                            for f in _each_finding(run_id, check)]}
        dump(out)
    else:
        _print_run(run)
        if verbose:
            for f in _each_finding(run_id, check):
                click.echo(_finding_line(f))
    return run


@click.group("audit", invoke_without_command=True)
@click.option("--fix", is_flag=True, help="apply every fix in one transaction (needs --reason)")
@click.option("--reason", default=None,
              help="why (operator log); required with --fix, which is an operator action")
@click.option("--json", "as_json", is_flag=True,
              help="print the stored run as JSON ({run, findings} with --verbose)")
@click.option("--verbose", "-v", is_flag=True, help="list every finding as well")
@click.option("--check", "checks", multiple=True, type=click.Choice(rules.INTEGRITY_CHECKS),
              help="run only this check (repeatable)")
@click.option("--timeout", default=3600.0, show_default=True,
              help="seconds to wait (--inline: for an audit already running to end first)")
@inline_option("the audit (and its fix)")
@click.pass_context
def audit(ctx: click.Context, fix: bool, reason: str | None, as_json: bool, verbose: bool,
          checks: tuple[str, ...], timeout: float, inline: bool) -> None:
    """Run the integrity audit and print its run; exit 0 clean, 1 findings remain, 2 error.

    --inline runs it here, on the database WARDEN_DATABASE_URL names, and prints the same.
    It is still an audit.integrity job of that database: its job_runs row (source
    cli-inline, run by this process, never retried) is the job_id of the stored audit run,
    and it is still one at a time: an audit job running there is waited for (--timeout).
    """
    if ctx.invoked_subcommand is not None:
        return
    reason = reason.strip() if reason else None
    if fix and not reason:
        fail("--fix is an operator action: give --reason WHY (recorded in the operator log)")
    if reason and not fix:
        fail("--reason goes with --fix (a check changes nothing, so it logs nothing)")
    with errors_exit_2():
        if inline:
            run_id = _audit_inline(fix, reason, checks, timeout)
        else:
            params: dict[str, Any] = {"fix": fix}
            if checks:
                params["checks"] = list(checks)
            if fix:
                params.update(reason=reason, actor=actor())
            run_id = int(run_job("audit.integrity", params, timeout)["result"]["run_id"])
        run = _show(run_id, as_json=as_json, verbose=verbose,
                    check=checks[0] if len(checks) == 1 else None)
    sys.exit(EXIT_CLEAN if run["remaining"] == 0 else EXIT_FINDINGS)


def _audit_inline(fix: bool, reason: str | None, checks: tuple[str, ...],
                  timeout: float) -> int:
    """What the audit.integrity task does, in this process; returns the stored run's id.
    The award jobs a fix queues stay in that database for its relay to send (no broker
    here)."""
    from cli import inline
    from tasks.audits import service
    from tasks.audits.schemas import Integrity
    from workers.settings import get_settings

    params = Integrity(fix=fix, checks=list(checks) or None, reason=reason,
                       actor=actor() if fix else None)
    with (inline.run("audit.integrity", params, singleton=True, timeout=timeout,
                     echo=to_stderr) as job,
          job.session() as session):
        run = service.run_audit(
            session, fix=params.fix, check_names=params.checks, job_id=job.id,
            lock_timeout=get_settings().audit_lock_timeout,
            progress=lambda done, total, step: job.progress(done, total, step=step),
            actor=params.actor, reason=params.reason)
        result = job.complete(session, service.run_summary(run))
    return int(result["run_id"])


@audit.command("runs")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 500))
def runs(limit: int) -> None:
    """The newest audit runs, one line each."""
    from tasks.audits import service
    from workers.db import session_scope

    with errors_exit_2(), session_scope() as s:
        rows = service.list_runs(s, limit=limit)
    for r in rows:
        undone = "  undone" if r["undone_at"] else ""
        click.echo(f"{r['id']:<6} {r['mode']:<5} {r['started_at']:%Y-%m-%d %H:%M:%S}  "
                   f"findings={r['findings']} fixed={r['fixed']} remaining={r['remaining']}"
                   f"{undone}")


@audit.command("show")
@click.argument("run_id", type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True)
@click.option("--check", type=click.Choice(rules.INTEGRITY_CHECKS), default=None,
              help="only this check's findings")
def show(run_id: int, as_json: bool, check: str | None) -> None:
    """One stored run with its findings; exit 1 when it left findings."""
    with errors_exit_2():
        run = _show(run_id, as_json=as_json, verbose=True, check=check)
    sys.exit(EXIT_CLEAN if run["remaining"] == 0 else EXIT_FINDINGS)


@audit.command("undo")
@click.argument("run_id", type=click.IntRange(1))
@click.option("--reason", default=None, help="why (operator log); default names the run")
@click.option("--json", "as_json", is_flag=True)
def undo(run_id: int, reason: str | None, as_json: bool) -> None:
    """Revert a fix run from its before-values (rows changed since are listed, untouched);
    exit 0 all reverted, 1 some rows were changed since, 2 error."""
    from tasks.audits import service
    from workers.db import session_scope

    with errors_exit_2(), session_scope() as s:
        outcome = service.undo_fix(s, run_id, actor=actor(),
                                   reason=reason or f"undo of audit fix run {run_id}")
    if as_json:
        dump(outcome)
    else:
        click.echo(f"audit run {run_id}: {outcome['reverted']} row(s) reverted")
        for item in outcome["changed_since"]:
            click.echo(f"  not reverted (changed since the fix): {item['entity']} {item['id']}")
        for name in outcome["constraints_were_validated"]:
            click.echo(f"  note: {name} was VALIDATED; it is NOT VALID again")
    sys.exit(EXIT_CLEAN if not outcome["changed_since"] else EXIT_FINDINGS)


COMMANDS: list[click.Command] = [audit]
