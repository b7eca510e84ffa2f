"""Resuming a migration under a fault (review N6): the state change and its run's job commit
in one transaction, over the API, the CLI and /ui; a migration left `queued` with no job
(by the two-transaction resume of earlier versions) is recoverable by retry.

The fault is real: the backend inserting the run's job is terminated (a trigger on job_runs
calls pg_terminate_backend on its own backend: a restart or an operator's kill at that very
statement, as the review's reproducer had on a stale pooled connection).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from tasks.data_migrations import service, spent_xp
from tests.conftest import ROOT, Services, start_worker
from tests.integration.test_audit_helpers import Isolated, isolated
from tests.integration.test_data_migration_service import _legacy, _requests
from tests.integration.test_ui_pages import _login

LEGACY = spent_xp.NAME
KILL_RUN_INSERT = """
CREATE OR REPLACE FUNCTION test_kill_run_insert() RETURNS trigger AS $$ BEGIN
    IF NEW.type = 'migration.run' THEN
        PERFORM pg_terminate_backend(pg_backend_pid());
        PERFORM pg_sleep(5);
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER test_kill_run_insert BEFORE INSERT ON job_runs
    FOR EACH ROW EXECUTE FUNCTION test_kill_run_insert();
"""


@pytest.fixture(scope="module")
def iso(services: Services) -> Iterator[Isolated]:
    with isolated(services) as found:
        yield found


@pytest.fixture
def db(iso: Isolated) -> Iterator[psycopg.Connection[Any]]:
    with iso.connect() as conn:
        conn.execute("TRUNCATE characters, scenes, data_migrations CASCADE")
        conn.execute("DELETE FROM job_runs WHERE type = 'migration.run'")
        yield conn
        conn.execute("DROP TRIGGER IF EXISTS test_kill_run_insert ON job_runs")


@pytest.fixture(scope="module")
def admin(iso: Isolated) -> str:
    return iso.token("admin")


def _paused(db: psycopg.Connection[Any], ids: list[int]) -> dict[str, Any]:
    """The migration run in-process for two batches, then paused by an operator."""
    def pause_after_two(done: int, total: int | None = None, **_: Any) -> None:
        if done >= 10:
            from workers.db import session_scope

            with session_scope() as s:
                service.pause(s, LEGACY, actor="test", reason="peak hours")

    out = service.run(LEGACY, batch_size=5, hooks=service.Hooks(progress=pause_after_two))
    assert out["status"] == "paused", out
    return _state(db)


def _state(db: psycopg.Connection[Any]) -> dict[str, Any]:
    cur = db.execute("SELECT status, job_id, cursor FROM data_migrations WHERE name = %s",
                     (LEGACY,))
    row = cur.fetchone()
    assert row is not None
    return dict(zip(("status", "job_id", "cursor"), row, strict=True))


def _runs(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return db.execute("SELECT id, status FROM job_runs WHERE type = 'migration.run' "
                      "ORDER BY created_at").fetchall()


def _resume_api(client: TestClient, admin: str) -> Any:
    return client.post(f"/v1/migrations/{LEGACY}/resume", json={},
                       headers={"Authorization": f"Bearer {admin}"})


def _resume_cli(iso: Isolated, admin: str) -> Any:
    return subprocess.run([sys.executable, "-m", "cli.main", "migrate", "resume", LEGACY],
                          cwd=ROOT, text=True, capture_output=True, env=iso.env(),
                          timeout=120, check=False)


def _resume_ui(client: TestClient, admin: str) -> Any:
    csrf = _login(client, admin)
    return client.post(f"/ui/migrations/{LEGACY}/resume", data={"csrf": csrf, "reason": ""})


@pytest.mark.parametrize("where", ["api", "cli", "ui"])
def test_a_resume_whose_run_cannot_be_queued_changes_nothing_and_can_be_repeated(
        iso: Isolated, db: psycopg.Connection[Any], admin: str, where: str) -> None:
    from api_stub.app import create_app

    # given a migration paused at a checkpoint
    ids = _legacy(db, 20)
    paused = _paused(db, ids)
    with TestClient(create_app(run_relay=False), follow_redirects=False,
                    raise_server_exceptions=False) as client:
        def resume() -> Any:
            if where == "api":
                return _resume_api(client, admin)
            if where == "cli":
                return _resume_cli(iso, admin)
            return _resume_ui(client, admin)

        # when it is resumed while the backend inserting its run is terminated
        db.execute(KILL_RUN_INSERT)
        failed = resume()
        # then the resume fails as a whole: still paused, at the same checkpoint, no run
        ok = {"api": 200, "cli": 0, "ui": 303}[where]
        code = failed.returncode if where == "cli" else failed.status_code
        assert code != ok, failed
        assert _state(db) == paused
        assert _runs(db) == []
        # when the fault is gone and it is resumed again
        db.execute("DROP TRIGGER test_kill_run_insert ON job_runs")
        again = resume()
        code = again.returncode if where == "cli" else again.status_code
        assert code == ok, getattr(again, "text", None) or again.stderr
        # then it is queued, naming the run that was queued with it
        state = _state(db)
        [(run_id, run_status)] = _runs(db)
        assert (state["status"], str(state["job_id"]), run_status) == (
            "queued", str(run_id), "queued")
        if where == "api":
            assert again.json()["job_id"] == str(run_id)


def test_a_migration_queued_with_no_job_is_recovered_by_retry(
        services: Services, iso: Isolated, db: psycopg.Connection[Any], admin: str) -> None:
    from api_stub.app import create_app

    # given a paused migration left `queued` with no job (an earlier version's resume:
    # the state committed, then its run's submit failed)
    ids = _legacy(db, 20)
    _paused(db, ids)
    db.execute("UPDATE data_migrations SET status = 'queued', job_id = NULL, "
               "changed_at = now() WHERE name = %s", (LEGACY,))
    auth = {"Authorization": f"Bearer {admin}"}
    with TestClient(create_app(run_relay=False)) as client:
        # then it shows as failed, saying why, and resume refuses it
        shown = client.get(f"/v1/migrations/{LEGACY}", headers=auth).json()
        assert shown["status"] == "failed" and "no job" in shown["last_error"], shown
        assert client.post(f"/v1/migrations/{LEGACY}/resume", json={},
                           headers=auth).status_code == 409
        # when an operator retries it
        r = client.post(f"/v1/migrations/{LEGACY}/retry", json={}, headers=auth)
        assert r.status_code == 200, r.text
        job_id = r.json()["job_id"]
    # then a worker runs that job from the checkpoint to the end
    worker = start_worker(services, "resume", concurrency=1, env=iso.overrides())
    try:
        deadline = time.monotonic() + 60
        while _state(db)["status"] != "succeeded":
            assert time.monotonic() < deadline, (_state(db), _runs(db), worker.tail(20_000))
            time.sleep(0.2)
    finally:
        worker.stop()
    assert dict(_runs(db))[uuid.UUID(job_id)] == "succeeded"
    assert len(_requests(db)) == 40
