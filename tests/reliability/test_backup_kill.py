"""Backups with real worker processes: a SIGKILL during pg_dump, and the nightly chain
create -> verify -> prune through the job core."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from kombu import Connection

from tests.conftest import ROOT, Proc, start_worker, wait_for_status
from tests.integration.test_backup_create import BackupEnv, backup_env, seed_small
from workers.app import app

__all__ = ["backup_env"]
pytestmark = pytest.mark.slow


def _core_landed() -> bool:
    from workers.jobs import JobTask

    return hasattr(JobTask, "complete")


@pytest.fixture
def node(backup_env: BackupEnv) -> Iterator[tuple[Proc, str]]:
    """A worker on the test's own database, with broker keys of its own (no other test's
    worker may take these jobs: they would run against another database). Two processes:
    a verification (whose DROP DATABASE can wait on a busy server) does not hold up the
    next backup."""
    if not _core_landed():
        pytest.skip("needs the job-core rewrite (JobTask.complete), not landed yet")
    prefix = f"bktest-{uuid.uuid4().hex[:8]}:"
    proc = start_worker(backup_env.services, "backup", concurrency=2, env={
        "WARDEN_DATABASE_URL": backup_env.database_url,
        "WARDEN_BACKUP_DIR": str(backup_env.backup_dir),
        "WARDEN_BROKER_KEY_PREFIX": prefix})
    try:
        yield proc, prefix
    finally:
        proc.stop()


def _send(env: BackupEnv, prefix: str, job_type: str, params: dict[str, object]) -> str:
    """A job row, then its message on the node's prefixed queue (as submit would)."""
    job_id = str(uuid.uuid4())
    env.sql("INSERT INTO job_runs (id, type, params, published_at) VALUES "
            "(%s, %s, %s::jsonb, now())", job_id, job_type, json.dumps(params))
    options = dict(app.conf.broker_transport_options, global_keyprefix=prefix)
    with Connection(env.services.redis_url, transport_options=options) as conn:
        app.send_task(job_type, kwargs={"params": params}, task_id=job_id, connection=conn)
    return job_id


