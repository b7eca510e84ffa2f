"""The job statistics fold (workers/stats.py) under concurrency, and what a /metrics scrape
does when it cannot fold: real Postgres, several folds at once as the relay and the API
replicas' scrapes run them."""

from __future__ import annotations

import random
import threading
import time
import uuid

import psycopg

from tests.conftest import Services
from workers import metrics, stats


def _outcomes(db: psycopg.Connection, prefix: str) -> float:
    row = db.execute("SELECT COALESCE(sum(value), 0) FROM job_stats WHERE kind = 'outcome' "
                     "AND type LIKE %s", (prefix + "%",)).fetchone()
    assert row is not None
    return float(row[0])


def test_concurrent_folds_count_each_event_once_and_never_deadlock(
        services: Services, db: psycopg.Connection) -> None:
    # given events of many types arriving while three folds run at once (the relay and two
    # API replicas' scrapes), each fold of a different size, so their batches hold
    # different sets of job_stats rows
    prefix = f"testing.fold_{uuid.uuid4().hex[:6]}."
    types = [f"{prefix}{i}" for i in range(300)]
    stop = time.monotonic() + 8
    inserted = 0
    errors: list[str] = []
    lock = threading.Lock()

    def produce() -> None:
        nonlocal inserted
        with psycopg.connect(services.database_url, autocommit=True) as conn:
            while time.monotonic() < stop and not errors:
                rows = [(random.choice(types), random.choice(("succeeded", "failed")),
                         random.random() * 10) for _ in range(200)]
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO job_events (type, status, run_seconds, attempts) "
                        "VALUES (%s, %s, %s, 1)", rows)
                with lock:
                    inserted += len(rows)

    def fold() -> None:
        while time.monotonic() < stop and not errors:
            try:
                stats.fold(random.choice((50, 500, 5000)))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    threads = [threading.Thread(target=produce) for _ in range(2)]
    threads += [threading.Thread(target=fold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # then no fold failed (a deadlock rolls a fold back: its scrape lost its series)
    assert errors == []
    # and once the rest is folded, every event counted exactly once (other processes of
    # the suite run relays that fold too: a batch they hold is skipped by ours, so wait for
    # the last of this test's events to be gone)
    _fold_until_gone(db, prefix + "%")
    assert _outcomes(db, prefix) == inserted
    row = db.execute("SELECT sum(value) FROM job_stats WHERE kind = 'run_bucket' "
                     "AND label = '+Inf' AND type LIKE %s", (prefix + "%",)).fetchone()
    assert row is not None and row[0] == inserted


def _fold_until_gone(db: psycopg.Connection, type_pattern: str, timeout: float = 30) -> None:
    """Fold until no event of the types matching `type_pattern` is left (another process's
    fold holding some commits them too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats.fold_all()
        left = db.execute("SELECT count(*) FROM job_events WHERE type LIKE %s",
                          (type_pattern,)).fetchone()
        if left is not None and left[0] == 0:
            return
        time.sleep(0.2)


def test_scrape_answers_when_its_fold_cannot_run(services: Services,
                                                 db: psycopg.Connection) -> None:
    # given an event to fold whose job_stats row another transaction holds (a long fold of
    # another process, a stuck session) for 15 seconds
    jtype = f"testing.blocked_{uuid.uuid4().hex[:6]}"
    db.execute("INSERT INTO job_stats (kind, type, label, value) "
               "VALUES ('outcome', %s, 'succeeded|', 1)", (jtype,))
    db.execute("INSERT INTO job_events (type, status, attempts) VALUES (%s, 'succeeded', 1)",
               (jtype,))
    holder = psycopg.connect(services.database_url)
    holder.execute("SELECT 1 FROM job_stats WHERE kind = 'outcome' AND type = %s FOR UPDATE",
                   (jtype,))
    release = threading.Timer(15, holder.rollback)
    release.start()
    try:
        # when /metrics reads the job figures
        start = time.monotonic()
        figures = metrics._read_jobs()
        elapsed = time.monotonic() - start
    finally:
        release.cancel()
        holder.rollback()
        holder.close()

    # then it answers within its fold timeout, with the summary as it stood
    assert elapsed < stats.SCRAPE_FOLD_TIMEOUT_MS / 1000 + 3, elapsed
    assert figures.snapshot.outcomes[(jtype, "succeeded", "")] == 1
    assert figures.events_pending >= 1
    # and the event is left for the next fold, which counts it (a relay of another process
    # of the suite may hold it, blocked on the same row until the holder let go: wait for it)
    _fold_until_gone(db, jtype)
    assert stats.read().outcomes[(jtype, "succeeded", "")] == 2


def test_an_operator_retry_waits_from_the_retry_not_from_the_jobs_creation(
        services: Services, db: psycopg.Connection) -> None:
    from workers import identity, jobstore, operator

    # given jobs that went dead two days ago (one retried from the API/CLI, one by a
    # migration's retry)
    jtype = f"testing.retry_wait_{uuid.uuid4().hex[:6]}"
    ids = []
    for _ in range(2):
        job_id = str(uuid.uuid4())
        db.execute(
            "INSERT INTO job_runs (id, type, params, status, attempts, max_attempts, "
            "created_at, started_at, finished_at, error_code) VALUES (%s, %s, '{}', 'dead', "
            "5, 5, now() - interval '2 days', now() - interval '2 days', "
            "now() - interval '2 days', 'transient:X')", (job_id, jtype))
        ids.append(job_id)

    # when an operator retries them
    operator.retry(ids[0], actor="test", reason="the dependency is back")
    jobstore.operator_retry(ids[1])

    # then each is due from the retry: the queue's oldest age is not two days
    for job_id in ids:
        row = db.execute("SELECT EXTRACT(EPOCH FROM now() - COALESCE(next_attempt_at, "
                         "not_before, created_at)) FROM job_runs WHERE id = %s",
                         (job_id,)).fetchone()
        assert row is not None and float(row[0]) < 60, row

    # and when a worker claims them, their queue wait is seconds, not two days
    for job_id in ids:
        claim = jobstore.claim(job_id, jtype, {}, identity.new_token(), "test:1", 5)
        assert claim.action == "run", claim
    stats.fold_all()
    wait = stats.read().histograms["wait"][jtype]
    assert wait.series(stats.WAIT_BUCKETS)[-1][1] == 2
    assert wait.total < 60, wait.total


def test_a_parent_put_back_by_its_last_child_is_due_from_then(
        services: Services, db: psycopg.Connection) -> None:
    # given a parent that fanned out an hour ago and waits for its last child
    parent, child = str(uuid.uuid4()), str(uuid.uuid4())
    db.execute("INSERT INTO job_runs (id, type, params, status, created_at, started_at, "
               "attempts, children_total, children_pending) VALUES (%s, 'testing.fan_parent', "
               "'{}', 'waiting', now() - interval '1 hour', now() - interval '1 hour', 0, 1, 1)",
               (parent,))
    db.execute("INSERT INTO job_runs (id, type, params, status, attempts, started_at, "
               "parent_id) VALUES (%s, 'testing.fan_chunk', '{}', 'running', 1, now(), %s)",
               (child, parent))

    # when the child ends
    db.execute("UPDATE job_runs SET status = 'succeeded', finished_at = now() WHERE id = %s",
               (child,))

    # then the parent is queued, due now: the queue's oldest age is not its hour of children
    row = db.execute("SELECT status, EXTRACT(EPOCH FROM now() - COALESCE(next_attempt_at, "
                     "not_before, created_at)) FROM job_runs WHERE id = %s", (parent,)).fetchone()
    assert row is not None and row[0] == "queued"
    assert float(row[1]) < 60, row


def test_a_run_whose_owner_died_is_timed_to_its_lease_not_to_its_outcome(
        services: Services, db: psycopg.Connection) -> None:
    from workers import jobstore

    # given a run started an hour ago whose worker died: its lease lapsed 50 minutes ago,
    # and nobody could take it over (its type was removed in a deploy)
    jtype = f"testing.lapsed_{uuid.uuid4().hex[:6]}"
    job_id = str(uuid.uuid4())
    db.execute("INSERT INTO job_runs (id, type, params, status, attempts, epoch, owner, "
               "started_at, lease_expires_at) VALUES (%s, %s, '{}', 'running', 1, 1, 'gone', "
               "now() - interval '1 hour', now() - interval '50 minutes')", (job_id, jtype))

    # when a worker records it failed (unknown type)
    assert jobstore.fail_unknown_type(job_id, jtype, "test:1")

    # then its run time is the ten minutes it can have run, not the hour until its outcome
    stats.fold_all()
    run = stats.read().histograms["run"][jtype]
    assert run.series(stats.RUN_BUCKETS)[-1][1] == 1
    assert 590 < run.total < 700, run.total


def test_a_message_adopted_as_failed_is_counted(services: Services) -> None:
    from workers import identity, jobstore

    # given a message sent past the enqueue path (`celery call`) whose params are no object
    jtype = f"testing.adopted_{uuid.uuid4().hex[:6]}"

    # when a worker receives it: the job is recorded failed, never run
    claim = jobstore.claim(str(uuid.uuid4()), jtype, ["not", "an", "object"],
                           identity.new_token(), "test:1", 5)
    assert claim.action == "final" and claim.status == "failed", claim

    # then its outcome is counted like any other
    stats.fold_all()
    assert stats.read().outcomes.get((jtype, "failed", "invalid_params")) == 1
