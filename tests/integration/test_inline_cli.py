"""`warden audit|validate|report --inline`: the family's service run in the CLI's own
process against the database WARDEN_DATABASE_URL names, with no broker, worker or Redis.

The drill these guard (operator drill D1): `WARDEN_DATABASE_URL=<copy> warden audit --fix`
queued the job in the copy, published it to the shared broker, and the live worker fixed
the live database. Here two databases hold the same seeded data; the commands are pointed
at one of them, with WARDEN_REDIS_URL at an address that accepts connections and never
answers (stricter than a closed port, which a command could try and shrug off: validation
treats an unreachable cache as no cache). Any use of Redis would show as a connection
waiting on that listener, or hang the command.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from tests.conftest import ROOT, Services, _apply_env, fresh_database

pytestmark = pytest.mark.slow

CHARACTERS = 60
CHUNK = 20  # WARDEN_VALIDATION_CHUNK_SIZE of these tests: a full sweep is 3 chunks


@dataclass
class Twins:
    """Two databases seeded alike: the one the commands are aimed at, and the other."""

    services: Services
    aimed: str
    other: str
    redis_listener: socket.socket

    def warden(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """The CLI as an operator runs it on the aimed-at database, Redis a silent address."""
        host, port = self.redis_listener.getsockname()
        full = self.services.env(WARDEN_DATABASE_URL=self.aimed,
                                 WARDEN_REDIS_URL=f"redis://{host}:{port}/0",
                                 WARDEN_VALIDATION_CHUNK_SIZE=str(CHUNK), **env)
        return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=full,
                              capture_output=True, text=True, timeout=120, check=False)

    def redis_was_dialled(self) -> bool:
        """Whether anything connected to the Redis address since the last look."""
        self.redis_listener.setblocking(False)
        dialled = False
        with contextlib.suppress(BlockingIOError):
            while True:
                conn, _ = self.redis_listener.accept()
                conn.close()
                dialled = True
        return dialled

    def rows(self, url: str, query: str, *args: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(query, args)
            return cur.fetchall() if cur.description else []


def _seed(services: Services, url: str) -> None:
    """The demo data with violations of every kind, the same in every database (one seed)."""
    from domain.demo import seed
    from workers.db import reset_engine
    from workers.settings import get_settings

    os.environ["WARDEN_DATABASE_URL"] = url
    get_settings.cache_clear()
    reset_engine()
    try:
        seed(CHARACTERS, violations=0.05, rng_seed=11)
    finally:
        _apply_env(services)


def _content(url: str) -> list[tuple[str, list[str]]]:
    """Every public table's rows as text: what "untouched" is checked against."""
    with psycopg.connect(url) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
        return [(n, [r[0] for r in conn.execute(f'SELECT t::text FROM "{n}" t ORDER BY 1')])
                for n in names]


@pytest.fixture(scope="module")
def twins(services: Services) -> Iterator[Twins]:
    with fresh_database(services) as aimed, fresh_database(services) as other:
        _seed(services, aimed)
        _seed(services, other)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        try:
            yield Twins(services, aimed, other, listener)
        finally:
            listener.close()


def _inline_jobs(twins: Twins, job_type: str) -> list[tuple[Any, ...]]:
    return twins.rows(twins.aimed, "SELECT id::text, status, result, max_attempts, worker "
                                   "FROM job_runs WHERE type = %s AND source = 'cli-inline' "
                                   "ORDER BY created_at", job_type)


def test_inline_audit_and_fix_change_only_the_database_named(twins: Twins) -> None:
    other_before = _content(twins.other)
    # when the audit runs inline on the aimed-at database
    checked = twins.warden("audit", "--inline")
    # then it prints the stored run as the queued command does, findings remain -> exit 1
    assert checked.returncode == 1, checked.stdout + checked.stderr
    first = checked.stdout.splitlines()[0]
    assert first.startswith("audit run ") and "(check, rules " in first
    summary = checked.stdout.splitlines()[-1]
    assert summary.startswith("findings=") and not summary.startswith("findings=0 "), summary
    assert "negative_xp" in checked.stdout
    # when it fixes inline
    fixed = twins.warden("audit", "--fix", "--inline", "--reason", "drill")
    assert fixed.returncode in (0, 1), fixed.stdout + fixed.stderr
    assert "(fix, rules " in fixed.stdout
    run_id = int(fixed.stdout.split("warden audit undo ")[1].split()[0])
    changed = twins.rows(twins.aimed, "SELECT changed_rows, fixed FROM audit_runs WHERE id = %s",
                         run_id)[0]
    assert changed[0] > 0 and changed[1] > 0
    # then an audit of the aimed-at database finds no fixable rule broken any more
    again = twins.warden("audit", "--inline", "--check", "negative_xp",
                         "--check", "duplicate_st_relationships")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "findings=0 " in again.stdout
    # and the other database, with the same data, was not touched at all
    assert _content(twins.other) == other_before
    # and nothing ever dialled Redis
    assert not twins.redis_was_dialled()
    # each run is an audit.integrity job of the aimed-at database, run by the CLI, its row
    # the stored run's job_id
    jobs = _inline_jobs(twins, "audit.integrity")
    assert [(j[1], j[3]) for j in jobs] == [("succeeded", 1)] * 3
    assert all(j[4].startswith("cli-inline@") for j in jobs)
    assert jobs[1][2]["run_id"] == run_id
    assert twins.rows(twins.aimed, "SELECT job_id::text FROM audit_runs WHERE id = %s",
                      run_id) == [(jobs[1][0],)]


