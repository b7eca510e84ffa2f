"""`warden restore`: a backup into a database, refusing what an operator must confirm.

Refused, with nothing changed: a target that is not empty (without --force), the live
application database (unless --force is given twice), a file whose checksum differs from
its manifest. The restore is one transaction (pg_restore --single-transaction
--exit-on-error): if it fails, the target is as it was (a database this command created is
dropped again).

The jobs the dump caught unfinished (queued, retrying, running, waiting) are cancelled in
the restored database right after pg_restore commits, in a transaction of their own that
only counts job_events first, before the rows are counted and anything is reported
(`stop_unfinished_jobs`; pg_restore's one transaction cannot carry a statement of ours, so
only a process already connected to the target in those milliseconds could see them).
Why: they are the source database's jobs. A worker or relay started on a copy would run
them there again, and one that writes outside the database does it in the live places (a
`backup.create` caught running by its own dump wrote a dump of the copy into the live
backup folder: operator drill D8).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg import sql
from sqlalchemy import text

from tasks.backups.pgtools import Target, find_tools, server_version
from tasks.backups.service import (
    MANIFEST_FORMAT,
    app_target,
    archive_major,
    backup_dir,
    count_rows,
    drop_database,
    restore_argv,
    run_tool,
    sha256_file,
)
from workers import oplog
from workers.db import session_scope

log = structlog.get_logger("warden.backups")


class RestoreRefused(Exception):
    """A restore the operator must confirm, or cannot do; nothing was changed."""


# The job rows a restore ends, and the code they end with (filter on it: `warden jobs`).
UNFINISHED_JOB_STATUSES = ("queued", "retrying", "running", "waiting")
RESTORED_JOB_CODE = "restored_copy"


# Anything a user made: relations, functions, schemas other than public.
USER_OBJECTS_SQL = """
SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%')
     + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%')
     + (SELECT count(*) FROM pg_namespace WHERE nspname NOT IN ('public', 'information_schema')
        AND nspname NOT LIKE 'pg\\_%')
