"""Verification under faults: only the backup itself earns a failed verdict (review N4b),
and the scratch sweep drops only databases a verification marked as its own (N15).

The faults are real and land at step 5 (the integrity checks on the restored copy): the
checks' backend is terminated with pg_terminate_backend, or their statement waits on a
lock past its timeout; the soft time limit is the exception Celery's signal handler raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy.exc
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import text
from sqlalchemy.orm import Session

from tests.integration.test_backup_create import BackupEnv, backup_env, seed_small

__all__ = ["backup_env"]


def _fault_in_the_checks(env: BackupEnv, kind: str) -> Callable[[Session], Any]:
    """audit.integrity_counts as verification calls it, with `kind` of fault on the
    restored copy (the live database's checks run untouched)."""
    from tasks.backups import audit

    original = audit.integrity_counts

    def checks(session: Session) -> Any:
        database = session.execute(text("SELECT current_database()")).scalar_one()
        if database == env.dbname:
            return original(session)
        if kind == "terminated":  # a restart, a failover, an operator's kill
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with psycopg.connect(env.admin_url(), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                    (pid,)).fetchone():
                    time.sleep(0.02)
            return original(session)
        if kind == "lock_timeout":  # a statement cancelled by the server's timeout
            with psycopg.connect(env.admin_url(database)) as holder:
                holder.execute("LOCK TABLE characters IN ACCESS EXCLUSIVE MODE")
                session.execute(text("SET LOCAL lock_timeout = '200ms'"))
                try:
                    return original(session)
                finally:
                    holder.rollback()
        raise SoftTimeLimitExceeded("SoftTimeLimitExceeded()")

    return checks


@pytest.mark.parametrize("kind", ["terminated", "lock_timeout", "soft_time_limit"])
def test_a_fault_during_the_checks_stores_no_verdict_and_the_backup_survives_a_prune(
        backup_env: BackupEnv, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    from tasks.backups import audit, retention, service
    from workers.db import session_scope
    from workers.errors import is_transient
    from workers.jobs import TRANSIENT_EXCEPTIONS

    # given a good backup, and a fault of `kind` while the checks run on its restored copy
    seed_small(40)
    made = service.create_backup()
    monkeypatch.setattr(audit, "integrity_counts", _fault_in_the_checks(backup_env, kind))
    # when it is verified, then the verification ends in an error the job core retries
    # (the soft time limit: the verify task turns it into a retry), not a verdict
    expected = SoftTimeLimitExceeded if kind == "soft_time_limit" \
        else sqlalchemy.exc.OperationalError
    with pytest.raises(expected) as caught:
        service.verify_backup(made["backup_id"])
    assert kind == "soft_time_limit" or (is_transient(caught.value)
                                         and isinstance(caught.value, TRANSIENT_EXCEPTIONS))
    # and the backup is not blamed: no verdict, no error, its scratch database dropped
    assert backup_env.sql("SELECT verdict, verify_error FROM backups") == [(None, None)]
    prefix = service.scratch_prefix(backup_env.dbname)
    assert backup_env.sql("SELECT count(*) FROM pg_database WHERE left(datname, %s) = %s",
                          len(prefix), prefix) == [(0,)]
    # and retention keeping one daily backup keeps it (a failed verdict would give it no
    # slot, and the prune would delete it)
    with session_scope() as s:
        kept = service.prune_backups(s, retention.Policy(daily=1, weekly=0, monthly=0))
    assert kept["deleted"] == []
    # and once the fault is gone, the same backup passes
    monkeypatch.undo()
    assert service.verify_backup(made["backup_id"])["verdict"] == "passed"


def test_the_sweep_drops_only_scratch_databases_this_database_marked_as_its_own(
        backup_env: BackupEnv) -> None:
    from tasks.backups import service

    # given a backup, and on the same server three databases named like its scratch ones:
    # a leftover of its own killed verification, another application database's scratch
    # (the same first 30 characters), and a restore target an operator named that way
    seed_small(20)
    made = service.create_backup()
    prefix = service.scratch_prefix(backup_env.dbname)
    own, others = f"{prefix}{made['backup_id']}_dead0000", f"{prefix}77_0ther000"
    target = f"{prefix}restored_by_hand"
    with psycopg.connect(backup_env.admin_url(), autocommit=True) as conn:
        service.create_scratch(conn, own, backup_env.dbname)
        service.create_scratch(conn, others, f"{backup_env.dbname}_another_application")
        conn.execute(f'CREATE DATABASE "{target}"')
    try:
        # when a verification runs
        assert service.verify_backup(made["backup_id"])["verdict"] == "passed"
        # then only its own leftover is gone
        left = {str(r[0]) for r in backup_env.sql(
            "SELECT datname FROM pg_database WHERE left(datname, %s) = %s", len(prefix),
            prefix)}
        assert left == {others, target}
    finally:
        with psycopg.connect(backup_env.admin_url(), autocommit=True) as conn:
            for name in (own, others, target):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_restore_killed_by_a_signal_stores_no_verdict(
        backup_env: BackupEnv, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tasks.backups import pgtools, retention, service
    from workers.db import session_scope
    from workers.errors import TransientError
    from workers.settings import get_settings

    # given a good backup, and a pg_restore that the OOM killer ends mid-restore (SIGKILL, no
    # output; its --list still works)
    seed_small(40)
    made = service.create_backup()
    real = pgtools.find_tools(int(backup_env.sql("SHOW server_version_num")[0][0]) // 10000)
    tools = tmp_path / "bin"
    tools.mkdir()
    for binary in real.bin_dir.iterdir():
        (tools / binary.name).symlink_to(binary)
    (tools / "pg_restore").unlink()
    (tools / "pg_restore").write_text(
        "#!/bin/bash\nfor a in \"$@\"; do case \"$a\" in --list|-l|--version|-V) "
        f"exec {real.path('pg_restore')} \"$@\";; esac; done\nkill -9 $$\n")
    (tools / "pg_restore").chmod(0o755)
    monkeypatch.setenv("WARDEN_PG_BIN_DIR", str(tools))
    get_settings.cache_clear()
    # when it is verified, then the error is transient (the job retries), not a verdict
    with pytest.raises(TransientError, match="exited -9"):
        service.verify_backup(made["backup_id"])
    assert backup_env.sql("SELECT verdict, verify_error FROM backups") == [(None, None)]
    # and a prune keeping one daily backup keeps it
    with session_scope() as s:
        kept = service.prune_backups(s, retention.Policy(daily=1, weekly=0, monthly=0))
    assert kept["deleted"] == []
    monkeypatch.delenv("WARDEN_PG_BIN_DIR")
    get_settings.cache_clear()
