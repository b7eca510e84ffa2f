"""`warden restore` ends the jobs its backup caught unfinished, so a restored database never
runs them again by itself (operator drill D8: a worker started on a restored copy re-ran
the `backup.create` that made the dump, and it wrote into the live backup folder)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.integration.test_backup_create import BackupEnv, backup_env, point_settings, seed_small
from tests.integration.test_restore_cli import warden

__all__ = ["backup_env"]

UNFINISHED = {"running": "backup.create", "queued": "platform.ping",
              "retrying": "platform.ping", "waiting": "validation.characters"}


def _jobs(url: str) -> dict[str, tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id::text, status, error_code, error_message, "
                            "lease_expires_at, children_pending FROM job_runs").fetchall()
    return {str(r[0]): tuple(r[1:]) for r in rows}


@pytest.fixture
def jobs_then_backup(backup_env: BackupEnv) -> tuple[dict[str, str], dict[str, object]]:
    """A backup taken while jobs were in every unfinished status (a waiting parent with a
    queued child among them) and one had succeeded; returns (status or role -> id, backup)."""
    from tasks.backups import service

    seed_small(40)
    ids = {k: str(uuid.uuid4()) for k in (*UNFINISHED, "child", "succeeded")}
    with psycopg.connect(backup_env.database_url, autocommit=True) as conn:
        for status, job_type in UNFINISHED.items():
            running = status == "running"
            conn.execute(
                "INSERT INTO job_runs (id, type, status, attempts, epoch, owner, started_at, "
                "lease_expires_at, children_total, children_pending, published_at) "
                "VALUES (%s, %s, %s, %s, 1, %s, CASE WHEN %s THEN now() END, "
                "CASE WHEN %s THEN now() + interval '1 hour' END, %s, %s, now())",
                (ids[status], job_type, status, int(running), "w:x:1:1:1:n" if running else None,
                 running, running, int(status == "waiting"), int(status == "waiting")))
        conn.execute("INSERT INTO job_runs (id, type, status, parent_id) "
                     "VALUES (%s, 'validation.check_chunk', 'queued', %s)",
                     (ids["child"], ids["waiting"]))
        conn.execute("INSERT INTO job_runs (id, type, status, result, finished_at) "
                     "VALUES (%s, 'platform.ping', 'succeeded', '{\"echo\": 1}', now())",
                     (ids["succeeded"],))
    return ids, service.create_backup()


@pytest.fixture
def copy_db(backup_env: BackupEnv) -> Iterator[str]:
    name = f"{backup_env.dbname}_copy"
    yield name
    with psycopg.connect(backup_env.admin_url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_restored_copy_holds_no_job_left_to_run(
        backup_env: BackupEnv, jobs_then_backup: tuple[dict[str, str], dict[str, object]],
        copy_db: str) -> None:
    ids, made = jobs_then_backup
    live_before = _jobs(backup_env.database_url)
    # when the backup is restored into a copy
    done = warden(backup_env, "restore", str(made["backup_id"]), "--target-db", copy_db)
    # then it says what it did to the jobs, and how to audit the copy without a broker
    assert done.returncode == 0, done.stderr
    assert ("5 unfinished job(s) in the copy cancelled (queued 2, retrying 1, running 1, "
            "waiting 1; error_code restored_copy)") in done.stdout
    assert done.stdout.strip().splitlines()[-1].endswith(f"/{copy_db} warden audit --inline")
    # and in the copy every unfinished job is cancelled, naming the restore; the parent was
    # not put back in the queue by its child's end; the finished job is as it was
    copy_url = backup_env.admin_url(copy_db)
    copy = _jobs(copy_url)
    for role in (*UNFINISHED, "child"):
        status, code, message, lease, _ = copy[ids[role]]
        assert (status, code, lease) == ("cancelled", "restored_copy", None), role
        assert f"backup {made['backup_id']}" in str(message) and copy_db in str(message)
    assert copy[ids["waiting"]][4] == 0
    assert copy[ids["succeeded"]] == live_before[ids["succeeded"]]
    # and the live database's jobs are untouched
    assert _jobs(backup_env.database_url) == live_before
    # and a worker started on the copy would not run the backup job the dump caught running
    from workers import jobstore

    point_settings({"WARDEN_DATABASE_URL": copy_url})
    try:
        claim = jobstore.claim(ids["running"], "backup.create", {}, "w:y:2:2:2:m", "w@copy", 5,
                               singleton=True)
    finally:
        point_settings({"WARDEN_DATABASE_URL": backup_env.database_url})
    assert (claim.action, claim.status) == ("final", "cancelled")


def test_a_restore_over_the_live_database_runs_nothing_of_the_backup_s_time_by_itself(
        backup_env: BackupEnv,
        jobs_then_backup: tuple[dict[str, str], dict[str, object]]) -> None:
    ids, made = jobs_then_backup
    # given the backup's running job has since finished (the restore brings it back running)
    backup_env.sql("UPDATE job_runs SET status = 'succeeded', finished_at = now(), "
                   "lease_expires_at = NULL WHERE id = %s", ids["running"])
    # when the backup is restored over the live database (disaster recovery)
    done = warden(backup_env, "restore", str(made["backup_id"]), "--target-db",
                  backup_env.dbname, "--force", "--force")
    # then the jobs it held unfinished are cancelled as in a copy, naming the restore, and
    # the output says where to find them
    assert done.returncode == 0, done.stderr
    assert ("5 unfinished job(s) of the backup cancelled (queued 2, retrying 1, running 1, "
            "waiting 1; error_code restored_copy)") in done.stdout
    assert "warden jobs --status cancelled" in done.stdout
    assert "warden audit --inline" not in done.stdout  # the live database is no copy
    rows = _jobs(backup_env.database_url)
    assert {rows[ids[r]][:2] for r in (*UNFINISHED, "child")} == {("cancelled", "restored_copy")}
    assert "restored over the live database" in str(rows[ids["running"]][2])
    assert rows[ids["succeeded"]][:2] == ("succeeded", None)