"""


@dataclass(frozen=True)
class Located:
    """A backup to restore: its file and what its manifest promises."""

    backup_id: int
    path: Path
    sha256: str
    bytes: int
    tables: dict[str, int]
    pg_dump_version: str
    source: str  # "database" (the backups row) or "manifest" (the file beside the archive)


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for mpath in sorted(backup_dir().glob("*.manifest.json")):
        try:
            data = json.loads(mpath.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT:
            found.append((mpath, data))
    return found


def locate(backup_id: int) -> Located:
    """From the backups row when the application database answers, else (disaster: the
    database is gone or was restored) from the manifests in WARDEN_BACKUP_DIR."""
    row: dict[str, Any] | None = None
    try:
        with session_scope() as s:
            found = s.execute(text("SELECT * FROM backups WHERE id = :id"),
                              {"id": backup_id}).mappings().first()
            row = dict(found) if found else None
    except Exception as exc:
        log.warning("backup.catalogue_unavailable", error=type(exc).__name__)
    if row is not None:
        if row["status"] != "succeeded":
            raise RestoreRefused(f"backup {backup_id} is {row['status']}; only a succeeded "
                                 "backup can be restored")
        return Located(backup_id, Path(row["path"]), row["sha256"], int(row["bytes"]),
                       dict(row["table_counts"]), str(row["pg_dump_version"]), "database")
    for mpath, data in _manifests():
        if data.get("backup_id") == backup_id:
            return Located(backup_id, mpath.with_name(data["file"]), data["sha256"],
                           int(data["bytes"]), dict(data["tables"]),
                           str(data["pg_dump_version"]), "manifest")
    raise RestoreRefused(f"no backup {backup_id} (neither in the backups table nor a manifest "
                         f"in {backup_dir()})")


def _admin(target: Target) -> psycopg.Connection[Any]:
    """A connection for CREATE DATABASE: the application database, else `postgres`."""
    last: Exception | None = None
    for db in (target.dbname, "postgres", "template1"):
        try:
            return target.with_db(db).connect(autocommit=True)
        except psycopg.OperationalError as exc:
            last = exc
    raise RestoreRefused(f"cannot reach the database server: {last}")


def _is_empty(target: Target) -> bool:
    with target.connect(autocommit=True) as conn:
        row = conn.execute(USER_OBJECTS_SQL).fetchone()
        return row is not None and int(row[0]) == 0


@dataclass
class RestoreReport:
    """What a restore did: row counts per table (backup's, restored)."""

    backup_id: int
    target_db: str
    created: bool
    seconds: float
    counts: dict[str, tuple[int | None, int | None]]
    source: str
    adopted: int = 0
    # Unfinished jobs of the dump, cancelled by the restore: how many were in each status.
    jobs_stopped: dict[str, int] = field(default_factory=dict)
    over_live: bool = False  # restored over the live application database (--force twice)

    @property
    def ok(self) -> bool:
        """Every table of the backup came back with its row count."""
        return all(restored == expected for expected, restored in self.counts.values()
                   if expected is not None)


def restore(backup_id: int, target_db: str, *, force: int = 0, actor: str = "cli",
            reason: str | None = None, echo: Callable[[str], None] = lambda _: None
            ) -> RestoreReport:
    """Restore a backup into `target_db` on the application database's server."""
    live = app_target()
    located = locate(backup_id)
    is_live = target_db == live.dbname
    if is_live and force < 2:
        raise RestoreRefused(f"{target_db!r} is the live application database; restoring over "
                             "it needs --force twice (stop the API, workers and beat first)")
    target = live.with_db(target_db)
    with _admin(live) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                               (target_db,)).fetchone() is not None
        empty = not exists or _is_empty(target)
        if not empty and force < 1:
            raise RestoreRefused(f"database {target_db!r} is not empty; --force restores over "
                                 "it (the backup's objects are dropped and recreated)")
        echo(f"checking the checksum of {located.path} ...")
        if not located.path.is_file():
            raise RestoreRefused(f"{located.path} is missing")
        digest, size = sha256_file(located.path)
        if digest != located.sha256 or size != located.bytes:
            raise RestoreRefused(f"{located.path} does not match its manifest (sha256 {digest}, "
                                 f"expected {located.sha256}); refusing to restore it")
        version_num, _ = server_version(admin)
        tools = find_tools(version_num // 10000, archive_major(located.pg_dump_version))
        if not exists:
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
                sql.Identifier(target_db)))
        echo(f"restoring backup {backup_id} into {target_db} ...")
        code, stderr, seconds = run_tool(
            restore_argv(tools, located.path, target, clean=not empty), live)
        if code != 0:
            if not exists:
                with contextlib.suppress(psycopg.Error):
                    drop_database(admin, target_db)
            raise RestoreRefused(f"pg_restore failed (exit {code}); {target_db} is unchanged: "
                                 f"{stderr[-1500:]}")
    # The jobs first, at once: until they are cancelled, a worker or relay started on the
    # target could run what the dump caught unfinished, and a restore interrupted while it
    # counts a large database (Ctrl-C, a dropped connection) must not leave them runnable
    # (review of 2026-12-07). The tables the cancel writes to (job_events, by trigger) are
    # counted in its transaction, before it, so the check still reads what pg_restore wrote.
    with target.connect() as conn, conn.transaction():
        before_cancel = count_rows(conn, only=JOB_EVENT_TABLES)
        stopped = stop_unfinished_jobs(conn, backup_id=backup_id, target_db=target_db,
                                       live=is_live)
    with target.connect() as conn, conn.transaction():
        restored = {**count_rows(conn), **before_cancel}
    counts = {t: (located.tables.get(t), restored.get(t))
              for t in sorted(set(located.tables) | set(restored))}
    report = RestoreReport(backup_id, target_db, not exists, round(seconds, 3), counts,
                           located.source, jobs_stopped=stopped, over_live=is_live)
    if is_live:
        report.adopted = adopt_manifests()
    _record(report, actor, reason)
    return report


# Tables that cancelling the jobs writes to (job_runs' status trigger appends job_events).
JOB_EVENT_TABLES = frozenset({"job_events"})