def _final_files(directory: Path) -> list[str]:
    """Files that look like a finished backup (a final name, not a .partial)."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if p.name.endswith((".dump", ".manifest.json")) and not p.name.startswith("."))


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkill_during_pg_dump_leaves_no_complete_looking_file_nor_succeeded_row(
        backup_env: BackupEnv, node: tuple[Proc, str]) -> None:
    _, prefix = node
    seed_small(100)
    # given a session holding a lock on characters, so pg_dump is provably mid-dump (it has
    # opened its file and waits for the table) when the worker is killed
    blocker = psycopg.connect(backup_env.database_url)
    blocker.execute("LOCK TABLE characters IN ACCESS EXCLUSIVE MODE")
    try:
        job_id = _send(backup_env, prefix, "backup.create", {"verify": True})
        deadline = time.monotonic() + 30
        row: list[tuple[object, ...]] = []
        while time.monotonic() < deadline:
            row = backup_env.sql("SELECT id, dump_pid, partial_path FROM backups "
                                 "WHERE status = 'running' AND dump_pid IS NOT NULL")
            if row:
                break
            time.sleep(0.1)
        assert row, "pg_dump never started"
        orphan_id, dump_pid, partial = row[0]
        assert isinstance(dump_pid, int) and Path(str(partial)).exists()
        # when the worker process running the job (pg_dump's parent) is SIGKILLed
        runner = psutil.Process(dump_pid).ppid()
        assert "pg_dump" not in psutil.Process(runner).name()
        os.kill(runner, signal.SIGKILL)
        # then pg_dump dies with it, no file looks complete, and no row says succeeded
        deadline = time.monotonic() + 10
        while _alive(dump_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(dump_pid), "pg_dump outlived its worker"
        assert _final_files(backup_env.backup_dir) == []
        assert backup_env.sql("SELECT count(*) FROM backups WHERE status = 'succeeded'") == [(0,)]
    finally:
        blocker.rollback()
        blocker.close()
    # and when the job is delivered again, the next run cleans up and backs up for real
    done = wait_for_status(job_id, {"succeeded", "failed", "dead"}, timeout=90)
    assert done["status"] == "succeeded", done
    assert int(str(done["attempts"])) == 2
    rows = backup_env.sql("SELECT id, status, error FROM backups ORDER BY id")
    assert rows[0][:2] == (orphan_id, "failed") and "interrupted" in str(rows[0][2])
    assert [r[1] for r in rows[1:]] == ["succeeded"]
    assert not Path(str(partial)).exists()
    new_id = rows[1][0]
    assert len(_final_files(backup_env.backup_dir)) == 2  # one archive, its manifest
    # and the create job submitted the verification of that backup, which passed
    verify = backup_env.sql("SELECT id FROM job_runs WHERE idempotency_key = %s",
                            f"backup-verify:{new_id}")
    assert verify, "no verification was submitted"
    checked = wait_for_status(str(verify[0][0]), {"succeeded", "failed", "dead"}, timeout=90)
    assert checked["status"] == "succeeded", checked
    assert backup_env.sql("SELECT verdict FROM backups WHERE id = %s", new_id) == [("passed",)]


def test_nightly_chain_create_verify_prune_through_the_worker(
        backup_env: BackupEnv, node: tuple[Proc, str]) -> None:
    _, prefix = node
    seed_small(50)
    # given two backups made by jobs, each followed by its verification: one submitted as
    # beat does, one by an operator's `warden backup create --wait`
    made = []
    job = wait_for_status(_send(backup_env, prefix, "backup.create", {"verify": True}),
                          {"succeeded", "failed", "dead"}, timeout=60)
    assert job["status"] == "succeeded", job
    made.append(int(job["result"]["backup_id"]))  # type: ignore[index]
    cli = subprocess.run(
        [sys.executable, "-m", "cli.main", "backup", "create", "--wait", "--timeout", "150"],
        env=backup_env.env(WARDEN_BROKER_KEY_PREFIX=prefix), cwd=ROOT, capture_output=True,
        text=True, timeout=180, check=False)
    assert cli.returncode == 0, cli.stderr
    out = json.loads(cli.stdout)
    assert out["status"] == "succeeded"
    made.append(int(out["result"]["backup_id"]))
    for backup_id in made:
        key = f"backup-verify:{backup_id}"
        deadline = time.monotonic() + 60
        while not backup_env.sql("SELECT 1 FROM job_runs WHERE idempotency_key = %s", key):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        [(verify_id,)] = backup_env.sql("SELECT id FROM job_runs WHERE idempotency_key = %s",
                                        key)
        assert wait_for_status(str(verify_id), {"succeeded", "failed", "dead"},
                               timeout=60)["status"] == "succeeded"
    # when a prune job keeps one daily backup only, and runs twice
    for attempt in range(2):
        pruned = wait_for_status(
            _send(backup_env, prefix, "backup.prune", {"keep_daily": 1, "keep_weekly": 0,
                                                       "keep_monthly": 0}),
            {"succeeded", "failed", "dead"}, timeout=60)
        assert pruned["status"] == "succeeded", pruned
        deleted = [d["backup_id"] for d in pruned["result"]["deleted"]]  # type: ignore[index]
        # then the first run prunes the older one, and the second finds nothing to do
        assert deleted == ([made[0]] if attempt == 0 else [])
    statuses = backup_env.sql("SELECT id, status FROM backups ORDER BY id")
    assert statuses == [(made[0], "pruned"), (made[1], "succeeded")]
    assert len(_final_files(backup_env.backup_dir)) == 2


def _scratch_databases(env: BackupEnv) -> list[str]:
    from tasks.backups.service import scratch_prefix

    prefix = scratch_prefix(env.dbname)
    return [str(r[0]) for r in env.sql(
        "SELECT datname FROM pg_database WHERE left(datname, %s) = %s", len(prefix), prefix)]


def _restore_process(worker: Proc, env: BackupEnv, timeout: float) -> psutil.Process:
    """The verification's pg_restore into its scratch database, stopped (SIGSTOP) the moment
    it is seen, so the worker is provably killed mid-restore."""
    from tasks.backups.service import scratch_prefix

    prefix = scratch_prefix(env.dbname)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(worker.popen.pid).children(recursive=True):
            try:
                cmd = " ".join(child.cmdline())
                if "pg_restore" in child.name() and "--single-transaction" in cmd \
                        and prefix in cmd:
                    child.send_signal(signal.SIGSTOP)
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.005)
    raise AssertionError(f"no pg_restore into a scratch database seen: {worker.tail()}")


def test_sigkill_during_verification_leaves_no_scratch_database_nor_a_stuck_backup(
        backup_env: BackupEnv, node: tuple[Proc, str]) -> None:
    from tasks.backups import service
    from tasks.backups.retention import Policy
    from workers.db import session_scope

    worker, prefix = node
    # given a backup, and its verification running in the worker
    seed_small(1000)
    made = service.create_backup()
    backup_id = int(made["backup_id"])
    job_id = _send(backup_env, prefix, "backup.verify", {"backup_id": backup_id})
    restoring = _restore_process(worker, backup_env, timeout=60)
    # when the worker process running it (pg_restore's parent) is SIGKILLed mid-restore
    runner = restoring.ppid()
    assert "pg_restore" not in psutil.Process(runner).name()
    os.kill(runner, signal.SIGKILL)
    # then pg_restore dies with it, the scratch database it was filling is left behind, the
    # backup has no verdict (neither passed nor failed), and prune keeps it meanwhile
    deadline = time.monotonic() + 10
    while _alive(restoring.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(restoring.pid), "pg_restore outlived its worker"
    assert len(_scratch_databases(backup_env)) == 1
    assert backup_env.sql("SELECT verdict FROM backups WHERE id = %s", backup_id) == [(None,)]
    with session_scope() as s:
        plan = service.prune_backups(s, Policy(0, 0, 0), dry_run=True)
    assert plan["kept"] == [{"backup_id": backup_id, "reasons": ["verification running"]}]
    # when the job is delivered again (its lease lapsed), then it verifies for real
    done = wait_for_status(job_id, {"succeeded", "failed", "dead"}, timeout=120)
    assert done["status"] == "succeeded", done
    assert int(str(done["attempts"])) == 2
    # and the leftover scratch database is gone, the verdict and restore time stored
    assert _scratch_databases(backup_env) == []
    [(verdict, seconds, verifying_job)] = backup_env.sql(
        "SELECT verdict, restore_seconds, verify_job_id FROM backups WHERE id = %s", backup_id)
    assert verdict == "passed" and isinstance(seconds, float) and verifying_job is None
    # and nothing pins the backup any more: prune keeps it only as the newest verified
    with session_scope() as s:
        assert service.list_backups(s)[0]["verifying"] is False
        plan = service.prune_backups(s, Policy(0, 0, 0), dry_run=True)
    assert plan["kept"] == [{"backup_id": backup_id, "reasons": ["newest verified"]}]


def test_two_backups_submitted_at_once_run_one_after_the_other(
        backup_env: BackupEnv, node: tuple[Proc, str]) -> None:
    _, prefix = node
    seed_small(50)
    # given a lock on characters that holds the first backup mid-dump
    blocker = psycopg.connect(backup_env.database_url)
    blocker.execute("LOCK TABLE characters IN ACCESS EXCLUSIVE MODE")
    try:
        # when two backup jobs are submitted at once, to a worker with two processes
        jobs = [_send(backup_env, prefix, "backup.create", {"verify": False}) for _ in range(2)]
        deadline = time.monotonic() + 30
        while not backup_env.sql("SELECT 1 FROM backups WHERE dump_pid IS NOT NULL"):
            assert time.monotonic() < deadline, "pg_dump never started"
            time.sleep(0.1)
        time.sleep(4)  # past a lease TTL: the second job has been delivered and turned away
        # then one dumps and the other waits, without a backup row or a spent attempt
        assert backup_env.sql("SELECT count(*) FROM backups") == [(1,)]
        statuses = backup_env.sql("SELECT status, attempts FROM job_runs WHERE id = ANY(%s) "
                                  "ORDER BY status", jobs)
        assert [s for s, _ in statuses] == ["queued", "running"], statuses
        assert dict(statuses)["queued"] == 0
    finally:
        blocker.rollback()
        blocker.close()
    # and once the first has finished, the second runs: two backups that never overlapped
    finished = [wait_for_status(j, {"succeeded", "failed", "dead"}, timeout=90) for j in jobs]
    assert [f["status"] for f in finished] == ["succeeded", "succeeded"], finished
    assert [int(str(f["attempts"])) for f in finished] == [1, 1]
    rows = backup_env.sql("SELECT status, started_at, finished_at FROM backups ORDER BY id")
    assert [r[0] for r in rows] == ["succeeded", "succeeded"]
    assert rows[1][1] >= rows[0][2]  # type: ignore[operator]
    assert len(_final_files(backup_env.backup_dir)) == 4


def test_the_verification_is_queued_in_the_create_jobs_own_transaction(
        backup_env: BackupEnv, node: tuple[Proc, str]) -> None:
    _, prefix = node
    seed_small(30)
    # given a backup job
    job_id = _send(backup_env, prefix, "backup.create", {"verify": True})
    # when it is watched closely until it has succeeded, in one snapshot each time
    seen: list[tuple[object, ...]] = []
    deadline = time.monotonic() + 60
    with psycopg.connect(backup_env.database_url, autocommit=True) as conn:
        while not seen or seen[-1][0] not in ("succeeded", "failed", "dead"):
            assert time.monotonic() < deadline, seen[-1:]
            row = conn.execute(
                "SELECT j.status, EXISTS (SELECT 1 FROM backups b JOIN job_runs v "
                "ON v.idempotency_key = 'backup-verify:' || b.id WHERE b.job_id = j.id) "
                "FROM job_runs j WHERE j.id = %s", (job_id,)).fetchone()
            assert row is not None
            seen.append(tuple(row))
            time.sleep(0.002)
    # then the job never showed succeeded without its backup's verification queued (a
    # worker dying between the two would leave the backup unverified until the next prune)
    assert seen[-1] == ("succeeded", True), seen[-5:]
