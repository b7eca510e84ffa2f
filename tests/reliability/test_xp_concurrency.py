"""XP jobs under real concurrency and real crashes: real worker processes, real Postgres.

The jobs address rows these tests create (their own chronicle), so any other worker of the
session that takes some of them runs them against the same database: nothing to isolate.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

import psutil
import psycopg
import pytest
from sqlalchemy import text

from domain import rules
from tasks.xp import service as xp
from tests.conftest import Proc, Services, start_worker
from workers.db import session_scope
from workers.enqueue import submit

pytestmark = pytest.mark.slow

DOMAIN_CODES = {"xp_already_given", "already_processed", "insufficient_xp"}


def _characters(db: psycopg.Connection, n: int, xp_each: int) -> list[int]:
    chronicle = random.randint(10**9, 2 * 10**9)
    rows = db.execute(
        "INSERT INTO characters (name, owner_id, chronicle_id, xp) "
        "SELECT 'conc ' || g, 1, %s, %s FROM generate_series(1, %s) g RETURNING id",
        (chronicle, xp_each, n)).fetchall()
    ids = sorted(r[0] for r in rows)
    if xp_each:
        db.execute("INSERT INTO xp_ledger (character_id, delta, kind, reason) "
                   "SELECT unnest(%s::bigint[]), %s, 'adjust', 'opening balance: test'",
                   (ids, xp_each))
    return ids


def _scenes(db: psycopg.Connection, cast: list[list[int]]) -> list[int]:
    scenes = []
    for members in cast:
        row = db.execute("INSERT INTO scenes (chronicle_id, name, finished) VALUES (1, 'c', true) "
                         "RETURNING id").fetchone()
        assert row is not None
        db.execute("INSERT INTO scene_participants SELECT %s, unnest(%s::bigint[])",
                   (row[0], members))
        scenes.append(int(row[0]))
    return scenes


def _wait_all(db: psycopg.Connection, ids: list[str], timeout: float) -> dict[str, Any]:
    """Until every job is final; their rows by id."""
    deadline = time.monotonic() + timeout
    while True:
        rows = db.execute("SELECT id::text, type, status, error_code, attempts, params, result "
                          "FROM job_runs WHERE id = ANY(%s::uuid[])", (ids,)).fetchall()
        open_ = [r for r in rows if r[2] not in ("succeeded", "failed", "dead", "cancelled")]
        if len(rows) == len(ids) and not open_:
            return {r[0]: r for r in rows}
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(open_)} of {len(ids)} jobs unfinished: {open_[:3]}")
        time.sleep(0.5)


def _balances(db: psycopg.Connection, ids: list[int]) -> dict[int, tuple[int, int]]:
    rows = db.execute("SELECT c.id, c.xp, (SELECT coalesce(sum(delta), 0) FROM xp_ledger l "
                      "WHERE l.character_id = c.id) FROM characters c WHERE c.id = ANY(%s)",
                      (ids,)).fetchall()
    return {r[0]: (r[1], int(r[2])) for r in rows}


def _deadlocks(db: psycopg.Connection) -> int:
    row = db.execute("SELECT deadlocks FROM pg_stat_database "
                     "WHERE datname = current_database()").fetchone()
    assert row is not None
    return int(row[0])


def test_thousands_of_overlapping_xp_jobs_never_deadlock_and_balance(
        services: Services, db: psycopg.Connection) -> None:
    rnd = random.Random(7)
    # given 40 characters with 60 XP, 400 finished scenes of 3-5 of them (overlapping), and
    # 300 pending spend requests (filed in-process, as a user would have)
    chars = _characters(db, 40, 60)
    cast = [rnd.sample(chars, rnd.randint(3, 5)) for _ in range(400)]
    scenes = _scenes(db, cast)
    traits = list(rules.ATTRIBUTES + rules.ABILITIES)
    pairs = [(c, t) for c in chars for t in traits]
    rnd.shuffle(pairs)
    pending: list[tuple[int, int]] = []  # (request id, cost)
    with session_scope() as s:
        for cid, trait in pairs[:300]:
            current = s.execute(text(f"SELECT {trait} FROM characters WHERE id = :c"),
                                {"c": cid}).scalar_one()
            done = xp.spend(s, cid, trait, current + 1)
            pending.append((done.request_id, done.cost))
    setup_costs = Counter[int]()
    for (cid, _), (_, cost) in zip(pairs[:300], pending, strict=True):
        setup_costs[cid] += cost
    # and 2,000 jobs: each award twice, 600 spends on other traits, an approval AND a denial
    # of each pending request, all enqueued in random order
    jobs: list[tuple[str, dict[str, Any]]] = []
    awards = {}
    for scene, members in zip(scenes, cast, strict=True):
        awards[scene] = {m: rnd.random() < 0.8 for m in members}
        body = {"scene_id": scene, "awards": {str(k): v for k, v in awards[scene].items()}}
        jobs += [("xp.award_scene", body)] * 2
    with session_scope() as s:
        for cid, trait in pairs[300:900]:
            current = s.execute(text(f"SELECT {trait} FROM characters WHERE id = :c"),
                                {"c": cid}).scalar_one()
            jobs.append(("xp.spend", {"character_id": cid, "trait_name": trait,
                                      "trait_value": current + 1}))
    for request_id, _ in pending:
        jobs.append(("xp.approve_spend", {"request_id": request_id, "decided_by": 3}))
        jobs.append(("xp.deny_spend", {"request_id": request_id, "decided_by": 3}))
    rnd.shuffle(jobs)
    assert len(jobs) == 2000
    deadlocks_before = _deadlocks(db)
    # when two workers with three processes each run them all
    workers = [start_worker(services, f"conc{i}", concurrency=3) for i in range(2)]
    try:
        ids = [str(submit(t, p, source="test").job["id"]) for t, p in jobs]
        done = _wait_all(db, ids, timeout=600)
    finally:
        for w in workers:
            w.stop()
    # then no job failed for anything but a domain rule, and none was ever retried
    outcomes = Counter((r[2], r[3]) for r in done.values())
    assert {code for status, code in outcomes if status != "succeeded"} <= DOMAIN_CODES, outcomes
    assert all(r[4] == 1 for r in done.values()), "a job needed a retry (deadlock?)"
    time.sleep(1)  # the workers' backends have exited: their statistics are flushed
    assert _deadlocks(db) == deadlocks_before
    # and each scene was awarded by exactly one of its two jobs
    by_scene = defaultdict(list)
    for r in done.values():
        if r[1] == "xp.award_scene":
            by_scene[r[5]["scene_id"]].append((r[2], r[3]))
    assert all(sorted(v) == [("failed", "xp_already_given"), ("succeeded", None)]
               for v in by_scene.values())
    # and each pending request was decided once: approved or denied, never both
    decided = defaultdict(list)
    for r in done.values():
        if r[1] in ("xp.approve_spend", "xp.deny_spend"):
            decided[r[5]["request_id"]].append((r[1], r[2], r[3]))
    assert all(sorted(s for _, s, _ in v) == ["failed", "succeeded"] for v in decided.values())
    # and for every character: xp == its ledger sum == what the outcomes say it must be
    expected = {c: 60 - setup_costs[c] for c in chars}
    for members in awards.values():
        for cid, earned in members.items():
            expected[cid] += rules.SCENE_AWARD_XP if earned else 0
    for r in done.values():
        if r[2] != "succeeded":
            continue
        if r[1] == "xp.spend":
            expected[r[6]["character_id"]] -= r[6]["cost"]
        elif r[1] == "xp.deny_spend":
            expected[r[6]["character_id"]] += r[6]["refunded"]
    balances = _balances(db, chars)
    assert {c: xp_ for c, (xp_, _) in balances.items()} == expected
    assert all(xp_ == ledger for xp_, ledger in balances.values())
    assert outcomes[("succeeded", None)] >= 1000


def test_the_same_award_enqueued_many_times_under_repeated_sigkill_is_given_once(
        services: Services, db: psycopg.Connection) -> None:
    # given 40 scenes of 3 characters, each award enqueued 5 times, and ledger inserts for
    # these scenes slowed to 150 ms (a trigger), so kills land inside award transactions
    # (and the awards last long enough for a dozen kills, whatever else consumes the queue)
    chars = _characters(db, 120, 0)
    cast = [chars[i:i + 3] for i in range(0, 120, 3)]
    scenes = _scenes(db, cast)
    lo, hi = min(scenes), max(scenes)
    db.execute("CREATE OR REPLACE FUNCTION test_slow_award() RETURNS trigger AS $$ BEGIN "
               f"IF NEW.scene_id BETWEEN {lo} AND {hi} THEN PERFORM pg_sleep(0.15); END IF; "
               "RETURN NEW; END $$ LANGUAGE plpgsql")
    db.execute("CREATE TRIGGER test_slow_award BEFORE INSERT ON xp_ledger FOR EACH ROW "
               "EXECUTE FUNCTION test_slow_award()")
    workers = [start_worker(services, f"kill{i}", concurrency=2) for i in range(2)]
    kills = 0
    try:
        ids = []
        for _ in range(5):
            for scene, members in zip(scenes, cast, strict=True):
                body = {"scene_id": scene, "awards": {str(m): True for m in members}}
                ids.append(str(submit("xp.award_scene", body, source="test").job["id"]))
        # when pool processes are SIGKILLed again and again while the awards run
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            unfinished = db.execute(
                "SELECT count(*) FROM job_runs WHERE id = ANY(%s::uuid[]) AND status NOT IN "
                "('succeeded', 'failed', 'dead', 'cancelled')", (ids,)).fetchone()
            if unfinished == (0,):
                break
            if kills < 12:
                kills += _kill_one_busy_child(workers, db, ids)
            time.sleep(0.7)
        done = _wait_all(db, ids, timeout=180)
    finally:
        for w in workers:
            w.stop()
        db.execute("DROP TRIGGER IF EXISTS test_slow_award ON xp_ledger")
    assert kills >= 5, "the test must really have killed workers mid-job"
    # then every job ended succeeded or xp_already_given, one success per scene
    outcomes = Counter((r[2], r[3]) for r in done.values())
    assert set(outcomes) <= {("succeeded", None), ("failed", "xp_already_given")}, outcomes
    assert outcomes[("succeeded", None)] == len(scenes)
    # and every scene's XP was given exactly once: one ledger row per participant
    rows = db.execute("SELECT scene_id, character_id, count(*) FROM xp_ledger "
                      "WHERE scene_id BETWEEN %s AND %s GROUP BY 1, 2", (lo, hi)).fetchall()
    assert sorted((s, c) for s, c, _ in rows) == sorted(
        (s, c) for s, members in zip(scenes, cast, strict=True) for c in members)
    assert all(n == 1 for _, _, n in rows)
    balances = _balances(db, [c for members in cast for c in members])
    assert all(v == (1, 1) for v in balances.values()), balances


def _kill_one_busy_child(workers: list[Proc], db: psycopg.Connection, ids: list[str]) -> int:
    """SIGKILL the pool process of a running award (job_runs.worker is <name>@<host>:<pid>):
    one of `workers`' or of any other worker of the suite's process consuming the same
    queue (the session's worker takes its share, most of it on a loaded machine)."""
    ours = {w.pid for w in workers}
    rows = db.execute("SELECT worker FROM job_runs WHERE id = ANY(%s::uuid[]) "
                      "AND status = 'running'", (ids,)).fetchall()
    for (worker,) in rows:
        pid = int(str(worker).rsplit(":", 1)[1]) if worker else 0
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(pid).parent()
            # a pool child (its parent a worker's main process), never a main process
            if parent is not None and (parent.pid in ours or _is_worker(parent)):
                os.kill(pid, signal.SIGKILL)
                return 1
    return 0


def _is_worker(proc: psutil.Process) -> bool:
    """A worker's main process (`warden worker`: python -m cli.main worker ...)."""
    cmd = proc.cmdline()
    return "worker" in cmd and ("cli.main" in cmd or any("celery" in c for c in cmd))


def test_a_redelivered_award_job_is_not_run_twice(services: Services, db: psycopg.Connection,
                                                  worker: Proc) -> None:
    # given an award job that succeeded
    chars = _characters(db, 2, 0)
    scene = _scenes(db, [chars])[0]
    body = {"scene_id": scene, "awards": {str(c): True for c in chars}}
    job = str(submit("xp.award_scene", body, idempotency_key=f"award-{uuid.uuid4()}",
                     source="test").job["id"])
    first = _wait_all(db, [job], timeout=60)[job]
    assert first[2] == "succeeded"
    # when its message is delivered again (as after a lost ack), then it does not run again
    from kombu import Connection

    from workers.app import app

    # to the test servers' broker, whatever this process's Celery app was configured with
    with Connection(services.redis_url,
                    transport_options=app.conf.broker_transport_options) as conn:
        app.send_task("xp.award_scene", kwargs={"params": body}, task_id=job, connection=conn)
    time.sleep(3)
    again = _wait_all(db, [job], timeout=60)[job]
    assert (again[2], again[4]) == ("succeeded", 1)
    assert _balances(db, chars) == {c: (1, 1) for c in chars}


def _blocked_by(db: psycopg.Connection, pid: int, timeout: float = 30) -> None:
    """Until some backend waits for a lock `pid` holds."""
    deadline = time.monotonic() + timeout
    while not db.execute("SELECT count(*) FROM pg_stat_activity "
                         "WHERE %s = ANY(pg_blocking_pids(pid))", (pid,)).fetchone()[0]:
        assert time.monotonic() < deadline, "the job never waited for the test's lock"
        time.sleep(0.05)


def test_a_deadlock_or_a_serialization_failure_is_retried_never_a_failed_job(
        services: Services, db: psycopg.Connection, worker: Proc) -> None:
    # given a scene with one participant, and a session of the test holding that
    # character's row lock (its deadlock check waits 10 s: the job's fires first)
    [cid] = _characters(db, 1, 20)
    [scene] = _scenes(db, [[cid]])
    deadlocks = _deadlocks(db)
    with psycopg.connect(services.database_url) as other:
        other.execute("SET deadlock_timeout = '10s'")
        other.execute("SELECT 1 FROM characters WHERE id = %s FOR UPDATE", (cid,))
        # when the award job locks the scene and waits for the character, and the test's
        # session then asks for the scene: a real deadlock, which Postgres breaks by
        # aborting the job's transaction
        award = str(submit("xp.award_scene", {"scene_id": scene, "awards": {str(cid): True}},
                           source="test").job["id"])
        _blocked_by(db, other.info.backend_pid)
        other.execute("SELECT 1 FROM scenes WHERE id = %s FOR UPDATE", (scene,))
        other.rollback()
    # and a spend whose insert fails once with a serialization failure (a trigger; the
    # sequence counting the tries is not rolled back)
    db.execute("CREATE SEQUENCE IF NOT EXISTS test_serial_once")
    db.execute("CREATE OR REPLACE FUNCTION test_serial_once() RETURNS trigger AS $$ BEGIN "
               f"IF NEW.character_id = {cid} AND nextval('test_serial_once') = 1 THEN "
               "RAISE EXCEPTION 'could not serialize access (injected)' USING ERRCODE = "
               "'serialization_failure'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql")
    db.execute("CREATE TRIGGER test_serial_once BEFORE INSERT ON xp_spend_requests "
               "FOR EACH ROW EXECUTE FUNCTION test_serial_once()")
    try:
        spend = str(submit("xp.spend", {"character_id": cid, "trait_name": "strength",
                                        "trait_value": 2}, source="test").job["id"])
        done = _wait_all(db, [award, spend], timeout=60)
    finally:
        db.execute("DROP TRIGGER test_serial_once ON xp_spend_requests")
        db.execute("DROP SEQUENCE test_serial_once")
    # then both jobs were retried by the core and succeeded on their second attempt
    assert [(done[j][2], done[j][3], done[j][4]) for j in (award, spend)] == [
        ("succeeded", None, 2), ("succeeded", None, 2)]
    # and Postgres counted the deadlock (a backend flushes its statistics when idle, within
    # its 10 s idle interval)
    deadline = time.monotonic() + 20
    while _deadlocks(db) == deadlocks and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _deadlocks(db) == deadlocks + 1
    # and the XP moved once each way: +1 for the scene, -4 for strength 2, all in the ledger
    assert _balances(db, [cid]) == {cid: (20 + rules.SCENE_AWARD_XP
                                          - rules.xp_cost("attribute", 2),) * 2}