def stop_unfinished_jobs(conn: psycopg.Connection[Any], *, backup_id: int, target_db: str,
                         live: bool) -> dict[str, int]:
    """Cancel every job of the restored database that is not finished (error_code
    restored_copy, a message naming the restore), in the caller's transaction; returns how
    many there were per status they had.

    They are the jobs of the database the backup was taken from, at the backup's time: no
    worker or relay started on a copy may run them (a claim of a cancelled job is final,
    the relay never sends one, `warden retry` refuses one). The same over the live database
    (--force twice, disaster recovery), and so the same whichever way a recovery goes (the
    runbook's preferred one restores into a new database and swaps it in): their messages
    went with the old broker state, and whether a job from the backup's time should still
    run is an operator's call, not the relay's; `warden job ID` shows what to submit again.
    The epoch moves on too, so a run that still held one of them commits nothing.
    """
    if conn.execute("SELECT to_regclass('job_runs')").fetchone() in (None, (None,)):
        return {}  # a backup without the job table (not Warden's, or before it existed)
    present = {str(r[0]) for r in conn.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = 'job_runs'")}
    # Columns of later migrations: a backup taken at an older schema comes back without them.
    extra = [f"{c} = NULL" for c in ("lease_expires_at", "next_attempt_at") if c in present]
    if "epoch" in present:
        extra.append("epoch = j.epoch + 1")
    at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    where = (f"restored over the live database {target_db}" if live
             else f"restored into the copy {target_db}")
    message = (f"unfinished in backup {backup_id}, {where} at {at}: a job of the backup's "
               "time, cancelled so that nothing runs it again by itself (submit it again if "
               "it should still run)")
    sets = ", ".join(["status = 'cancelled'", "finished_at = now()", "error_code = %(code)s",
                      "error_message = %(msg)s", *extra])
    rows = conn.execute(
        "WITH was AS (SELECT id, status FROM job_runs WHERE status = ANY(%(open)s) "
        "ORDER BY id FOR UPDATE) "
        f"UPDATE job_runs j SET {sets} FROM was WHERE j.id = was.id RETURNING was.status",
        {"code": RESTORED_JOB_CODE, "msg": message,
         "open": list(UNFINISHED_JOB_STATUSES)}).fetchall()
    stopped: dict[str, int] = {}
    for (status,) in rows:
        stopped[str(status)] = stopped.get(str(status), 0) + 1
    if stopped:
        log.info("backup.restore_jobs_cancelled", target=target_db, jobs=stopped, live=live)
    return stopped


def _record(report: RestoreReport, actor: str, reason: str | None) -> None:
    """The operator-log entry, in the live database (when it answers)."""
    try:
        with session_scope() as s:
            oplog.record(s, actor=actor, action="backup.restore", target=report.target_db,
                         reason=reason or f"restore of backup {report.backup_id}",
                         count=sum(r or 0 for _, r in report.counts.values()),
                         details={"backup_id": report.backup_id, "created": report.created,
                                  "seconds": report.seconds, "matches": report.ok,
                                  "jobs_cancelled": report.jobs_stopped})
    except Exception as exc:
        log.warning("backup.restore_not_logged", error=type(exc).__name__)


def adopt_manifests() -> int:
    """Rebuild the catalogue from the manifests on disk (after a restore over the live
    database, whose backups table came back empty): one `succeeded` row per archive that is
    still there, verdict unknown, and the id sequence moved past them. Returns rows added."""
    entries = [(m, d) for m, d in _manifests() if m.with_name(str(d.get("file"))).is_file()]
    added = 0
    with session_scope() as s:
        s.execute(text("LOCK TABLE backups IN SHARE ROW EXCLUSIVE MODE"))
        for mpath, d in sorted(entries, key=lambda e: int(e[1]["backup_id"])):
            done = s.execute(text(
                "INSERT INTO backups (id, status, database, path, partial_path, started_at, "
                "snapshot_at, finished_at, bytes, sha256, server_version, server_version_num, "
                "pg_dump_version, table_counts) VALUES (:id, 'succeeded', :db, :path, :partial, "
                ":started, :snap, :finished, :bytes, :sha, :sv, :svn, :pdv, CAST(:tc AS jsonb)) "
                "ON CONFLICT (id) DO NOTHING"),
                {"id": int(d["backup_id"]), "db": d["database"],
                 "path": str(mpath.with_name(d["file"])),
                 "partial": str(mpath.with_name(f".{d['file']}.partial")),
                 "started": d["started_at"], "snap": d["snapshot_at"],
                 "finished": d["finished_at"], "bytes": int(d["bytes"]), "sha": d["sha256"],
                 "sv": d["server_version"], "svn": int(d["server_version_num"]),
                 "pdv": d["pg_dump_version"], "tc": json.dumps(d["tables"])})
            added += int(getattr(done, "rowcount", 0) or 0)
        s.execute(text(
            "SELECT setval(seq, greatest((SELECT max(id) FROM backups), "
            "pg_sequence_last_value(seq), 1)) "
            "FROM CAST(pg_get_serial_sequence('backups', 'id') AS regclass) AS seq"))
    return added