def test_an_inline_audit_waits_for_the_audit_job_running_on_its_database(
        twins: Twins) -> None:
    # given an audit.integrity job running on the aimed-at database (a worker's, alive)
    holder = twins.rows(twins.aimed, """
        INSERT INTO job_runs (id, type, status, attempts, epoch, owner, worker, started_at,
                              published_at, delivered_at, lease_expires_at, source)
        VALUES (gen_random_uuid(), 'audit.integrity', 'running', 1, 1,
                'elsewhere:b00t:1:4242:1:x', 'w@h:1', now(), now(), now(),
                now() + interval '1 hour', 'beat')
        RETURNING id::text""")[0][0]
    runs_before = twins.rows(twins.aimed, "SELECT count(*) FROM audit_runs")
    try:
        # when an inline audit is asked for, with a short --timeout
        busy = twins.warden("audit", "--inline", "--timeout", "2")
        # then it did not run beside it: it waited, then gave up naming the running job
        assert busy.returncode == 2, busy.stdout + busy.stderr
        last = busy.stderr.strip().splitlines()[-1]
        assert last.startswith("error: audit.integrity job ") and holder in last, busy.stderr
        assert "still running on this database" in last
        assert twins.rows(twins.aimed, "SELECT count(*) FROM audit_runs") == runs_before
        # and it left no job row behind that a worker could pick up
        assert twins.rows(twins.aimed, "SELECT count(*) FROM job_runs WHERE source = "
                                       "'cli-inline' AND status <> 'succeeded'") == [(0,)]
    finally:
        twins.rows(twins.aimed, "UPDATE job_runs SET status = 'succeeded', finished_at = now(), "
                                "lease_expires_at = NULL WHERE id = %s", holder)
    # when the running one has ended, the inline audit runs
    done = twins.warden("audit", "--inline", "--timeout", "2", "--check", "negative_xp")
    assert done.returncode == 0, done.stdout + done.stderr


def test_inline_validate_sweeps_in_chunks_here(twins: Twins) -> None:
    # given a broken character in the aimed-at database (the inline fix above repaired the
    # seeded ones, their xp ledger included)
    from tests.integration.test_audit_helpers import constraints_off

    with psycopg.connect(twins.aimed, autocommit=True) as conn, constraints_off(conn):
        conn.execute("UPDATE characters SET strength = 12 "
                     "WHERE id = (SELECT min(id) FROM characters)")
    other_before = _content(twins.other)
    # when a full sweep runs inline (60 characters, chunks of 20: a worker would fan out)
    full = twins.warden("validate", "--inline")
    # then it prints the sweep as the queued command does; errors found -> exit 1
    assert full.returncode == 1, full.stdout + full.stderr
    line = full.stdout.strip()
    assert line.startswith("sweep ") and "(full, fanout, 3 chunks)" in line, line
    assert f"candidates={CHARACTERS} cache_hits=0 validated={CHARACTERS}" in line
    sweep_id = int(line.split()[1])
    # the sweep and its issues are stored in the aimed-at database, under the inline job
    [(status, job_id, chunks)] = twins.rows(
        twins.aimed, "SELECT status, job_id::text, chunks FROM validation_sweeps WHERE id = %s",
        sweep_id)
    jobs = _inline_jobs(twins, "validation.characters")
    assert (status, chunks, job_id) == ("succeeded", 3, jobs[-1][0])
    assert jobs[-1][1] == "succeeded" and jobs[-1][2]["children"] == []
    assert twins.rows(twins.aimed, "SELECT count(*) > 0 FROM validation_issues "
                                   "WHERE resolved_at IS NULL") == [(True,)]
    # an incremental sweep inline reads no verdict cache (it lives in Redis)
    inc = twins.warden("validate", "--inline", "--incremental", "--json")
    assert inc.returncode == 1, inc.stdout + inc.stderr
    assert '"cache_hits": 0' in inc.stdout and '"mode": "incremental"' in inc.stdout
    # the other database has no sweep and no issue, and Redis was never dialled
    assert _content(twins.other) == other_before
    assert not twins.redis_was_dialled()


def test_inline_report_is_computed_and_stored_here(twins: Twins) -> None:
    other_before = _content(twins.other)
    # when the health report runs inline on data with integrity findings
    out = twins.warden("report", "--inline")
    # then it prints the stored report as the queued command does: degraded -> exit 1
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.startswith("health report ") and "(degraded)" in out.stdout
    assert "alert: not_requested" in out.stdout
    report_id = int(out.stdout.split()[2])
    jobs = _inline_jobs(twins, "report.health")
    assert twins.rows(twins.aimed, "SELECT job_id::text, status FROM health_reports "
                                   "WHERE id = %s", report_id) == [(jobs[-1][0], "degraded")]
    # an alert cannot be sent inline: refused with one line, exit 2, nothing stored
    alert = twins.warden("report", "--inline", "--alert")
    assert alert.returncode == 2
    assert alert.stderr.strip().startswith("error: --alert needs a worker")
    assert len(_inline_jobs(twins, "report.health")) == len(jobs)
    assert _content(twins.other) == other_before
    assert not twins.redis_was_dialled()
