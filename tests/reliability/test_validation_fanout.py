"""A validation sweep fanned out in chunks across real worker processes: a chunk whose
worker is SIGKILLed mid-chunk is delivered again, and the parent still ends with exactly
the totals of a sweep without faults."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import psycopg
import pytest

from domain import demo
from tests.conftest import Services, start_worker, wait_for_status
from tests.integration.test_audit_helpers import Isolated, isolated, warden

pytestmark = pytest.mark.slow

CHARACTERS = 600
CHUNK = 100  # six chunks


def _enqueue(iso: Isolated, *params: str) -> str:
    out = warden(iso, "enqueue", "validation.characters", *params)
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["id"])


def _stable(totals: dict[str, Any]) -> dict[str, Any]:
    """What a sweep found, without what it changed in the issue history."""
    return {k: v for k, v in totals.items() if k not in ("opened", "resolved")}


def _blocked_chunks(conn: psycopg.Connection[Any], parent: str,
                    timeout: float = 60) -> list[tuple[str, str]]:
    """(child id, worker) of the running chunks, once two wait on the test's lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = conn.execute(
            "SELECT id::text, worker FROM job_runs WHERE parent_id = %s AND status = 'running' "
            "ORDER BY id", (parent,)).fetchall()
        waiting = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database() AND application_name = 'warden'").fetchone()
        if len(running) >= 2 and waiting is not None and waiting[0] >= 2:
            return [(r[0], r[1]) for r in running]
        time.sleep(0.1)
    raise AssertionError("the chunks never reached the locked table")


def test_a_killed_chunk_worker_changes_nothing_in_the_parent_s_totals(
        services: Services) -> None:
    with isolated(services) as iso, iso.connect() as conn:
        # given 600 characters, 5% breaking each rule, and a worker cutting sweeps in chunks
        # of 100 (two pool processes)
        demo.seed(CHARACTERS, violations=0.05, rng_seed=7)
        worker = start_worker(services, "sweep", concurrency=2,
                              env=iso.overrides(WARDEN_VALIDATION_CHUNK_SIZE=str(CHUNK)))
        try:
            # and the totals of a full sweep without faults
            clean = wait_for_status(_enqueue(iso, "-p", "mode=full"), {"succeeded", "failed",
                                                                       "dead"}, timeout=120)
            assert clean["status"] == "succeeded", clean
            expected = clean["result"]["totals"]
            assert expected["validated"] == CHARACTERS and expected["opened"] > 0
            assert clean["result"]["chunks"] == CHARACTERS // CHUNK
            # when a second full sweep's chunks are held at their first write by a lock,
            # and the pool process running one of them is SIGKILLed there
            locker = iso.connect()
            locker.execute("BEGIN")
            locker.execute("LOCK TABLE validation_issues IN EXCLUSIVE MODE")
            parent = _enqueue(iso, "-p", "mode=full")
            wait_for_status(parent, {"waiting"}, timeout=60)
            victim, where = _blocked_chunks(conn, parent)[0]
            os.kill(int(where.rsplit(":", 1)[1]), signal.SIGKILL)
            locker.execute("ROLLBACK")
            locker.close()
            # then the parent succeeds, and what it found equals the fault-free sweep's
            done = wait_for_status(parent, {"succeeded", "failed", "dead"}, timeout=180)
            assert done["status"] == "succeeded", done
            totals = done["result"]["totals"]
            assert _stable(totals) == _stable(expected)
            # and no issue was stored twice or lost: nothing new, nothing resolved
            assert (totals["opened"], totals["resolved"]) == (0, 0)
            stored = conn.execute("SELECT count(*) FROM validation_issues").fetchone()
            assert stored == (expected["opened"],)
            # and the killed chunk ran again (two attempts); the parent's result lists its
            # children, and its totals are their results' sum
            children = conn.execute(
                "SELECT id::text, status, attempts, result FROM job_runs WHERE parent_id = %s",
                (parent,)).fetchall()
            assert {c[1] for c in children} == {"succeeded"}
            assert {c[0]: c[2] for c in children}[victim] == 2
            assert sorted(c["id"] for c in done["result"]["children"]) == sorted(
                c[0] for c in children)
            assert sum(c[3]["validated"] for c in children) == totals["validated"]
            sweep = conn.execute("SELECT status, chunks, totals FROM validation_sweeps "
                                 "WHERE job_id = %s", (parent,)).fetchone()
            assert sweep is not None and sweep[:2] == ("succeeded", CHARACTERS // CHUNK)
            assert sweep[2]["validated"] == CHARACTERS
        finally:
            worker.stop()


def test_chunks_that_hit_a_transient_error_retry_on_their_own(services: Services) -> None:
    with isolated(services) as iso, iso.connect() as conn:
        # given 600 characters, a worker cutting sweeps in chunks of 100, and the totals of
        # a full sweep without faults
        demo.seed(CHARACTERS, violations=0.05, rng_seed=11)
        worker = start_worker(services, "flaky", concurrency=2,
                              env=iso.overrides(WARDEN_VALIDATION_CHUNK_SIZE=str(CHUNK)))
        try:
            clean = wait_for_status(_enqueue(iso, "-p", "mode=full"),
                                    {"succeeded", "failed", "dead"}, timeout=120)
            assert clean["status"] == "succeeded", clean
            # when the first two chunks of the next sweep to store issues fail with a
            # serialization failure (a sequence counts them: it is not rolled back)
            conn.execute("CREATE SEQUENCE test_flaky_chunks")
            conn.execute(
                "CREATE FUNCTION test_flaky_chunks() RETURNS trigger AS $$ BEGIN "
                "IF nextval('test_flaky_chunks') <= 2 THEN RAISE EXCEPTION 'could not "
                "serialize access (injected)' USING ERRCODE = 'serialization_failure'; "
                "END IF; RETURN NULL; END $$ LANGUAGE plpgsql")
            conn.execute("CREATE TRIGGER test_flaky_chunks BEFORE INSERT ON validation_issues "
                         "FOR EACH STATEMENT EXECUTE FUNCTION test_flaky_chunks()")
            parent = _enqueue(iso, "-p", "mode=full")
            done = wait_for_status(parent, {"succeeded", "failed", "dead"}, timeout=180)
            # then those two chunks were retried on their own, the others ran once, and the
            # parent's totals equal the fault-free sweep's
            assert done["status"] == "succeeded", done
            assert _stable(done["result"]["totals"]) == _stable(clean["result"]["totals"])
            attempts = sorted(c["attempts"] for c in done["result"]["children"])
            assert attempts == [1] * (CHARACTERS // CHUNK - 2) + [2, 2]
            assert {c["status"] for c in done["result"]["children"]} == {"succeeded"}
            # and the CLI lists the parent's children, with their attempts
            listed = warden(iso, "jobs", "--parent", parent)
            assert listed.returncode == 0, listed.stderr
            lines = listed.stdout.splitlines()
            assert sorted(line.split()[0] for line in lines) == sorted(
                c["id"] for c in done["result"]["children"])
            assert sum("attempts=2" in line for line in lines) == 2
        finally:
            worker.stop()
