"""Backups that are proven restorable: create, verify, prune and restore.

No Celery here. Each long operation takes the caller's transaction factory and completion
hook (a task passes `self.session` and `self.complete`, so the backup row and the job's
outcome commit together; a test or the CLI passes nothing and gets plain transactions).

Guarantees, and what gives each:
- One backup at a time, never interleaved: a Postgres advisory lock held on its own
  connection for the whole run (released by the server if the process dies), and a unique
  index allowing one `running` row. The job core's singleton lease sits in front of both.
  That connection is idle while pg_dump works, so idle_session_timeout, a proxy or
  pg_terminate_backend can drop it (and the lock with it): it is pinged every
  LOCK_KEEPALIVE seconds during the dump and checked before the files are sealed, and a
  lost lock fails the run as transient (retried) rather than record a backup made without
  it (review N14).
- A file that looks complete is complete: pg_dump writes `.<name>.partial`; it is fsynced,
  hashed and renamed to its final name only after pg_dump succeeded, then the manifest,
  then the directory is fsynced; only then does the row say `succeeded`.
- The manifest's row counts are the dump's: they are counted in the transaction whose
  snapshot pg_dump imports (`pg_export_snapshot()` / `pg_dump --snapshot`).
- A killed run leaves a `running` row and a `.partial` file; the next run (under the lock,
  so that row's run is provably gone) stops an orphaned pg_dump, deletes its files and
  marks the row `failed`.
- The backups table's own rows are not in the dump (its definition is): a database restored
  from a backup must not inherit a catalogue that describes other files (its `running` row
  would make the next backup delete the very file it was restored from). After a restore
  over the live database, `restore.adopt_manifests` rebuilds the catalogue from the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import sqlalchemy.exc
import structlog
from psycopg import sql
from sqlalchemy import create_engine, pool, text
from sqlalchemy.orm import Session

from tasks.backups import audit, retention
from tasks.backups.pgtools import (
    PgTools,
    Target,
    child_argv,
    find_tools,
    server_version,
    tool_env,
)
from workers import oplog
from workers.db import session_scope
from workers.errors import JobError, TransientError, is_transient
from workers.models import UNFINISHED_STATUSES
from workers.settings import get_settings

log = structlog.get_logger("warden.backups")

SessionFactory = Callable[[], AbstractContextManager[Session]]
Complete = Callable[[Session, Any], Any]

MANIFEST_FORMAT = "warden-backup/1"
# Advisory lock keys (pg_try_advisory_lock(class, key); scoped to the application database).
LOCK_CLASS = 0x5744  # "WD"
CREATE_LOCK, VERIFY_LOCK = 1, 2
# pg_dump waits this long for a table lock: a migration's DDL holds one for seconds; longer
# is a stuck session, and a retried job beats a backup hanging until the hard time limit.
DUMP_LOCK_WAIT = "300s"
CHUNK = 1 << 20  # 1 MiB reads for hashing
# The lock's connection is pinged this often during a dump: below any sane
# idle_session_timeout or proxy idle cut (minutes), and one round trip per 10 s costs nothing.
LOCK_KEEPALIVE = 10.0
# DROP DATABASE waits until every backend of the server has accepted a signal barrier; a
# backend busy in a long statement elsewhere can hold that for minutes (seen on PostgreSQL
# 15 behind another database's long query). Past this, the scratch database is left for
# the next verification, which drops leftovers first.
SCRATCH_DROP_WAIT = "60s"
_UNFINISHED = tuple(sorted(UNFINISHED_STATUSES))
# pg_dump/pg_restore stderr that means the server or the network, not the archive.
# The database refusing connections for a while (a blocked database, full connection slots,
# recovery) and a statement cancelled by a timeout are the server's moment, not the archive's.
_TRANSIENT_TOOL_ERRORS = re.compile(
    r"could not connect|connection to server|server closed the connection|terminating "
    r"connection|lock timeout|could not obtain lock|the database system is (starting|shutting"
    r"|in recovery)|invalid snapshot identifier|canceling statement due to"
    r"|not currently accepting connections|too many clients|connection slots are reserved",
    re.IGNORECASE)
# pg_restore stderr that means the server could not hold the scratch copy (its disk is full):
# the server's trouble, not the archive's, so no verdict (a failed one would take a good
# backup out of retention). Seen: 'could not extend file "pg_tblspc/..." with
# FileFallocate(): No space left on device'.
_SERVER_FULL = re.compile(r"No space left on device|could not extend file|Disk quota exceeded",
                          re.IGNORECASE)

CATALOGUE = "backups"  # this family's table (models.Backup), data left out of every dump
TABLES_SQL = (
    "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind = 'r' AND n.nspname <> 'information_schema' "
    "AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1, 2"
)


# -- errors ----------------------------------------------------------------------------------

class BackupBusy(TransientError):
    """Another process holds the backup (or verification) lock: try again later."""


class LockLost(TransientError):
    """The advisory lock's connection went away mid-run (terminated, timed out): another run
    may have started meanwhile, so this run records nothing and is tried again."""


class DumpFailed(JobError):
    code = "dump_failed"


class BackupNotFound(JobError):
    code = "backup_not_found"


class BackupUnavailable(JobError):
    """The backup exists but cannot be used (pruned, failed, still running)."""

    code = "backup_not_available"


class VerificationFailed(JobError):
    """The verdict is `failed`; the backup row holds the report."""

    code = "verification_failed"


class ScratchUnavailable(JobError):
    """The scratch database for a verification could not be made or filled (the server's
    trouble, not the backup's: no verdict is stored)."""

    code = "scratch_database_unavailable"


# -- small helpers ---------------------------------------------------------------------------

def _no_complete(_: Session, result: Any) -> Any:
    return result


def _never_lost() -> None:
    return None


def backup_dir() -> Path:
    """WARDEN_BACKUP_DIR, default <data dir>/backups (created 0700)."""
    settings = get_settings()
    path = settings.backup_dir or settings.data_dir / "backups"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path.resolve()


def app_target() -> Target:
    """The application database, as the tools connect to it."""
    return Target.from_url(get_settings().libpq_dsn())


@contextlib.contextmanager
def _advisory(target: Target, key: int, what: str) -> Iterator[psycopg.Connection[Any]]:
    """Hold an advisory lock on a connection of its own for the block (never a transaction
    open across the work: the lock is session-level; the server drops it with the
    connection if this process dies)."""
    conn = target.connect(autocommit=True)
    try:
        row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, key)).fetchone()
        if not row or not row[0]:
            raise BackupBusy(f"another {what} is running on this database")
        yield conn
    finally:
        conn.close()


