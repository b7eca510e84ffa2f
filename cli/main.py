"""The `warden` command: the composition root, the one place that imports everything."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, NoReturn

import click

from workers.settings import SettingsError, get_settings


def fail(message: str, code: int = 1) -> NoReturn:
    """One clear line on stderr and a non-zero exit."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def parse_param(raw: str) -> tuple[str, Any]:
    """k=v; v is JSON when it parses (numbers, true, lists), else the plain string."""
    if "=" not in raw:
        fail(f"--param wants key=value, got {raw!r}", 2)
    key, value = raw.split("=", 1)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


class _Cli(click.Group):
    """The core commands are defined here; the families' (cli/commands/, each module's
    `COMMANDS`) are imported only when one of them is asked for, or for --help. Why: those
    modules pull in the job schedules, Celery and the families' services, seconds of
    imports on a busy machine that `warden up` (which must refuse a second start at once),
    `warden worker` or `warden jobs` never need."""

    _families_loaded = False

    def _load_families(self) -> None:
        if not self._families_loaded:
            type(self)._families_loaded = True
            _add_family_commands(self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None:
            self._load_families()
            found = super().get_command(ctx, cmd_name)
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_families()
        return super().list_commands(ctx)


@click.group(cls=_Cli)
def cli() -> None:
    """Warden: the task-queue worker platform of the character service."""
    from workers import logging as wlogging

    # Operator commands print results on stdout; logs go to stderr, warnings only. The
    # long-running processes (api, worker, beat, up) raise this to WARDEN_LOG_LEVEL.
    wlogging.configure("WARNING")


@cli.command()
@click.option("--no-demo", is_flag=True, help="do not load the small demo data set")
@click.option("--concurrency", default=2, show_default=True, help="worker processes")
def up(no_demo: bool, concurrency: int) -> None:
    """Run everything: embedded services if needed, migrations, API, worker, beat, Flower."""
    from cli.up import run_up

    sys.exit(run_up(demo=not no_demo, concurrency=concurrency))


@cli.command()
@click.option("--concurrency", "-c", default=2, show_default=True)
@click.option("--name", "-n", default="warden@%h", show_default=True, help="node name")
@click.option("--loglevel", "-l", default="INFO")
def worker(concurrency: int, name: str | None, loglevel: str) -> None:
    """One Celery worker (production: run as many as you need). Prefork only: the other
    pools enforce no time limits and run several jobs in one process."""
    from workers.app import QUEUE, app

    argv = ["worker", "-l", loglevel, "-Q", QUEUE, "-c", str(concurrency), "-P", "prefork",
            "-E"]
    if name:
        argv += ["-n", name]
    app.worker_main(argv)


@cli.command()
@click.option("--loglevel", "-l", default="INFO")
def beat(loglevel: str) -> None:
    """Celery beat with RedBeat (several may run: one holds the lock)."""
    from workers.app import app

    app.start(["beat", "-l", loglevel])


@cli.command()
def relay() -> None:
    """The relay on its own (it also runs inside every API, worker and beat process; one
    is active at a time): publishes lost, unpublished and stalled jobs."""
    from workers import logging as wlogging
    from workers.relay import Relay

    wlogging.configure(get_settings().log_level)
    try:
        for _ in Relay().run_forever():
            pass
    except KeyboardInterrupt:
        pass


@cli.command()
@click.option("--host", default=None, help="default WARDEN_API_HOST")
@click.option("--port", default=None, type=int, help="default WARDEN_API_PORT")
def api(host: str | None, port: int | None) -> None:
    """The HTTP API (with the outbox relay) under uvicorn."""
    import uvicorn

    from api_stub.app import create_app
    from workers import logging as wlogging

    settings = get_settings()
    wlogging.configure(settings.log_level)
    uvicorn.run(create_app(), host=host or settings.api_host, port=port or settings.api_port,
                log_config=None, access_log=False, timeout_graceful_shutdown=10)


@cli.command()
@click.option("--port", default=None, type=int, help="default WARDEN_FLOWER_PORT")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="listen address (0.0.0.0 in a container)")
def flower(port: int | None, address: str) -> None:
    """Flower, with basic auth (WARDEN_FLOWER_USER / WARDEN_FLOWER_PASSWORD)."""
    from cli.up import flower_credentials
    from workers.app import app

    settings = get_settings()
    user, password = flower_credentials(settings)
    app.start(["flower", f"--port={port or settings.flower_port}", f"--address={address}",
               f"--basic-auth={user}:{password}", "--persistent=False",
               "--purge_offline_workers=60"])


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply Alembic migrations."""
    from workers.migrate import upgrade

    upgrade(revision)
    click.echo(f"database at {revision}")


@cli.group()
def token() -> None:
    """API tokens."""


@token.command("create")
@click.option("--name", required=True)
@click.option("--scopes", default="read", show_default=True, help="comma list: read,enqueue,admin")
def token_create(name: str, scopes: str) -> None:
    """Create a token and print it once (only its hash is stored)."""
    from workers.tokens import TokenError, create_token, parse_scopes

    try:
        click.echo(create_token(name, parse_scopes(scopes)))
    except TokenError as exc:
        fail(str(exc), 2)


@token.command("revoke")
@click.option("--name", required=True)
def token_revoke(name: str) -> None:
    """Revoke a token by name."""
    from workers.tokens import revoke_token

    if not revoke_token(name):
        fail(f"no live token named {name!r}")
    click.echo(f"revoked {name}")


def _job_json(row: Any) -> str:
    from api_stub.app import job_out

    return job_out(row).model_dump_json(indent=2)


@cli.command()
@click.argument("job_type")
@click.option("--param", "-p", "params", multiple=True, help="key=value (value may be JSON)")
@click.option("--key", default=None, help="idempotency key")
@click.option("--countdown", default=None, type=click.FloatRange(0, 3600),
              help="seconds to wait before the job may run (0..3600)")
@click.option("--wait", is_flag=True, help="wait for the job to finish; exit 1 unless it succeeds")
@click.option("--timeout", default=60.0, show_default=True, help="seconds --wait waits")
def enqueue(job_type: str, params: tuple[str, ...], key: str | None, countdown: float | None,
            wait: bool, timeout: float) -> None:
    """Submit a job, as the API would (as an operator: no token, no scope check; who asked,
    where a job records it, is `cli:<login>`)."""
    from pydantic import ValidationError

    from workers import jobstore, scopes
    from workers.enqueue import (
        IdempotencyConflict,
        InvalidCountdown,
        UnknownJobType,
        UnstorableParams,
        submit,
    )

    values = scopes.on_behalf_of(job_type, dict(parse_param(p) for p in params),
                                 operator_name())
    try:
        sub = submit(job_type, values, idempotency_key=key, countdown=countdown, source="cli",
                     client_key=True)
    except UnknownJobType as exc:
        fail(str(exc), 2)
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"param {'.'.join(str(p) for p in first['loc'])}: {first['msg']}", 2)
    except (IdempotencyConflict, UnstorableParams, InvalidCountdown) as exc:
        fail(str(exc), 2)
    job_id = sub.job["id"]
    if not wait:
        click.echo(_job_json(sub.job))
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = jobstore.get(job_id)
        if row is not None and row["status"] in ("succeeded", "failed", "dead", "cancelled"):
            click.echo(_job_json(row))
            sys.exit(0 if row["status"] == "succeeded" else 1)
        time.sleep(0.1)
    from cli.waiting import not_finished

    fail(not_finished(job_id, timeout))


@cli.command("job-types")
@click.option("--json", "as_json", is_flag=True,
              help="every type in full, params JSON Schema included (GET /v1/job-types)")
def job_types_command(as_json: bool) -> None:
    """The job types: name, the API scope that submits it, singleton, what it does."""
    from api_stub.app import job_type_catalogue

    catalogue = job_type_catalogue()
    if as_json:
        click.echo(json.dumps([t.model_dump(mode="json") for t in catalogue], indent=2))
        return
    for t in catalogue:
        scope: str = t.scope
        if t.admin_when:
            scope += " (admin when " + " or ".join(
                f"{k}={json.dumps(v)}" for k, v in t.admin_when.items()) + ")"
        first = " ".join(t.description.split())  # the first paragraph, on one line
        click.echo(f"{t.name:<26} {scope:<34} {'singleton' if t.singleton else '-':<9}  "
                   f"{first}".rstrip())


def _job_status(_: click.Context, __: click.Parameter, value: str | None) -> str | None:
    """A job status or nothing: a typo must not list no jobs and exit 0 (drill D9). The
    statuses are looked up only when one is given (workers.models imports SQLAlchemy)."""
    if value is None:
        return None
    from workers.models import JOB_STATUSES

    if value not in JOB_STATUSES:
        raise click.BadParameter(f"{value!r} is not a job status; one of: "
                                 + ", ".join(JOB_STATUSES))
    return value


@cli.command()
@click.option("--status", default=None, callback=_job_status,
              help="queued, running, retrying, waiting, succeeded, failed, dead, cancelled")
@click.option("--type", "job_type", default=None)
@click.option("--parent", "parent", default=None, help="only the children of this job")
@click.option("--limit", default=20, show_default=True)
def jobs(status: str | None, job_type: str | None, parent: str | None, limit: int) -> None:
    """The newest jobs (or a fanned-out job's children), one line each."""
    import uuid

    from workers import jobstore

    parent_id = uuid.UUID(_job_uuid(parent)) if parent is not None else None
    for r in jobstore.list_jobs(status=status, job_type=job_type, parent_id=parent_id,
                                limit=limit):
        click.echo(f"{r['id']}  {r['status']:<9}  {r['type']:<28} attempts={r['attempts']}  "
                   f"{r['created_at']:%Y-%m-%d %H:%M:%S}  {r['error_code'] or ''}".rstrip())


@cli.command()
@click.argument("job_id")
def job(job_id: str) -> None:
    """One job, as JSON."""
    from workers import jobstore

    row = jobstore.get(_job_uuid(job_id))
    if row is None:
        fail(f"no job {job_id}")
    out = _job_json(row)
    click.echo(out)
    waiting = json.loads(out).get("waiting_on") or {}
    if waiting:  # the human answer to "why is it not running?", on stderr
        # the message says it in full ("countdown: may run from ...", "failed: code: ..."):
        # prefixing the reason doubled it (drill D12)
        click.echo(waiting.get("message"), err=True)


def _job_uuid(raw: str) -> str:
    import uuid

    try:
        return str(uuid.UUID(raw))
    except ValueError:
        fail(f"{raw!r} is not a job id (a UUID)", 2)


def operator_name() -> str:
    """Who acts from the CLI, for the operator log: `cli:<login>`."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli:unknown"


def _filter_options(f: Any) -> Any:
    for option in (
        click.option("--status", default=None, help="bulk: only jobs in this status"),
        click.option("--type", "job_type", default=None, help="bulk: only this job type"),
        click.option("--since", default=None, type=click.DateTime(),
                     help="bulk: created at or after (UTC)"),
        click.option("--until", default=None, type=click.DateTime(),
                     help="bulk: created before (UTC)"),
        click.option("--dry-run", is_flag=True, help="bulk: only count the jobs"),
        click.option("--reason", required=True, help="why (recorded in the operator log)"),
    ):
        f = option(f)
    return f


def _act(action: str, job_id: str | None, status: str | None, job_type: str | None,
         since: Any, until: Any, dry_run: bool, reason: str) -> None:
    """One job by id, or every job a filter matches."""
    from datetime import UTC

    from workers import jobstore, operator, oplog
    from workers.enqueue import publish

    if job_id is not None:
        if status or job_type or since or until or dry_run:
            fail("give a job id or a filter (--status/--type/--since/--until), not both", 2)
        act = operator.retry if action == "retry" else operator.cancel
        try:
            row = act(_job_uuid(job_id), actor=operator_name(), reason=reason)
        except (jobstore.JobNotFound, jobstore.JobStateConflict, oplog.ReasonRequired) as exc:
            fail(str(exc))
        if action == "retry":
            publish(row["id"], row["type"], row["params"])
            click.echo(f"job {row['id']} queued again")
        else:
            click.echo(f"job {row['id']} cancelled")
        return
    if not (status or job_type or since or until):
        fail("give a job id, or a filter: --status, --type, --since, --until", 2)
    flt = operator.JobFilter(status=status, type=job_type,
                             created_after=since.replace(tzinfo=UTC) if since else None,
                             created_before=until.replace(tzinfo=UTC) if until else None)
    try:
        result = operator.bulk(action, flt, actor=operator_name(),  # type: ignore[arg-type]
                               reason=reason, dry_run=dry_run)
    except (operator.FilterError, oplog.ReasonRequired) as exc:
        fail(str(exc), 2)
    if dry_run:
        click.echo(f"{result['matched']} job(s) match (dry run: nothing changed)")
    else:
        click.echo(f"{result['matched']} job(s) match; {result['changed']} "
                   f"{'retried' if action == 'retry' else 'cancelled'}")


@cli.command()
@click.argument("job_id", required=False)
@_filter_options
def retry(job_id: str | None, status: str | None, job_type: str | None, since: Any,
          until: Any, dry_run: bool, reason: str) -> None:
    """Run a failed or dead job again (by id, or every one a filter matches)."""
    _act("retry", job_id, status, job_type, since, until, dry_run, reason)


@cli.command()
@click.argument("job_id", required=False)
@_filter_options
def cancel(job_id: str | None, status: str | None, job_type: str | None, since: Any,
           until: Any, dry_run: bool, reason: str) -> None:
    """Cancel a queued or retrying job (by id, or every one a filter matches)."""
    _act("cancel", job_id, status, job_type, since, until, dry_run, reason)


@cli.command()
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 500))
@click.option("--action", default=None, help="only this action (job.retry, audit.undo, ...)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def oplog(limit: int, action: str | None, as_json: bool) -> None:
    """The operator log: who did what, to how many, and why (newest first)."""
    from workers import oplog as log
    from workers.db import session_scope

    with session_scope() as s:
        rows = log.entries(s, limit=limit, action=action)
    for r in rows:
        if as_json:
            click.echo(json.dumps(r, default=str))
        else:
            click.echo(f"{r['at']:%Y-%m-%d %H:%M:%S}  {r['actor']:<20} {r['action']:<22} "
                       f"{r['target'] or '-':<36} n={r['count']}  {r['reason']}")


@cli.command()
@click.option("--characters", default=1000, show_default=True, type=click.IntRange(0, 10_000_000))
@click.option("--violations", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help="share of characters breaking each DOMAIN.md rule")
@click.option("--seed", "rng_seed", default=42, show_default=True, help="random seed")
def seed(characters: int, violations: float, rng_seed: int) -> None:
    """Demo and benchmark data (set-based SQL; 1M characters in minutes)."""
    from domain.demo import seed as run_seed

    started = time.monotonic()
    counts = run_seed(characters, violations=violations, rng_seed=rng_seed)
    click.echo(json.dumps({**counts, "seconds": round(time.monotonic() - started, 1)}))


def _add_family_commands(group: click.Group) -> None:
    """`COMMANDS` of every module in cli/commands/ (a family's commands)."""
    import importlib
    import pkgutil

    import cli.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"cli.commands.{info.name}")
        for command in module.COMMANDS:
            group.add_command(command)


def _expected_failure(exc: Exception) -> None:
    """A database that cannot be reached or a bad WARDEN_* setting: one line and exit 1.
    The classes are looked up only once such an error happened (its library is loaded
    then), so no command pays for importing them."""
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(exc, sa_exc.OperationalError):
        orig = getattr(exc, "orig", None)
        fail(f"database unreachable: {str(orig).splitlines()[0] if orig else exc}")
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(exc, pydantic.ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        setting = f"WARDEN_{where.upper()}: " if where else ""
        fail(f"invalid setting {setting}{first['msg']}")


def main() -> None:
    """Entry point: turn the expected failures into one line and a non-zero exit."""
    try:
        code = cli(standalone_mode=False)
    except click.exceptions.UsageError as exc:  # one line, like every other error
        names: list[str] = []
        ctx = exc.ctx
        while ctx is not None and ctx.parent is not None:
            names.insert(0, ctx.info_name or "")
            ctx = ctx.parent
        fail(f"{exc.format_message()} (see `{' '.join(['warden', *names, '--help'])}`)", 2)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except click.exceptions.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except SettingsError as exc:
        fail(str(exc))
    except Exception as exc:
        _expected_failure(exc)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
