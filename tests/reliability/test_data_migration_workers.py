"""Data migrations through real workers, the real CLI and the real API.

A migration scans whole tables, so this module has a database of its own and broker keys
of its own (WARDEN_BROKER_KEY_PREFIX): no other test's worker can take its jobs, and its
workers' relay publishes only its jobs. Failures and slowness are real Postgres triggers.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import ROOT, Services, fresh_database, start_api, start_worker
from tests.integration.test_data_migration_service import _inject, _legacy, _requests

pytestmark = pytest.mark.slow

LEGACY = "legacy_spent_xp"


@dataclass
class Stage:
    services: Services
    env: dict[str, str]
    db: psycopg.Connection
    api: str
    admin: str

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, text=True,
                              capture_output=True, env=self.services.env(**self.env),
                              timeout=timeout)

    def state(self) -> dict[str, Any]:
        out = self.cli("migrate", "status", LEGACY, "--json")
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout)[0])

    def job(self, job_id: str) -> tuple[Any, ...]:
        row = self.db.execute("SELECT status, error_code, attempts, result, worker "
                              "FROM job_runs WHERE id = %s", (job_id,)).fetchone()
        assert row is not None
        return tuple(row)

    def wait_job(self, job_id: str, timeout: float = 90) -> tuple[Any, ...]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.job(job_id)
            if row[0] in ("succeeded", "failed", "dead", "cancelled"):
                return row
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not final: {self.job(job_id)}")

    def wait_state(self, statuses: set[str], timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.db.execute("SELECT status FROM data_migrations WHERE name = %s",
                                  (LEGACY,)).fetchone()
            if row is not None and row[0] in statuses:
                return self.state()
            time.sleep(0.2)
        raise AssertionError(f"{LEGACY} not in {statuses}: {self.state()}")

    def wait_batches(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.db.execute("SELECT batches_done FROM data_migrations WHERE name = %s",
                                  (LEGACY,)).fetchone()
            if row is not None and row[0] >= n:
                return
            time.sleep(0.05)
        raise AssertionError(f"fewer than {n} batches after {timeout}s")

    def batches(self) -> list[tuple[Any, ...]]:
        return self.db.execute(
            "SELECT lower_id, upper_id, status, attempts, job_id FROM data_migration_batches "
            "WHERE migration = %s ORDER BY id", (LEGACY,)).fetchall()


def _contiguous(batches: list[tuple[Any, ...]]) -> None:
    """The succeeded batches tile the keys: each starts where the last ended (none twice)."""
    done = [b for b in batches if b[2] == "succeeded"]
    assert done and done[0][0] is None
    for earlier, later in itertools.pairwise(done):
        assert later[0] == earlier[1], (earlier, later)


@pytest.fixture(scope="module")
def stage(services: Services) -> Iterator[Stage]:
    with fresh_database(services) as url:
        # Runs hand over to a fresh job every 2 s: every test below also crosses handovers.
        env = {"WARDEN_DATABASE_URL": url,
               "WARDEN_BROKER_KEY_PREFIX": f"dm-{uuid.uuid4().hex[:8]}:",
               "WARDEN_MIGRATION_RUN_SECONDS": "2"}
        worker = start_worker(services, "dm", concurrency=2, env=env)
        api, base = start_api(services, env=env)
        try:
            with psycopg.connect(url, autocommit=True) as db:
                made = subprocess.run(
                    [sys.executable, "-m", "cli.main", "token", "create", "--name",
                     f"dm-{uuid.uuid4().hex[:6]}", "--scopes", "admin"], cwd=ROOT, text=True,
                    capture_output=True, env=services.env(**env), timeout=60, check=True)
                yield Stage(services, env, db, base, made.stdout.strip())
        finally:
            api.stop()
            worker.stop()


@pytest.fixture
def st(stage: Stage) -> Iterator[Stage]:
    stage.db.execute("TRUNCATE characters, scenes, data_migrations CASCADE")
    yield stage
    stage.db.execute("DROP TRIGGER IF EXISTS test_inject ON xp_spend_requests")


def test_failure_at_batch_k_then_api_retry_resumes_at_k_and_equals_a_clean_run(
        st: Stage) -> None:
    # given 40 legacy characters in batches of 5, with a failure injected at batch 4
    ids = _legacy(st.db, 40)
    _inject(st.db, f"IF NEW.character_id = {ids[15]} THEN "
                   "RAISE EXCEPTION 'injected failure'; END IF;")
    # when an operator runs it from the CLI
    out = st.cli("migrate", "data", LEGACY, "--batch-size", "5")
    # then the command shows progress and exits 1 with the failed batch and its error
    assert out.returncode == 1, out.stdout + out.stderr
    assert "rows/s" in out.stdout and "ETA" in out.stdout
    assert f"error: {LEGACY} failed: batch ({ids[14]}, {ids[19]}]" in out.stderr
    state = st.state()
    job = st.job(state["job_id"])
    assert (state["status"], job[0], job[1]) == ("failed", "failed", "migration_failed")
    before = st.db.execute("SELECT id, character_id FROM xp_spend_requests ORDER BY id").fetchall()
    # when the cause is removed and the failed job is retried through the job core's API
    st.db.execute("DROP TRIGGER test_inject ON xp_spend_requests")
    r = httpx.post(f"{st.api}/v1/jobs/{state['job_id']}/retry",
                   json={"reason": "injected failure removed"},
                   headers={"Authorization": f"Bearer {st.admin}"}, timeout=10)
    assert r.status_code == 200, r.text
    done = st.wait_job(state["job_id"])
    # then the same job succeeds, having resumed at batch 4 and left batches 1-3 alone
    assert done[0] == "succeeded" and done[3]["status"] == "succeeded", done
    batches = st.batches()
    assert [(b[0], b[2], b[3]) for b in batches[:4]][3] == (ids[14], "succeeded", 2)
    _contiguous(batches)
    assert st.db.execute("SELECT id, character_id FROM xp_spend_requests WHERE character_id "
                         "= ANY(%s) ORDER BY id", (ids[:15],)).fetchall() == before
    # and the data equals a clean run's, row by row (reverse, then run again cleanly)
    resumed = _requests(st.db)
    undo = st.cli("migrate", "reverse", LEGACY, "--reason", "compare with a clean run")
    assert undo.returncode == 0, undo.stderr
    st.wait_state({"pending"})
    assert _requests(st.db) == []
    clean = st.cli("migrate", "data", LEGACY)
    assert clean.returncode == 0, clean.stderr
    assert _requests(st.db) == resumed and len(resumed) == 80


def test_retry_failed_sweep_and_cli_retry_bring_a_failed_migration_back(st: Stage) -> None:
    # given a migration that fails at character 13, then (on retry) at character 23
    ids = _legacy(st.db, 30)
    _inject(st.db, f"IF NEW.character_id = {ids[12]} THEN RAISE EXCEPTION 'first'; END IF;")
    assert st.cli("migrate", "data", LEGACY, "--batch-size", "5").returncode == 1
    st.db.execute("DROP TRIGGER test_inject ON xp_spend_requests")
    _inject(st.db, f"IF NEW.character_id = {ids[22]} THEN RAISE EXCEPTION 'second'; END IF;")
    # when the hourly sweep runs, then it retries the failed migration, which fails further on
    swept = st.cli("enqueue", "migration.retry_failed", "--wait")
    assert swept.returncode == 0, swept.stderr
    assert [r["name"] for r in json.loads(swept.stdout)["result"]["retried"]] == [LEGACY]
    time.sleep(1)
    state = st.wait_state({"failed"})
    assert (state["attempts"], state["cursor"]) == (2, ids[19])
    assert "second" in state["last_error"]
    # when an operator retries it from the CLI after the fix, then it completes
    st.db.execute("DROP TRIGGER test_inject ON xp_spend_requests")
    out = st.cli("migrate", "retry", LEGACY)
    assert out.returncode == 0, out.stderr
    state = st.wait_state({"succeeded"})
    assert (state["attempts"], state["rows_done"], state["verify_remaining"]) == (3, 30, 0)
    _contiguous(st.batches())
    # and a succeeded migration is not retried
    again = st.cli("migrate", "retry", LEGACY)
    assert again.returncode == 1 and again.stderr.startswith("error: ")


def test_paused_run_ends_its_job_holds_nothing_and_resumes_where_it_stopped(st: Stage) -> None:
    # given a slow migration (20 ms a row, batches of 4 characters: ~8 s) started detached
    ids = _legacy(st.db, 200)
    _inject(st.db, "PERFORM pg_sleep(0.02);")
    out = st.cli("migrate", "data", LEGACY, "--batch-size", "4", "--detach")
    assert out.returncode == 0, out.stderr
    st.wait_batches(2)
    # when an operator pauses it over the API
    r = httpx.post(f"{st.api}/v1/migrations/{LEGACY}/pause", json={"reason": "peak hours"},
                   headers={"Authorization": f"Bearer {st.admin}"}, timeout=10)
    assert r.status_code == 200, r.text
    # then its job ends (no worker held), no transaction of it stays open, nothing past the
    # checkpoint is migrated
    job_id = st.state()["job_id"]  # the detached run's, or a successor it handed over to
    done = st.wait_job(job_id)
    assert (done[0], done[3]["status"]) == ("succeeded", "paused")
    state = st.state()
    assert state["status"] == "paused" and state["paused"]["reason"] == "peak hours"
    open_tx = st.db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND xact_start IS NOT NULL AND pid <> pg_backend_pid()").fetchone()
    assert open_tx == (0,)
    cursor = state["cursor"]
    assert cursor < ids[-1]
    assert {r[0] for r in _requests(st.db)} == {i for i in ids if i <= cursor}
    assert st.db.execute("SELECT count(*) FROM job_runs WHERE type = 'migration.run' AND "
                         "status IN ('queued', 'running', 'retrying')").fetchone() == (0,)
    # when it is resumed from the CLI, then a new run starts at the cursor and finishes
    resumed = st.cli("migrate", "resume", LEGACY)
    assert resumed.returncode == 0, resumed.stderr
    new_job = resumed.stdout.strip().rsplit(" ", 1)[1]
    assert new_job != job_id
    state = st.wait_state({"succeeded"})
    assert state["seconds_paused"] > 0
    batches = st.batches()
    _contiguous(batches)
    first_resumed = next(b for b in batches if str(b[4]) == new_job)
    assert first_resumed[0] == cursor
    assert len(_requests(st.db)) == 400


def test_sigkill_mid_migration_resumes_at_the_checkpoint(st: Stage) -> None:
    # given a slow migration running (20 ms a row: ~4 s)
    _legacy(st.db, 100)
    _inject(st.db, "PERFORM pg_sleep(0.02);")
    out = st.cli("migrate", "data", LEGACY, "--batch-size", "4", "--detach")
    assert out.returncode == 0, out.stderr
    st.wait_batches(3)
    # when the process running it (this job or a successor it handed over to) is SIGKILLed
    running = st.db.execute("SELECT id::text, worker FROM job_runs WHERE type = 'migration.run' "
                            "AND status = 'running'").fetchone()
    assert running is not None
    os.kill(int(str(running[1]).rsplit(":", 1)[1]), signal.SIGKILL)
    # then that job is delivered again, resumes at the checkpoint and the migration completes
    state = st.wait_state({"succeeded"}, timeout=120)
    assert st.job(running[0])[:3] == ("succeeded", None, 2)  # the killed run spent an attempt
    assert state["rows_done"] == 100 and state["run_no"] == 1
    _contiguous(st.batches())
    assert len(_requests(st.db)) == 200


def test_a_long_run_hands_over_to_fresh_jobs_and_the_bar_follows(st: Stage) -> None:
    # given workers that hand a run over after 2 s, and a migration that takes ~4 s
    _legacy(st.db, 100)
    _inject(st.db, "PERFORM pg_sleep(0.02);")
    # when it is run from the CLI
    out = st.cli("migrate", "data", LEGACY, "--batch-size", "4")
    # then the command followed every handover to the end, and the batches tile the keys
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{LEGACY} succeeded: 100 rows" in out.stdout
    runs = st.db.execute("SELECT result->>'status' FROM job_runs WHERE type = 'migration.run' "
                         "AND created_at > now() - interval '1 minute' ORDER BY created_at"
                         ).fetchall()
    assert runs.count(("handed_over",)) >= 1 and runs[-1] == ("succeeded",)
    _contiguous(st.batches())
    assert len(_requests(st.db)) == 200


def test_pause_resume_and_cancel_by_cli_and_api(st: Stage) -> None:
    admin = {"Authorization": f"Bearer {st.admin}"}

    def ended(expected: str) -> dict[str, Any]:
        """The migration's last run ended `expected` (handovers followed), its state too."""
        deadline = time.monotonic() + 60
        while True:
            state = st.state()
            job = st.job(state["job_id"])
            if job[0] in ("succeeded", "failed", "dead", "cancelled"):
                break
            assert time.monotonic() < deadline, (state, job)
            time.sleep(0.2)
        assert (job[0], job[3]["status"], state["status"]) == ("succeeded", expected, expected)
        return state

    # given a slow migration (50 ms a row: still running when each step below, an HTTP
    # call or a CLI process on a loaded machine, gets to it) of 300 characters, detached
    ids = _legacy(st.db, 300)
    _inject(st.db, "PERFORM pg_sleep(0.05);")
    assert st.cli("migrate", "data", LEGACY, "--batch-size", "4", "--detach").returncode == 0
    st.wait_batches(2)
    # when an operator pauses it from the CLI, then its run ends paused
    out = st.cli("migrate", "pause", LEGACY, "--reason", "peak hours")
    assert out.returncode == 0 and f"{LEGACY} paused at" in out.stdout, out.stderr
    paused = ended("paused")
    # when it is resumed over the API, then a new run goes on from the cursor
    r = httpx.post(f"{st.api}/v1/migrations/{LEGACY}/resume", json={}, headers=admin,
                   timeout=10)
    assert r.status_code == 200, r.text
    st.wait_batches(paused["batches_done"] + 2)
    # when it is cancelled over the API, then the run ends cancelled; done batches stay
    r = httpx.post(f"{st.api}/v1/migrations/{LEGACY}/cancel", json={"reason": "wrong night"},
                   headers=admin, timeout=10)
    assert r.status_code == 200, r.text
    cancelled = ended("cancelled")
    assert paused["cursor"] < cancelled["cursor"] < ids[-1]
    assert {r[0] for r in _requests(st.db)} == {i for i in ids if i <= cancelled["cursor"]}
    _contiguous(st.batches())
    # when it is started again (a new pass, slower: 100 ms a row, so that it is still
    # running when the CLI, a new process, gets to cancel it) and cancelled from the CLI,
    # then it stops too
    st.db.execute("CREATE OR REPLACE FUNCTION test_inject() RETURNS trigger AS $$ BEGIN "
                  "PERFORM pg_sleep(0.1); RETURN NEW; END $$ LANGUAGE plpgsql")
    assert st.cli("migrate", "data", LEGACY, "--batch-size", "4", "--detach").returncode == 0
    st.wait_state({"running"})
    out = st.cli("migrate", "cancel", LEGACY, "--reason", "still the wrong night")
    assert out.returncode == 0 and f"{LEGACY} cancelled" in out.stdout, out.stderr
    assert ended("cancelled")["run_no"] == 2
    # and a cancelled migration cannot be paused; a last pass, unhindered, completes
    refused = st.cli("migrate", "pause", LEGACY, "--reason", "x")
    assert refused.returncode == 1 and "only a queued or running" in refused.stderr
    st.db.execute("DROP TRIGGER test_inject ON xp_spend_requests")
    done = st.cli("migrate", "data", LEGACY)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (st.state()["run_no"], len(_requests(st.db))) == (3, 600)