class _LockGuard:
    """Keeps an advisory lock's idle connection alive and proves the lock is still held."""

    def __init__(self, conn: psycopg.Connection[Any], key: int, what: str) -> None:
        self.conn, self.key, self.what = conn, key, what
        self.last = time.monotonic()

    def check(self) -> None:
        """LockLost unless the connection is alive and its session holds the lock."""
        try:
            row = self.conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_backend_pid() AND classid = %s AND objid = %s AND objsubid = 2",
                (LOCK_CLASS, self.key)).fetchone()
        except psycopg.Error as exc:
            raise LockLost(f"the {self.what} lock was lost with its connection "
                           f"({type(exc).__name__}: {str(exc).strip()[:300]}); "
                           "nothing is recorded, the run is tried again") from exc
        finally:
            self.last = time.monotonic()
        if not row or not row[0]:
            raise LockLost(f"the {self.what} lock is no longer held; nothing is recorded, "
                           "the run is tried again")

    def tick(self) -> None:
        """check() at most once per LOCK_KEEPALIVE seconds (the ping is the keepalive)."""
        if time.monotonic() - self.last >= LOCK_KEEPALIVE:
            self.check()


def count_rows(conn: psycopg.Connection[Any], only: Collection[str] | None = None
               ) -> dict[str, int]:
    """Exact row count of every table ("schema.table"), or of the tables named `only`, in
    the connection's transaction."""
    tables = [t for t in conn.execute(TABLES_SQL).fetchall() if only is None or t[1] in only]
    if not tables:
        return {}
    query = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT {name}, count(*) FROM ONLY {table}").format(
            name=sql.Literal(f"{schema}.{name}"), table=sql.Identifier(schema, name))
        for schema, name in tables
    )
    return {str(name): int(n) for name, n in conn.execute(query).fetchall()}


