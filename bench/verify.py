"""verify: the backup.verify job over a bare `pg_restore` into an empty database, same archive,
same run.

The archive is the newest backup bench/backup.py made (of the 1,000,000-character data
set). The bare restore is `pg_restore --dbname=<empty database> <archive>` timed around
the process (the database made before the clock starts, dropped after it stops); the job is
timed as the job core records it (job_runs started_at -> finished_at, in a real worker:
checksum, TOC, scratch database, the restore, row counts of every table, the integrity
counts of the copy and of the live database, the drop). ABBA order, as bench/backup.py.
"""

from __future__ import annotations

import statistics
import uuid
from typing import Any

from bench.backup import job_seconds, wait_job
from bench.services import Services


def newest_backup() -> dict[str, Any]:
    from sqlalchemy import text

    from workers.db import session_scope

    with session_scope() as s:
        row = s.execute(text("SELECT id, path, bytes FROM backups WHERE status = 'succeeded' "
                             "ORDER BY id DESC LIMIT 1")).mappings().first()
    if row is None:
        raise RuntimeError("no backup to verify: bench/backup.py runs first")
    return dict(row)


def bare_restore(path: str, flags: tuple[str, ...] = ()) -> float:
    """pg_restore of the archive into a fresh empty database: seconds. `flags`: the job's
    own (--single-transaction --exit-on-error), to tell its overhead from theirs."""
    from psycopg import sql

    from tasks.backups.pgtools import find_tools, server_version
    from tasks.backups.service import app_target, drop_database, run_tool

    live = app_target()
    name = f"bench_bare_restore_{uuid.uuid4().hex[:8]}"
    with live.connect(autocommit=True) as admin:
        num, _ = server_version(admin)
        tools = find_tools(num // 10000)
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
            sql.Identifier(name)))
        try:
            code, stderr, seconds = run_tool(
                [tools.path("pg_restore"), *flags, f"--dbname={live.with_db(name).conninfo()}",
                 "--no-password", path], live)
            if code != 0:
                raise RuntimeError(f"bare pg_restore failed: {stderr}")
            return seconds
        finally:
            drop_database(admin, name)


def job_verify(backup_id: int) -> tuple[float, dict[str, Any]]:
    from workers.enqueue import submit

    sub = submit("backup.verify", {"backup_id": backup_id}, source="bench")
    row = wait_job(str(sub.job["id"]))
    return job_seconds(row), dict(row["result"])


JOB_FLAGS = ("--single-transaction", "--exit-on-error")  # tasks/backups/service.restore_argv


def run(svc: Services, rounds: int) -> list[str]:
    """The verify ratio line and its details (a worker is already running: bench/backup)."""
    del svc
    backup = newest_backup()
    bare: list[float] = []
    flagged: list[float] = []
    ours: list[float] = []
    restores: list[float] = []
    verdicts: set[str] = set()
    for r in range(rounds):
        order = ("bare", "job", "flags") if r % 2 == 0 else ("flags", "job", "bare")
        for kind in order:
            if kind == "bare":
                bare.append(bare_restore(str(backup["path"])))
            elif kind == "flags":
                flagged.append(bare_restore(str(backup["path"]), JOB_FLAGS))
            else:
                seconds, result = job_verify(int(backup["id"]))
                ours.append(seconds)
                restores.append(float(result.get("restore_seconds") or 0.0))
                verdicts.add(str(result.get("verdict")))
    b, f, o = statistics.median(bare), statistics.median(flagged), statistics.median(ours)
    per_round = ", ".join(f"{j / x:.3f}" for j, x in zip(ours, bare, strict=True))
    return [
        f"verify ratio={o / b:.3f} (backup.verify job seconds over bare pg_restore into an "
        f"empty database seconds, same archive; goal <= 1.3)",
        f"  job {o:.1f} s, of which its pg_restore (the measured RTO) "
        f"{statistics.median(restores):.1f} s; bare {b:.1f} s; medians of {rounds} round(s) "
        f"in ABBA order; per round: {per_round}",
        f"  bare with the job's flags ({' '.join(JOB_FLAGS)}) {f:.1f} s: job over it "
        f"{o / f:.3f} (the checks' own cost, without the flags' gain)",
        f"  archive: backup {backup['id']}, {int(backup['bytes']) / 2**20:.0f} MiB; "
        f"verdicts {sorted(verdicts)}",
    ]
