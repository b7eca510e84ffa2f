"""Backups under database faults, through a real worker (review N4a, N13, N14).

The faults are real: a backend of the job terminated with pg_terminate_backend while the
dump waits on a table an "operator" holds locked (so the moment is the test's, not the
scheduler's), and a verification job that ended without a verdict.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import Proc, wait_for_status
from tests.integration.test_backup_create import BackupEnv, backup_env, seed_small
from tests.reliability.test_backup_kill import _send, node

__all__ = ["backup_env", "node"]
pytestmark = pytest.mark.slow


@contextlib.contextmanager
def table_held(env: BackupEnv, table: str = "characters") -> Iterator[psycopg.Connection]:
    """An open transaction holding ACCESS EXCLUSIVE on `table`: pg_dump and the row counts
    of its snapshot wait on it (as they would behind a migration's DDL)."""
    conn = psycopg.connect(env.database_url)
    try:
        conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        yield conn
    finally:
        conn.rollback()
        conn.close()


def _backend(env: BackupEnv, where: str, *args: object, timeout: float = 60) -> int:
    """The pid of the one backend of the test's database matching `where`."""
    deadline = time.monotonic() + timeout
    while True:
        rows = env.sql(f"SELECT pid FROM pg_stat_activity WHERE datname = %s AND {where}",
                       env.dbname, *args)
        if len(rows) == 1:
            return int(str(rows[0][0]))
        assert time.monotonic() < deadline, env.sql(
            "SELECT pid, application_name, state, wait_event_type, left(query, 80) "
            "FROM pg_stat_activity WHERE datname = %s", env.dbname)
        time.sleep(0.1)


def _backups(env: BackupEnv) -> list[tuple[object, ...]]:
    return env.sql("SELECT id, status, error FROM backups ORDER BY id")


def test_a_terminated_backend_during_backup_create_is_retried_not_failed_for_good(
        backup_env: BackupEnv, node: tuple[Proc, str]) -> None:
    worker, prefix = node
    seed_small(50)
    with table_held(backup_env):
        # given a backup job whose dump and row counts wait on a locked table
        job_id = _send(backup_env, prefix, "backup.create", {"verify": False})
        counting = _backend(backup_env, "state = 'active' AND wait_event_type = 'Lock' "
                            "AND application_name <> 'warden-backup' AND query LIKE %s",
                            "%count(*) FROM ONLY%")
        # when the backend counting the snapshot's rows is terminated (a restart, an
        # operator's pg_terminate_backend): psycopg's own OperationalError, not SQLAlchemy's
        backup_env.sql("SELECT pg_terminate_backend(%s)", counting)
        deadline = time.monotonic() + 30
        while not backup_env.sql("SELECT 1 FROM backups WHERE status = 'failed'"):
            assert time.monotonic() < deadline, (backup_env.sql(
                "SELECT status, error_code FROM job_runs WHERE id = %s", job_id),
                worker.tail(20_000))
            time.sleep(0.1)
    # then the job is retried (not failed/internal_error for good) and the backup is made
    done = wait_for_status(job_id, {"succeeded", "failed", "dead"}, timeout=120)
    assert (done["status"], done["attempts"]) == ("succeeded", 2), (done, worker.tail(20_000))
    rows = _backups(backup_env)
    assert [r[1] for r in rows] == ["failed", "succeeded"], rows
    assert "OperationalError" in str(rows[0][2]) or "terminat" in str(rows[0][2]), rows
    assert done["result"]["backup_id"] == rows[1][0]  # type: ignore[index]


def test_a_backup_whose_lock_vanished_mid_dump_is_not_recorded_but_retried(
        backup_env: BackupEnv, node: tuple[Proc, str]) -> None:
    from tasks.backups.service import CREATE_LOCK, LOCK_CLASS

    worker, prefix = node
    seed_small(50)
    with table_held(backup_env):
        # given a backup job holding the backup lock, its dump waiting on a locked table
        job_id = _send(backup_env, prefix, "backup.create", {"verify": False})
        _backend(backup_env, "state = 'active' AND wait_event_type = 'Lock' "
                 "AND application_name = 'warden-backup'")
        [(holder,)] = backup_env.sql(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = %s AND objid = %s", LOCK_CLASS, CREATE_LOCK)
        # when the lock's idle connection is dropped (pg_terminate_backend; as
        # idle_session_timeout or a proxy would), and the dump then goes on to its end
        backup_env.sql("SELECT pg_terminate_backend(%s)", holder)
    # then no backup is recorded as made under that lock: the first attempt failed as a
    # transient error, and the retry (under a lock of its own) made the backup
    done = wait_for_status(job_id, {"succeeded", "failed", "dead"}, timeout=120)
    assert (done["status"], done["attempts"]) == ("succeeded", 2), (done, worker.tail(20_000))
    rows = _backups(backup_env)
    assert [r[1] for r in rows] == ["failed", "succeeded"], rows
    assert "lock" in str(rows[0][2]), rows
    assert "LockLost" in worker.tail(500_000)


def test_the_prune_backstop_verifies_again_a_backup_whose_verify_job_ended_without_verdict(
        backup_env: BackupEnv, node: tuple[Proc, str]) -> None:
    from tasks.backups import service
    from tasks.backups.tasks import verify_key

    _, prefix = node
    seed_small(30)
    # given the newest backup, whose verification job (key backup-verify:<id>) ended dead
    # without a verdict (the database away at each attempt: what N4a left behind)
    made = service.create_backup()
    backup_id = int(made["backup_id"])
    backup_env.sql(
        "INSERT INTO job_runs (id, type, params, idempotency_key, status, attempts, "
        "max_attempts, error_code, error_message, finished_at) VALUES (gen_random_uuid(), "
        "'backup.verify', %s::jsonb, %s, 'dead', 3, 3, 'transient:OperationalError', "
        "'OperationalError: terminating connection due to administrator command', now())",
        f'{{"backup_id": {backup_id}}}', verify_key(backup_id))
    # when the nightly prune runs (its backstop looks for the newest unverified backup)
    pruned = wait_for_status(_send(backup_env, prefix, "backup.prune", {}),
                             {"succeeded", "failed", "dead"}, timeout=60)
    assert pruned["status"] == "succeeded", pruned
    # then a new verification of that backup runs, and the backup gets its verdict
    deadline = time.monotonic() + 90
    while backup_env.sql("SELECT verdict FROM backups WHERE id = %s", backup_id) != [
            ("passed",)]:
        assert time.monotonic() < deadline, backup_env.sql(
            "SELECT status, idempotency_key FROM job_runs WHERE type = 'backup.verify'")
        time.sleep(0.2)
    jobs = backup_env.sql("SELECT status FROM job_runs WHERE type = 'backup.verify' "
                          "ORDER BY created_at")
    assert [j[0] for j in jobs] == ["dead", "succeeded"]
    # and a second prune submits nothing more (the backup has its verdict)
    again = wait_for_status(_send(backup_env, prefix, "backup.prune", {}),
                            {"succeeded", "failed", "dead"}, timeout=60)
    assert again["status"] == "succeeded"
    assert len(backup_env.sql("SELECT 1 FROM job_runs WHERE type = 'backup.verify'")) == 2