def catalogue_name(conn: psycopg.Connection[Any]) -> str:
    """"schema.backups" as pg_dump's --exclude-table-data pattern takes it."""
    row = conn.execute(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = to_regclass(%s)", (CATALOGUE,)).fetchone()
    return f"{row[0] if row else 'public'}.{CATALOGUE}"


def sha256_file(path: Path, *, fsync: bool = False) -> tuple[str, int]:
    """(hex digest, bytes) of a file, optionally fsyncing it on the way."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def manifest_path(dump_path: Path | str) -> Path:
    path = Path(dump_path)
    return path.with_name(path.name.removesuffix(".dump") + ".manifest.json")


def _files_of(path: Path | str, partial: Path | str) -> tuple[Path, ...]:
    """Every file a backup may have on disk: the dump and its manifest, each under its
    temporary name too (a run killed mid-seal leaves the manifest's partial)."""
    mpath = manifest_path(path)
    return Path(partial), Path(path), mpath.with_name(f".{mpath.name}.partial"), mpath


def _tool_error(tool: str, stderr: str, code: int) -> Exception:
    """What a failed pg_dump/pg_restore means. Killed by a signal (a negative code: the OOM
    killer, an operator's kill, our own orphan sweep) says nothing about the backup: it is
    transient, like the server's connection errors; so is the server running out of memory."""
    message = f"{tool} exited {code}: {stderr[-1500:] or '(no output)'}"
    if code < 0 or _TRANSIENT_TOOL_ERRORS.search(stderr) or "out of memory" in stderr:
        return TransientError(message)
    return DumpFailed(message) if tool == "pg_dump" else RuntimeError(message)


def run_tool(argv: list[str], target: Target, *, check_owned: Callable[[], None] = _never_lost,
              on_start: Callable[[int], None] | None = None) -> tuple[int, str, float]:
    """Run a client tool to the end: (exit code, stderr, wall seconds). It dies with us
    (child_argv), and is killed if the job is taken over (check_owned, once a second)."""
    with tool_env(target) as env, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(child_argv(argv), env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            if on_start is not None:
                on_start(proc.pid)
            while True:
                try:
                    code = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    check_owned()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        seconds = time.monotonic() - started
        err.seek(0)
        return code, err.read().decode(errors="replace").strip(), seconds


# -- create ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Planned:
    id: int
    database: str
    path: Path
    partial: Path
    started_at: datetime


@dataclass(frozen=True)
class _Orphan:
    id: int
    path: str
    partial_path: str
    dump_host: str | None
    dump_pid: int | None


def _safe_name(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", value)[:60] or "db"


def _fail_orphans(s: Session) -> list[_Orphan]:
    """Rows left `running` by a run that died (the caller holds the backup lock, so no
    live run owns them): mark them failed; returns them for their files to go."""
    rows = s.execute(text(
        "UPDATE backups SET status = 'failed', finished_at = now(), "
        "error = 'interrupted: the run that wrote it stopped before finishing' "
        "WHERE status = 'running' RETURNING id, path, partial_path, dump_host, dump_pid"
    )).all()
    return [_Orphan(r.id, r.path, r.partial_path, r.dump_host, r.dump_pid) for r in rows]


def _stop_orphan_dump(orphan: _Orphan) -> None:
    """Kill a pg_dump still writing an orphan's file (one that outlived its worker)."""
    if orphan.dump_pid is None or orphan.dump_host != socket.gethostname():
        return
    try:
        cmdline = Path(f"/proc/{orphan.dump_pid}/cmdline").read_bytes()
    except OSError:
        return
    if orphan.partial_path.encode() in cmdline:  # that pid is still our pg_dump, not reused
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(orphan.dump_pid, signal.SIGKILL)
            log.warning("backup.orphan_dump_killed", backup_id=orphan.id, pid=orphan.dump_pid)


def _remove_files(*paths: str | Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            Path(p).unlink()


def _plan(s: Session, job_id: str | None, database: str) -> _Planned:
    new_id = int(s.execute(text(
        "SELECT nextval(pg_get_serial_sequence('backups', 'id'))")).scalar_one())
    started = datetime.now(UTC)
    name = f"{_safe_name(database)}-{new_id:06d}-{started:%Y%m%dT%H%M%SZ}.dump"
    directory = backup_dir()
    planned = _Planned(new_id, database, directory / name, directory / f".{name}.partial",
                       started)
    s.execute(text(
        "INSERT INTO backups (id, status, job_id, database, path, partial_path, started_at) "
        "VALUES (:id, 'running', :job, :db, :path, :partial, :started)"),
        {"id": new_id, "job": job_id, "db": database, "path": str(planned.path),
         "partial": str(planned.partial), "started": started})
    return planned


def _existing_for_job(s: Session, job_id: str | None) -> dict[str, Any] | None:
    """A backup this job already finished (a repeated run returns it, no second dump)."""
    if job_id is None:
        return None
    row = s.execute(text(
        "SELECT * FROM backups WHERE job_id = :job AND status IN ('succeeded', 'pruned') "
        "ORDER BY id DESC LIMIT 1"), {"job": job_id}).mappings().first()
    return dict(row) if row else None


def _created_result(row: dict[str, Any]) -> dict[str, Any]:
    return {"backup_id": int(row["id"]), "path": str(row["path"]), "bytes": row["bytes"],
            "sha256": row["sha256"], "tables": len(row["table_counts"] or {}),
            "rows": sum((row["table_counts"] or {}).values()),
            "seconds": round((row["finished_at"] - row["started_at"]).total_seconds(), 3)}


def create_backup(job_id: str | None = None, *, session: SessionFactory = session_scope,
                  complete: Complete = _no_complete,
                  check_owned: Callable[[], None] = _never_lost) -> dict[str, Any]:
    """Dump the application database to a verified-complete file; returns the result.

    Tools too old for the server: PgToolsTooOld before anything is written. Another backup
    running: BackupBusy (transient, so the job waits its turn).
    """
    target = app_target()
    with _advisory(target, CREATE_LOCK, "backup") as lock:
        guard = _LockGuard(lock, CREATE_LOCK, "backup")

        def watch() -> None:  # once a second while pg_dump runs
            check_owned()
            guard.tick()

        version_num, version = server_version(lock)
        tools = find_tools(version_num // 10000)
        with session() as s:
            done = _existing_for_job(s, job_id)
            if done is not None:
                return complete(s, _created_result(done))
            orphans = _fail_orphans(s)
            planned = _plan(s, job_id, target.dbname)
        for orphan in orphans:
            _stop_orphan_dump(orphan)
            _remove_files(*_files_of(orphan.path, orphan.partial_path))
            log.warning("backup.orphan_failed", backup_id=orphan.id)
        try:
            row = _dump(target, tools, planned, version_num, version, watch, guard.check)
            with session() as s:
                _record_success(s, row)
                return complete(s, _created_result(row))
        except BaseException as exc:
            _remove_files(*_files_of(planned.path, planned.partial))
            with contextlib.suppress(Exception), session_scope() as s:
                s.execute(text("UPDATE backups SET status = 'failed', finished_at = now(), "
                               "error = :e WHERE id = :id AND status = 'running'"),
                          {"id": planned.id, "e": f"{type(exc).__name__}: {exc}"[:4000]})
            raise


def _record_pid(backup_id: int, pid: int) -> None:
    with session_scope() as s:
        s.execute(text("UPDATE backups SET dump_pid = :pid, dump_host = :host WHERE id = :id"),
                  {"pid": pid, "host": socket.gethostname(), "id": backup_id})


def _dump(target: Target, tools: PgTools, planned: _Planned, version_num: int, version: str,
          check_owned: Callable[[], None],
          lock_held: Callable[[], None] = _never_lost) -> dict[str, Any]:
    """pg_dump in an exported snapshot, the counts in that snapshot, then seal the files
    (only while the backup lock is provably held: `lock_held`)."""
    fd = os.open(planned.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    with target.connect() as snap:
        snap.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        snap.read_only = True
        row = snap.execute("SELECT pg_export_snapshot(), now()").fetchone()
        assert row is not None
        snapshot, snapshot_at = str(row[0]), row[1]
        catalogue = catalogue_name(snap)
        argv = [tools.path("pg_dump"), "--format=custom", f"--file={planned.partial}",
                f"--snapshot={snapshot}", f"--lock-wait-timeout={DUMP_LOCK_WAIT}",
                f"--exclude-table-data={catalogue}", "--no-password",
                f"--dbname={target.conninfo()}"]
        counts: dict[str, int] = {}

        def started(pid: int) -> None:
            # The counts run while pg_dump works: same snapshot, and the two overlap.
            _record_pid(planned.id, pid)
            counts.update(count_rows(snap))
            counts.pop(catalogue, None)

        code, stderr, _ = run_tool(argv, target, check_owned=check_owned, on_start=started)
        snap.rollback()
    if code != 0:
        # A dump whose lock went away (and that the lock's next holder killed as an orphan)
        # failed because of that: LockLost says so, and is retried (review of issue 14).
        lock_held()
        raise _tool_error("pg_dump", stderr, code)
    check_owned()
    lock_held()
    try:
        return _seal(planned, counts, snapshot_at, catalogue, tools, version_num, version)
    except OSError as exc:  # a full or failing disk: as clear as pg_dump's own ENOSPC
        raise DumpFailed(f"sealing {planned.path}: {exc.strerror or exc} "
                         f"(errno {exc.errno})") from exc


def _seal(planned: _Planned, counts: dict[str, int], snapshot_at: datetime, catalogue: str,
          tools: PgTools, version_num: int, version: str) -> dict[str, Any]:
    """Fsync and hash the finished dump, rename it, write the manifest the same way, fsync
    the directory: a file under a final name is whole and durable."""
    digest, size = sha256_file(planned.partial, fsync=True)
    os.replace(planned.partial, planned.path)
    finished = datetime.now(UTC)
    manifest = {
        "format": MANIFEST_FORMAT, "backup_id": planned.id, "database": planned.database,
        "file": planned.path.name, "sha256": digest, "bytes": size,
        "server_version": version, "server_version_num": version_num,
        "pg_dump_version": tools.version, "snapshot_at": snapshot_at.isoformat(),
        "started_at": planned.started_at.isoformat(), "finished_at": finished.isoformat(),
        "tables": counts, "excluded_data": [catalogue],
    }
    mpath = manifest_path(planned.path)
    partial_manifest = mpath.with_name(f".{mpath.name}.partial")
    _write_private(partial_manifest, json.dumps(manifest, indent=2, sort_keys=True).encode())
    os.replace(partial_manifest, mpath)
    _fsync_dir(planned.path.parent)
    log.info("backup.written", backup_id=planned.id, bytes=size, tables=len(counts))
    return {"id": planned.id, "path": str(planned.path), "bytes": size, "sha256": digest,
            "server_version": version, "server_version_num": version_num,
            "pg_dump_version": tools.version, "snapshot_at": snapshot_at,
            "started_at": planned.started_at, "finished_at": finished, "table_counts": counts}


def _record_success(s: Session, row: dict[str, Any]) -> None:
    done = s.execute(text(
        "UPDATE backups SET status = 'succeeded', bytes = :bytes, sha256 = :sha256, "
        "server_version = :server_version, server_version_num = :server_version_num, "
        "pg_dump_version = :pg_dump_version, snapshot_at = :snapshot_at, "
        "finished_at = :finished_at, table_counts = CAST(:counts AS jsonb), dump_pid = NULL "
        "WHERE id = :id AND status = 'running'"),
        {**{k: row[k] for k in ("id", "bytes", "sha256", "server_version", "server_version_num",
                                "pg_dump_version", "snapshot_at", "finished_at")},
         "counts": json.dumps(row["table_counts"])})
    if getattr(done, "rowcount", 0) != 1:
        raise TransientError(f"backup {row['id']} is no longer running (taken over)")


# -- verify ----------------------------------------------------------------------------------

@dataclass
class _Report:
    steps: dict[str, Any] = field(default_factory=dict)
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    restore_seconds: float | None = None
    error: str | None = None
    scratch_dropped: bool | None = None

    def fail(self, step: str, message: str, **details: Any) -> None:
        self.steps[step] = {"ok": False, **details}
        if self.error is None:
            self.error = f"{step}: {message}"

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "mismatches": self.mismatches, "checks": self.checks,
                "scratch_dropped": self.scratch_dropped}


def scratch_prefix(database: str) -> str:
    """Scratch databases of this application database start with this (63-byte names)."""
    return f"{_safe_name(database)[:30]}_verify_"


def scratch_mark(database: str) -> str:
    """The comment a verification puts on each scratch database it creates: what makes a
    database this application database's scratch (the prefix alone does not: another
    application database sharing 30 characters, or a restore target an operator named that
    way, has it too; review N15). Database names are unique on a server."""
    return f"warden verification scratch of database {database}"


def create_scratch(conn: psycopg.Connection[Any], name: str, database: str) -> None:
    """Create a scratch database and mark it as `database`'s own (scratch_mark)."""
    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
        sql.Identifier(name), sql.Literal(scratch_mark(database))))


def drop_database(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _drop_scratch(conn: psycopg.Connection[Any], name: str) -> bool:
    """Drop a scratch database, waiting at most SCRATCH_DROP_WAIT; False if it is left for
    the next verification to drop (a verdict must not wait on it)."""
    try:
        conn.execute(f"SET statement_timeout = '{SCRATCH_DROP_WAIT}'")
        try:
            drop_database(conn, name)
        finally:
            conn.execute("RESET statement_timeout")
    except psycopg.Error as exc:
        log.warning("backup.scratch_left", database=name, error=type(exc).__name__)
        return False
    return True


def _drop_leftover_scratch(conn: psycopg.Connection[Any], prefix: str,
                           database: str) -> list[str]:
    """Scratch databases of this database's verifications that died (the caller holds the
    verify lock): those with the prefix AND the mark create_scratch put on them, never a
    database that merely has a matching name."""
    names = [str(r[0]) for r in conn.execute(
        "SELECT datname FROM pg_database WHERE left(datname, %s) = %s "
        "AND shobj_description(oid, 'pg_database') = %s",
        (len(prefix), prefix, scratch_mark(database))).fetchall()]
    for name in names:
        drop_database(conn, name)
        log.warning("backup.scratch_dropped", database=name)
    return names


def table_data_entries(listing: str) -> list[str]:
    """"schema.table" of each TABLE DATA entry of a `pg_restore --list` output."""
    found = []
    for line in listing.splitlines():
        if line.startswith(";") or " TABLE DATA " not in line:
            continue
        parts = line.split(" TABLE DATA ", 1)[1].split()
        if len(parts) >= 2:
            found.append(f"{parts[0]}.{parts[1]}")
    return found


def restore_argv(tools: PgTools, archive: Path | str, target: Target, *,
                 clean: bool = False) -> list[str]:
    """The one pg_restore command verification and `warden restore` both run: all or
    nothing (--single-transaction, --exit-on-error)."""
    argv = [tools.path("pg_restore"), "--exit-on-error", "--single-transaction",
            "--no-password", f"--dbname={target.conninfo()}"]
    if clean:
        argv += ["--clean", "--if-exists"]
    return [*argv, str(archive)]


def _backup_row(s: Session, backup_id: int, *, lock: bool) -> dict[str, Any]:
    row = s.execute(text("SELECT * FROM backups WHERE id = :id" + (" FOR UPDATE" if lock else "")),
                    {"id": backup_id}).mappings().first()
    if row is None:
        raise BackupNotFound(f"no backup {backup_id}")
    return dict(row)


def archive_major(pg_dump_version: str | None) -> int:
    """The major version of the pg_dump that wrote an archive (0 if unknown)."""
    head = str(pg_dump_version or "0").split(".")[0]
    return int(head) if head.isdigit() else 0


def verify_backup(backup_id: int, job_id: str | None = None, *,
                  session: SessionFactory = session_scope, complete: Complete = _no_complete,
                  check_owned: Callable[[], None] = _never_lost) -> dict[str, Any]:
    """Checksum, TOC, a real restore into a scratch database, row counts against the
    manifest, integrity counts on the copy (beside the live database's). The verdict, the
    restore time and the report are stored on the backup; a failed verdict raises
    VerificationFailed after it is stored. The scratch database is dropped whatever happens.
    """
    target = app_target()
    with _advisory(target, VERIFY_LOCK, "verification") as lock:
        with session() as s:
            row = _backup_row(s, backup_id, lock=True)
            if row["status"] != "succeeded":
                raise BackupUnavailable(f"backup {backup_id} is {row['status']}, not succeeded")
            s.execute(text("UPDATE backups SET verify_job_id = :job, verify_started_at = now() "
                           "WHERE id = :id"), {"job": job_id, "id": backup_id})
        prefix = scratch_prefix(target.dbname)
        _drop_leftover_scratch(lock, prefix, target.dbname)
        version_num, _ = server_version(lock)
        tools = find_tools(version_num // 10000, archive_major(row.get("pg_dump_version")))
        scratch = f"{prefix}{backup_id}_{uuid.uuid4().hex[:8]}"
        report = _Report()
        try:
            _verify_steps(row, target, tools, lock, scratch, report, check_owned)
        finally:
            report.scratch_dropped = _drop_scratch(lock, scratch)
        verdict = "failed" if report.error else "passed"
        result = {"backup_id": backup_id, "verdict": verdict,
                  "restore_seconds": report.restore_seconds, "mismatches": report.mismatches,
                  "error": report.error}
        with session() as s:
            s.execute(text(
                "UPDATE backups SET verdict = :v, verified_at = now(), restore_seconds = :rs, "
                "verify_report = CAST(:rep AS jsonb), verify_error = :err, "
                "verify_job_id = NULL WHERE id = :id"),
                {"v": verdict, "rs": report.restore_seconds, "err": report.error,
                 "rep": json.dumps(report.as_dict(), default=str), "id": backup_id})
            if verdict == "passed":
                return complete(s, result)
        raise VerificationFailed(f"backup {backup_id} failed verification: {report.error}",
                                 backup_id=backup_id, mismatches=report.mismatches)


def _verify_steps(row: dict[str, Any], target: Target, tools: PgTools,
                  admin: psycopg.Connection[Any], scratch: str, report: _Report,
                  check_owned: Callable[[], None]) -> None:
    """Each step records itself in the report; the first failure ends the verification."""
    path = Path(row["path"])
    expected: dict[str, int] = dict(row["table_counts"] or {})
    # 1. the file is the one that was written
    if not path.is_file():
        report.fail("checksum", f"{path} is missing", path=str(path))
        report.mismatches.append({"step": "checksum", "expected": row["sha256"],
                                  "actual": None})
        return
    digest, size = sha256_file(path)
    if digest != row["sha256"] or size != row["bytes"]:
        report.fail("checksum", "the file's sha256 differs from the manifest's",
                    expected=row["sha256"], actual=digest, bytes=size)
        report.mismatches.append({"step": "checksum", "expected": row["sha256"],
                                  "actual": digest, "expected_bytes": row["bytes"],
                                  "actual_bytes": size})
        return
    report.steps["checksum"] = {"ok": True, "sha256": digest, "bytes": size}
    check_owned()
    # 2. pg_restore can read its table of contents, which lists every counted table
    code, listing, stderr = _list(tools, path, target)
    if code != 0:
        if isinstance(err := _tool_error("pg_restore --list", stderr, code), TransientError):
            raise err
        report.fail("toc", f"pg_restore --list exited {code}: {stderr[-500:]}")
        return
    listed = table_data_entries(listing)
    missing = sorted(set(expected) - set(listed))
    if missing:
        report.fail("toc", f"tables without data in the archive: {', '.join(missing)}",
                    missing=missing)
        report.mismatches += [{"step": "toc", "table": t} for t in missing]
        return
    report.steps["toc"] = {"ok": True, "entries": len(listing.splitlines()),
                           "table_data": len(listed)}
    check_owned()
    # 3. a real restore into a scratch database
    try:
        create_scratch(admin, scratch, target.dbname)
    except psycopg.Error as exc:
        if is_transient(exc):  # the connection or the server, for a moment: try again
            raise
        raise ScratchUnavailable(f"cannot create scratch database {scratch}: {exc}") from exc
    scratch_target = target.with_db(scratch)
    code, stderr, seconds = run_tool(restore_argv(tools, path, scratch_target), target,
                                      check_owned=check_owned)
    if code != 0:
        err = _tool_error("pg_restore", stderr, code)
        if isinstance(err, TransientError):
            raise err
        if _SERVER_FULL.search(stderr):
            raise ScratchUnavailable(f"the server could not hold the restored copy in "
                                     f"{scratch}: {stderr[-500:]}")
        report.fail("restore", f"pg_restore exited {code}: {stderr[-500:]}", seconds=seconds)
        return
    report.restore_seconds = round(seconds, 3)
    report.steps["restore"] = {"ok": True, "seconds": report.restore_seconds,
                               "database": scratch}
    check_owned()
    # 4. every table has the manifest's row count; a table the manifest does not count
    # (the catalogue, whose data is never dumped) comes back empty
    with scratch_target.connect() as conn:
        restored = count_rows(conn)
    for table in sorted(set(expected) | set(restored)):
        want = expected.get(table, 0)
        if want != restored.get(table):
            report.mismatches.append({"step": "row_counts", "table": table,
                                      "expected": want, "restored": restored.get(table)})
    if report.mismatches:
        report.fail("row_counts", f"{len(report.mismatches)} tables differ from the manifest",
                    tables=len(restored))
        return
    report.steps["row_counts"] = {"ok": True, "tables": len(restored),
                                  "rows": sum(restored.values())}
    check_owned()
    # 5. the integrity audit's checks on the copy, recorded beside the live database's.
    # Only what the restored copy itself causes (a table or column missing, data the queries
    # reject) fails the backup; a dropped connection, a timeout, the soft time limit or a
    # lost ownership propagate with no verdict stored (a failed verdict takes a backup that
    # restored and matched out of retention; review N4b), and the job retries.
    report.checks["source"] = audit.source()
    try:
        report.checks["restored"] = _checks_on(scratch_target)
    except _COPY_FAULTS as exc:
        report.fail("checks", f"the integrity checks cannot run on the restored copy: {exc}")
        return
    try:
        with session_scope() as s:
            report.checks["live"] = audit.integrity_counts(s)
    except (sqlalchemy.exc.SQLAlchemyError, psycopg.Error) as exc:
        # the live database's own trouble is not the backup's verdict (and the soft time
        # limit, or a lost ownership, is no trouble to note and go on past)
        report.checks["live_error"] = f"{type(exc).__name__}: {exc}"[:500]
    report.steps["checks"] = {"ok": True}


# Errors of the restored copy's own making (SQLAlchemy's wrappers and psycopg's own).
_COPY_FAULTS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.DataError, sqlalchemy.exc.IntegrityError,
    psycopg.ProgrammingError, psycopg.DataError, psycopg.IntegrityError)


def _list(tools: PgTools, path: Path, target: Target) -> tuple[int, str, str]:
    with tool_env(target) as env:
        done = subprocess.run(child_argv([tools.path("pg_restore"), "--list", str(path)]),
                              env=env, capture_output=True, text=True, timeout=600,
                              errors="replace", check=False)
    return done.returncode, done.stdout, done.stderr.strip()


def _checks_on(target: Target) -> dict[str, int]:
    """The audit's counts on another database (an engine of its own, no pool)."""
    engine = create_engine("postgresql+psycopg://", poolclass=pool.NullPool,
                           creator=target.connect)
    try:
        with Session(engine) as s, s.begin():
            return audit.integrity_counts(s)
    finally:
        engine.dispose()


# -- prune -----------------------------------------------------------------------------------

def policy_from_settings(daily: int | None = None, weekly: int | None = None,
                         monthly: int | None = None) -> retention.Policy:
    settings = get_settings()
    return retention.Policy(
        daily=settings.backup_keep_daily if daily is None else daily,
        weekly=settings.backup_keep_weekly if weekly is None else weekly,
        monthly=settings.backup_keep_monthly if monthly is None else monthly,
    )


def _candidates(s: Session, *, lock: bool) -> list[dict[str, Any]]:
    """Backups with a file (status succeeded), ascending id; `verifying` when a
    backup.verify job for it is unfinished (queued or running: it would find no file)."""
    rows = s.execute(text(
        "SELECT b.id, b.snapshot_at, b.verdict, b.path, b.bytes, EXISTS ("
        "  SELECT 1 FROM job_runs j WHERE j.type = 'backup.verify' "
        "  AND j.status = ANY(:unfinished) AND j.params ->> 'backup_id' = b.id::text"
        ") AS verifying FROM backups b WHERE b.status = 'succeeded' ORDER BY b.id"
        + (" FOR UPDATE OF b" if lock else "")), {"unfinished": list(_UNFINISHED)}
    ).mappings().all()
    return [dict(r) for r in rows]


def prune_backups(s: Session, policy: retention.Policy | None = None, *, dry_run: bool = False,
                  actor: str = "job", now: datetime | None = None) -> dict[str, Any]:
    """Mark what retention drops as `pruned` (one transaction, rows locked in id order),
    with an operator-log entry; the files go after commit (remove_pruned_files)."""
    del now  # retention is relative to the backups themselves, not the clock
    policy = policy or policy_from_settings()
    rows = _candidates(s, lock=not dry_run)
    tz = ZoneInfo(get_settings().timezone)
    decision = retention.decide(
        [retention.Candidate(r["id"], r["snapshot_at"], r["verdict"], bool(r["verifying"]))
         for r in rows], policy, tz)
    by_id = {r["id"]: r for r in rows}
    doomed = [by_id[i] for i in decision.delete]
    if doomed and not dry_run:
        ids = sorted(r["id"] for r in doomed)
        s.execute(text("UPDATE backups SET status = 'pruned', pruned_at = now() "
                       "WHERE id = ANY(:ids)"), {"ids": ids})
        oplog.record(s, actor=actor, action="backup.prune", target="backups",
                     reason=f"retention: daily={policy.daily} weekly={policy.weekly} "
                            f"monthly={policy.monthly}",
                     count=len(ids), details={"backup_ids": ids})
    return {
        "dry_run": dry_run,
        "policy": {"daily": policy.daily, "weekly": policy.weekly, "monthly": policy.monthly},
        "kept": [{"backup_id": i, "reasons": list(why)}
                 for i, why in sorted(decision.keep.items())],
        "deleted": [{"backup_id": r["id"], "snapshot_at": r["snapshot_at"].isoformat(),
                     "bytes": r["bytes"], "path": r["path"]} for r in doomed],
        "bytes_freed": sum(r["bytes"] or 0 for r in doomed),
    }


def remove_pruned_files() -> int:
    """Delete the files of pruned backups still on disk (after the prune committed, and
    again on every later run: a crash between commit and unlink leaves nothing behind)."""
    with session_scope() as s:
        paths = [str(p) for p in s.execute(text(
            "SELECT path FROM backups WHERE status = 'pruned' ORDER BY id")).scalars()]
    removed, dirs = 0, set()
    for p in paths:
        for f in (Path(p), manifest_path(p)):
            if f.exists():
                _remove_files(f)
                removed += 1
                dirs.add(f.parent)
    for d in dirs:
        with contextlib.suppress(OSError):
            _fsync_dir(d)
    return removed


def newest_unverified(s: Session) -> int | None:
    """The newest succeeded backup, if it was never verified and no verification of it is
    pending (the backstop for a verify submission lost after its backup committed)."""
    rows = _candidates(s, lock=False)
    if not rows:
        return None
    newest = max(rows, key=lambda r: (r["snapshot_at"], r["id"]))
    return int(newest["id"]) if newest["verdict"] is None and not newest["verifying"] else None


# -- list / show -----------------------------------------------------------------------------

def _out(row: dict[str, Any], now: datetime, *, detail: bool) -> dict[str, Any]:
    taken = row["snapshot_at"] or row["started_at"]
    out = {k: row[k] for k in (
        "id", "status", "database", "path", "started_at", "snapshot_at", "finished_at",
        "bytes", "sha256", "server_version", "pg_dump_version", "error", "verdict",
        "verified_at", "restore_seconds", "verify_error", "pruned_at")}
    out["job_id"] = str(row["job_id"]) if row["job_id"] else None
    out["age_seconds"] = round((now - taken).total_seconds(), 1) if taken else None
    out["verifying"] = bool(row.get("verifying"))
    if detail:
        out["table_counts"] = row["table_counts"]
        out["verify_report"] = row["verify_report"]
    return out


_LIST_SQL = (
    "SELECT b.*, now() AS now, EXISTS (SELECT 1 FROM job_runs j WHERE j.type = 'backup.verify' "
    "AND j.status IN (" + ", ".join(f"'{st}'" for st in _UNFINISHED) + ") "
    "AND j.params ->> 'backup_id' = b.id::text) AS verifying FROM backups b "
)


def list_backups(s: Session, *, include_pruned: bool = False, limit: int = 50,
                 before_id: int | None = None) -> list[dict[str, Any]]:
    """Newest first (by id), with age against the database's clock."""
    where = ["true"] if include_pruned else ["b.status <> 'pruned'"]
    args: dict[str, Any] = {"limit": limit}
    if before_id is not None:
        where.append("b.id < :before")
        args["before"] = before_id
    rows = s.execute(text(_LIST_SQL + f"WHERE {' AND '.join(where)} ORDER BY b.id DESC "
                          "LIMIT :limit"), args).mappings().all()
    return [_out(dict(r), r["now"], detail=False) for r in rows]


def get_backup(s: Session, backup_id: int) -> dict[str, Any] | None:
    row = s.execute(text(_LIST_SQL + "WHERE b.id = :id"), {"id": backup_id}).mappings().first()
    return _out(dict(row), row["now"], detail=True) if row else None
