"""The job table at scale: EXPLAIN ANALYZE of the hot job_runs queries on a seeded table.

    python -m bench.job_table [--rows 10000000] [--url URL] [--repeat 5] [--keep]
                              [--reuse DBNAME] [--no-backlog] [--json PATH]

Creates a scratch database `warden_jobtable_<random>` on the server at --url (default: the
machine's PostgreSQL, postgresql://postgres@127.0.0.1:5432/postgres), migrates it to
revision 0002 only, seeds job_runs set-based (generate_series; keys and indexes dropped for
the load and rebuilt from their own definitions), runs VACUUM ANALYZE, then EXPLAIN
(ANALYZE, BUFFERS, TIMING) of every hot query: a warm-up run, then --repeat runs whose
median execution time is reported, the plan of the last run printed. Each statement that
writes runs in a transaction rolled back. Variants:

- indexed: as the platform sends it the first times on a connection (custom plan);
- prepared: as psycopg sends it from the 6th time on a connection (a prepared statement,
  after PostgreSQL's plan cache chose its generic or custom plan); generic plan: forced;
- no partial idx (relay and gauge queries): the partial indexes of 0002 dropped, in a
  transaction rolled back; "no partial, no status idx": ix_job_runs_status_created too.

Then a retry storm (50,000 retrying jobs waiting for their backoff, in a transaction rolled
back), churn (--churn jobs run through accept, publish, claim, heartbeats and success,
committed without VACUUM, measured before and after one) and an incident backlog (workers
down for an hour, Redis down for ten minutes; committed, measured before and after a
VACUUM). Each phase also measures the
proposed _UNDELIVERED (PROPOSED_UNDELIVERED and PROPOSED_INDEX below, in a transaction
rolled back). The database is dropped at the end unless --keep.

The SQL is imported from the modules that run it (workers.relay, workers.metrics,
workers.jobstore), never copied: SQL built inside a function (list_jobs, pending_count,
heartbeat, children) is captured by calling the function against a recording session. Only
the "count every job" anti-example and the proposal are written here.

docs/job-table-at-scale.md has the figures of a 10,000,000-row run and reads them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import psycopg
from psycopg import sql as psql
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg
from sqlalchemy.engine import make_url
from sqlalchemy.sql.elements import TextClause

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REVISION = "0002"
# The partial indexes of migration 0002 that the relay and the gauges stand on.
PARTIAL_INDEXES = ("ix_job_runs_unpublished", "ix_job_runs_undelivered",
                   "ix_job_runs_running_lease", "ix_job_runs_unfinished")
# What the planner falls back to without them: the full (status, created_at) index.
STATUS_INDEX = "ix_job_runs_status_created"
RELAY_ARGS = {"grace": 5.0, "lost": 60.0, "n": 500}  # :grace=5, :lost=60, :n=500 (BATCH)
TYPES = ("platform.ping", "xp.weekly_award", "xp.spend", "backups.run", "backup.verify",
         "audits.integrity", "data_migrations.spent_xp", "reports.validation",
         "notify.webhook", "scenes.close")
CHUNK = 1_000_000
# The unfinished and dead rows at 10M rows (scaled with --rows, at least `floor` each).
SEGMENTS_AT_10M = {
    "queued_in_queue": 1500,         # published, waiting in the broker's queue
    "queued_unpublished_due": 200,   # accepted while Redis was down: the outbox
    "queued_scheduled": 1000,        # countdown: published with an eta, not_before ahead
    "queued_scheduled_unpublished": 100,
    "retrying_published": 400,       # retry message sent with its countdown
    "retrying_unpublished": 60,      # the retry's publish failed: half due, half not yet
    "running_live": 300,
    "running_lapsed": 20,
    "waiting_parents": 40,           # each with 20 children: 15 succeeded, 5 queued
}
FLOOR = 5
CHILDREN_PER_PARENT, CHILDREN_PENDING = 20, 5
P_DEAD = 0.00003                      # ~300 dead among 10M finished


# -- connections ---------------------------------------------------------------------------

def libpq_url(url: str, database: str | None = None) -> str:
    u = make_url(url)
    u = u.set(drivername="postgresql")
    if database is not None:
        u = u.set(database=database)
    return u.render_as_string(hide_password=False)


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, application_name="warden-bench-job-table")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- SQL from the code ---------------------------------------------------------------------

_DIALECT = pg_psycopg.dialect()


def pyformat(stmt: TextClause | str) -> str:
    """SQLAlchemy text (`:name` binds) as psycopg sends it (`%(name)s`): the driver then binds
    server-side, as the platform's engines do."""
    clause = text(stmt) if isinstance(stmt, str) else stmt
    return str(clause.compile(dialect=_DIALECT))


class _Recorder:
    """A stand-in session/connection: records the statement a jobstore function sends."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def execute(self, stmt: Any, args: dict[str, Any] | None = None) -> _Recorder:
        self.calls.append((pyformat(stmt), dict(args or {})))
        return self

    def mappings(self) -> _Recorder:
        return self

    def all(self) -> list[Any]:
        return []

    def first(self) -> None:
        return None

    def scalar_one(self) -> int:
        return 0


def captured(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """The one statement `fn` (a workers.jobstore function) would send, and its binds."""
    from workers import jobstore

    rec = _Recorder()

    @contextlib.contextmanager
    def scope() -> Iterator[_Recorder]:
        yield rec

    with mock.patch.object(jobstore, "session_scope", scope), \
            mock.patch.object(jobstore, "autocommit", scope):
        fn(*args, **kwargs)
    assert len(rec.calls) == 1, f"{fn.__name__} sent {len(rec.calls)} statements"
    return rec.calls[0]


# -- the scratch database ------------------------------------------------------------------

def create_database(admin_url: str) -> str:
    name = f"warden_jobtable_{secrets.token_hex(4)}"
    with connect(admin_url) as conn:
        conn.execute(psql.SQL("CREATE DATABASE {}").format(psql.Identifier(name)))
    return name


def drop_database(admin_url: str, name: str) -> None:
    with connect(admin_url) as conn:
        conn.execute(psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                     .format(psql.Identifier(name)))


def migrate(db_url: str) -> None:
    from workers.migrate import upgrade

    upgrade(REVISION, url=db_url)


# -- seeding -------------------------------------------------------------------------------

COLUMNS = ("id, type, params, idempotency_key, status, attempts, max_attempts, source, "
           "created_at, updated_at, not_before, expires_at, published_at, started_at, "
           "finished_at, next_attempt_at, result, error_code, error_message, worker, "
           "manual_retries, epoch, owner, lease_expires_at, delivered_at, parent_id, "
           "children_total, children_pending, progress")
_TYPES_SQL = "ARRAY[" + ",".join(f"'{t}'" for t in TYPES) + "]"
_BOOT = "5c1e0d8e-6b1f-4f3a-9d2c-8a7b6c5d4e3f"
# `worker` is host:pid, `owner` the claim token: host:boot:pidns:pid:start:nonce.
_WORKER = "'worker-' || (g % 4) || ':' || (4000 + g % 16)"
_OWNER = (f"'worker-' || (g % 4) || ':{_BOOT}:4026531836:' || (4000 + g % 16) || ':1718000' "
          "|| ':' || lpad(to_hex(g), 12, '0')")

# The finished history: 30 days, ~10 types (skewed), 95% succeeded, 3.5% failed, 1.5%
# cancelled before they started, ~300 dead per 10M; 30% carry an idempotency key; one job
# in 2000 fanned out 10 children (finished too). Physical order follows created_at, as an
# append-mostly table's does.
BULK_SQL = f"""
WITH s AS (
    SELECT g, random() AS r1, random() AS r2, random() AS r3, random() AS r4,
           %(t0)s::timestamptz + (g::float8 / %(n)s) * interval '30 days'
             + random() * interval '1 second' AS c
    FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g
), k AS (
    SELECT s.*,
        CASE WHEN r1 < %(p_dead)s THEN 'dead' WHEN r1 < 0.95 THEN 'succeeded'
             WHEN r1 < 0.985 THEN 'failed' ELSE 'cancelled' END AS st,
        ({_TYPES_SQL})[1 + floor(power(r2, 2.5) * 10)::int] AS ty,
        CASE WHEN r3 < 0.03 THEN 2 + floor(r4 * 3)::int ELSE 1 END AS att,
        c + interval '3 ms' + power(r3, 4) * interval '30 seconds' AS st_at,
        interval '2 ms' + power(r4, 3) * interval '60 seconds' AS dur,
        g %% 2000 = 0 AS parent,
        g > 2000 AND g %% 2000 BETWEEN 1 AND 10 AS child
    FROM s
)
INSERT INTO job_runs ({COLUMNS})
SELECT md5('w' || g)::uuid, ty,
    jsonb_build_object('character_id', g %% 50000, 'week', 1 + g %% 52),
    CASE WHEN child THEN md5('w' || (g - g %% 2000))::uuid::text || ':' || (g %% 2000 - 1)
         WHEN g %% 10 < 3 THEN ty || ':' || g END,
    st,
    CASE st WHEN 'dead' THEN 5 WHEN 'cancelled' THEN 0 ELSE att END,
    5,
    CASE WHEN child THEN 'fan-out' ELSE (ARRAY['api','api','api','api','beat','beat','beat',
                                               'cli','celery','api'])[1 + g %% 10] END,
    c,
    CASE st WHEN 'cancelled' THEN c + r4 * interval '10 minutes' ELSE st_at + dur END,
    NULL,
    CASE WHEN g %% 50 = 0 THEN c + interval '1 day' END,
    c + interval '3 ms',
    CASE WHEN st = 'cancelled' THEN NULL ELSE st_at END,
    CASE st WHEN 'cancelled' THEN c + r4 * interval '10 minutes' ELSE st_at + dur END,
    NULL,
    CASE WHEN st = 'succeeded' THEN jsonb_build_object('ok', true, 'processed', g %% 1000) END,
    CASE st WHEN 'failed' THEN (ARRAY['job_error','upstream_timeout','invalid_params',
                                      'unknown_job_type'])[1 + g %% 4]
            WHEN 'dead' THEN 'worker_lost'
            WHEN 'cancelled' THEN (ARRAY['cancelled','expired'])[1 + g %% 2] END,
    CASE st WHEN 'failed' THEN 'the job raised: simulated failure #' || g %% 100
            WHEN 'dead' THEN 'attempt budget spent: the worker was lost on every attempt'
            WHEN 'cancelled' THEN 'cancelled by an operator' END,
    CASE WHEN st = 'cancelled' THEN NULL ELSE {_WORKER.replace('%', '%%')} END,
    CASE WHEN g %% 5000 = 7 THEN 1 ELSE 0 END,
    CASE st WHEN 'dead' THEN 5 WHEN 'cancelled' THEN 0 ELSE att END,
    CASE WHEN st = 'cancelled' THEN NULL ELSE {_OWNER.replace('%', '%%')} END,
    NULL,
    CASE WHEN st = 'cancelled' THEN NULL ELSE st_at END,
    CASE WHEN child THEN md5('w' || (g - g %% 2000))::uuid END,
    CASE WHEN parent THEN 10 ELSE 0 END,
    0,
    NULL
FROM k
"""


def _segment(name: str, count: int, *, status: str, created: str, published: str = "NULL",
             not_before: str = "NULL", next_attempt: str = "NULL", started: str = "NULL",
             delivered: str = "NULL", lease: str = "NULL", attempts: str = "0",
             owner: bool = False, error: str = "NULL", id_expr: str = "gen_random_uuid()",
             parent: str = "NULL", children: str = "0, 0", key: str = "NULL",
             source: str = "'api'", finished: str = "NULL", result: str = "NULL") -> str:
    """One INSERT ... SELECT FROM generate_series of unfinished rows, relative to now()."""
    who = (f"{_WORKER}, 0, {attempts}, {_OWNER}" if owner else
           f"NULL, 0, {attempts}, NULL")
    return f"""
WITH s AS (SELECT g, random() AS r1, random() AS r2, random() AS r3
           FROM generate_series(1, {count}) AS g),
k AS (SELECT s.*, {created} AS c FROM s)
INSERT INTO job_runs ({COLUMNS})
SELECT {id_expr}, ({_TYPES_SQL})[1 + floor(power(r2, 2.5) * 10)::int],
    jsonb_build_object('character_id', g % 50000, 'segment', '{name}'),
    {key}, '{status}', {attempts}, 5, {source},
    c, GREATEST(c, COALESCE({finished}, {started}, {published}, c)),
    {not_before}, NULL, {published}, {started}, {finished}, {next_attempt},
    {result}, {error}, CASE WHEN {error} IS NOT NULL THEN 'simulated transient error' END,
    {who}, {lease}, {delivered}, {parent}, {children}, NULL
FROM k
"""


def unfinished_segments(scale: float) -> list[tuple[str, str]]:
    def n(name: str) -> int:
        return max(FLOOR, round(SEGMENTS_AT_10M[name] * scale))

    ago = "now() - {} * interval '1 second'".format  # seconds-ago helper (SQL expression)
    parents = n("waiting_parents")
    segs = [
        ("queued_in_queue", _segment(
            "queued_in_queue", n("queued_in_queue"), status="queued",
            created=ago("(r1 * 120 + 0.01)"), published="c + interval '3 ms'")),
        ("queued_unpublished_due", _segment(
            "queued_unpublished_due", n("queued_unpublished_due"), status="queued",
            created=ago("(10 + r1 * 600)"))),
        ("queued_scheduled", _segment(
            "queued_scheduled", n("queued_scheduled"), status="queued",
            created=ago("(r1 * 1800)"), published="c + interval '3 ms'",
            not_before="now() + (600 + r3 * 3000) * interval '1 second'")),
        ("queued_scheduled_unpublished", _segment(
            "queued_scheduled_unpublished", n("queued_scheduled_unpublished"),
            status="queued", created=ago("(r1 * 1800)"),
            not_before="now() + (600 + r3 * 3000) * interval '1 second'")),
        ("retrying_published", _segment(
            "retrying_published", n("retrying_published"), status="retrying",
            created=ago("(600 + r1 * 1800)"), started="c + interval '50 ms'",
            published="now() - r3 * interval '60 seconds'",
            next_attempt="now() + (600 + r3 * 1200) * interval '1 second'",
            attempts="1 + floor(r2 * 4)::int", owner=True, error="'upstream_timeout'")),
        ("retrying_unpublished", _segment(
            "retrying_unpublished", n("retrying_unpublished"), status="retrying",
            created=ago("(600 + r1 * 1800)"), started="c + interval '50 ms'",
            next_attempt="now() + (CASE WHEN g % 2 = 0 THEN -1 ELSE 1 END) "
                         "* (60 + r3 * 600) * interval '1 second'",
            attempts="1 + floor(r2 * 4)::int", owner=True, error="'upstream_timeout'")),
        ("running_live", _segment(
            "running_live", n("running_live"), status="running",
            created=ago("(60 + r1 * 600)"), published="c + interval '3 ms'",
            started="c + interval '50 ms'", delivered="c + interval '50 ms'",
            # Live through the whole measurement (the platform's TTL is 15 s; the index's
            # order, lapsed first then live, is what matters).
            lease="now() + (3600 + r3 * 15) * interval '1 second'",
            attempts="1", owner=True)),
        ("running_lapsed", _segment(
            "running_lapsed", n("running_lapsed"), status="running",
            created=ago("(700 + r1 * 600)"), published="c + interval '3 ms'",
            started="c + interval '50 ms'", delivered="c + interval '50 ms'",
            lease="now() - (70 + r3 * 600) * interval '1 second'",
            attempts="1 + floor(r2 * 2)::int", owner=True)),
        ("waiting_parents", _segment(
            "waiting_parents", parents, status="waiting",
            created=ago("(1800 + r1 * 1800)"), published="c + interval '3 ms'",
            started="c + interval '50 ms'", delivered="c + interval '50 ms'",
            attempts="0", owner=True, id_expr="md5('parent' || g)::uuid",
            children=f"{CHILDREN_PER_PARENT}, {CHILDREN_PENDING}")),
        # The parents' children: the first 15 of each succeeded, the last 5 queued (published).
        ("children_succeeded", _segment(
            "children_succeeded", parents * (CHILDREN_PER_PARENT - CHILDREN_PENDING),
            status="succeeded", created=ago("(1700 + r1 * 60)"),
            published="c + interval '3 ms'", started="c + interval '1 second'",
            delivered="c + interval '1 second'", attempts="1", owner=True,
            finished="c + interval '2 seconds'", result="'{\"ok\": true}'::jsonb",
            parent=f"md5('parent' || (1 + (g - 1) % {parents}))::uuid",
            key=f"md5('parent' || (1 + (g - 1) % {parents}))::uuid::text || ':' || "
                f"((g - 1) / {parents})", source="'fan-out'")),
        ("children_queued", _segment(
            "children_queued", parents * CHILDREN_PENDING, status="queued",
            created=ago("(1700 + r1 * 60)"), published="c + interval '3 ms'",
            parent=f"md5('parent' || (1 + (g - 1) % {parents}))::uuid",
            key=f"md5('parent' || (1 + (g - 1) % {parents}))::uuid::text || ':' || "
                f"({CHILDREN_PER_PARENT - CHILDREN_PENDING} + (g - 1) / {parents})",
            source="'fan-out'")),
    ]
    return segs


def unfinished_total(scale: float) -> int:
    parents = max(FLOOR, round(SEGMENTS_AT_10M["waiting_parents"] * scale))
    rest = sum(max(FLOOR, round(v * scale)) for k, v in SEGMENTS_AT_10M.items()
               if k != "waiting_parents")
    return rest + parents * (1 + CHILDREN_PER_PARENT)


def _table_ddl(conn: psycopg.Connection[Any]) -> tuple[list[str], list[str], list[str]]:
    """(constraints to drop, indexes to drop, DDL to recreate them in order)."""
    cons = conn.execute(
        "SELECT conname, contype, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'job_runs'::regclass AND contype IN ('p', 'u', 'f') "
        "ORDER BY CASE contype WHEN 'p' THEN 0 WHEN 'u' THEN 1 ELSE 2 END").fetchall()
    inbound = conn.execute(
        "SELECT count(*) FROM pg_constraint WHERE confrelid = 'job_runs'::regclass "
        "AND conrelid <> 'job_runs'::regclass").fetchone()
    if inbound and inbound[0]:
        raise SystemExit("another table references job_runs: cannot drop its keys to seed")
    idx = conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
        "AND tablename = 'job_runs' AND indexname NOT IN (SELECT conname FROM pg_constraint "
        "WHERE conrelid = 'job_runs'::regclass) ORDER BY indexname").fetchall()
    recreate = [f'ALTER TABLE job_runs ADD CONSTRAINT "{n}" {d}' for n, t, d in cons if t != "f"]
    recreate += [d for _, d in idx]
    recreate += [f'ALTER TABLE job_runs ADD CONSTRAINT "{n}" {d}' for n, t, d in cons if t == "f"]
    drop_cons = [n for n, t, _ in sorted(cons, key=lambda c: c[1] != "f")]  # FKs first
    return drop_cons, [n for n, _ in idx], recreate


def seed(db_url: str, rows: int) -> dict[str, float]:
    """Fill job_runs with `rows` rows; returns the seconds each step took."""
    scale = rows / 10_000_000
    n_unfinished = unfinished_total(scale)
    n_bulk = rows - n_unfinished
    if n_bulk < 10_000:
        raise SystemExit(f"--rows must be at least {n_unfinished + 10_000}")
    timings: dict[str, float] = {}
    with connect(db_url) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("SET synchronous_commit = off")
        drop_cons, drop_idx, recreate = _table_ddl(conn)
        for name in drop_cons:
            conn.execute(f'ALTER TABLE job_runs DROP CONSTRAINT "{name}"')
        for name in drop_idx:
            conn.execute(f'DROP INDEX "{name}"')
        t0 = conn.execute("SELECT now() - interval '30 days' - interval '1 hour'").fetchone()
        assert t0 is not None
        started = time.monotonic()
        for lo in range(1, n_bulk + 1, CHUNK):
            hi = min(n_bulk, lo + CHUNK - 1)
            conn.execute(BULK_SQL, {"t0": t0[0], "n": n_bulk, "lo": lo, "hi": hi,
                                    "p_dead": P_DEAD})
            log(f"seeded {hi:,} / {n_bulk:,} finished rows "
                f"({time.monotonic() - started:.0f} s)")
        timings["insert_finished_s"] = time.monotonic() - started
        started = time.monotonic()
        for ddl in recreate:
            t = time.monotonic()
            conn.execute(ddl)
            log(f"{time.monotonic() - t:6.1f} s  {ddl[:110]}")
        timings["build_indexes_s"] = time.monotonic() - started
        started = time.monotonic()
        conn.execute("VACUUM (ANALYZE) job_runs")
        timings["vacuum_analyze_s"] = time.monotonic() - started
        log(f"vacuum analyze: {timings['vacuum_analyze_s']:.0f} s")
        # The unfinished rows last, relative to now(), through the live indexes (as the
        # platform writes them), then a second VACUUM ANALYZE (it only visits new pages).
        started = time.monotonic()
        for _name, stmt in unfinished_segments(scale):
            conn.execute(stmt)
        conn.execute("VACUUM (ANALYZE) job_runs")
        timings["insert_unfinished_s"] = time.monotonic() - started
        log(f"unfinished rows: {n_unfinished:,} in {timings['insert_unfinished_s']:.0f} s")
    return timings


BACKLOG_SQL = [
    # Workers down for an hour: 200,000 published, undelivered jobs in the queue.
    ("queued_backlog_published", 200_000, _segment(
        "queued_backlog_published", 200_000, status="queued",
        created=("now() - interval '1 minute' - (g::float8 / 200000) * interval '1 hour'"),
        published="c + interval '3 ms'")),
    # Redis down for ten minutes: 50,000 accepted, never published.
    ("queued_backlog_unpublished", 50_000, _segment(
        "queued_backlog_unpublished", 50_000, status="queued",
        created="now() - interval '30 seconds' - (g::float8 / 50000) * interval '10 minutes'")),
    # 20,000 jobs accepted with a countdown 40-60 minutes ago, due in the next 20 minutes.
    ("queued_backlog_scheduled", 20_000, _segment(
        "queued_backlog_scheduled", 20_000, status="queued",
        created="now() - interval '40 minutes' - r1 * interval '20 minutes'",
        published="c + interval '3 ms'",
        not_before="now() + interval '5 minutes' + r3 * interval '15 minutes'")),
]


# -- measuring -----------------------------------------------------------------------------

@dataclass
class Query:
    name: str
    sql: str                    # psycopg pyformat
    args: dict[str, Any]
    source: str                 # where the SQL lives
    expect: str                 # the index it should use
    group: str                  # relay, gauge, claim, list, extra, anti
    dml: bool = False


@dataclass
class Result:
    name: str
    variant: str
    runs_ms: list[float]
    planning_ms: float
    rows: int | None
    indexes: list[str]
    plan: str
    hot: str | None = None
    error: str | None = None
    plan_kind: str | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms) if self.runs_ms else float("nan")


_EXEC = re.compile(r"Execution Time: ([\d.]+) ms")
_PLAN = re.compile(r"Planning Time: ([\d.]+) ms")
_TOP_ROWS = re.compile(r"actual time=[\d.]+\.\.[\d.]+ rows=(\d+)")
_INDEX = re.compile(r"(?:Index Only Scan|Index Scan|Bitmap Index Scan)(?: Backward)?"
                    r"(?: using| on) (\w+)")


def _explain_once(conn: psycopg.Connection[Any], q: Query, prefix: Sequence[str],
                  mode: str) -> tuple[float, float, str, str | None]:
    """One EXPLAIN ANALYZE in a transaction (a savepoint inside one) rolled back.

    mode "custom": sent as the platform sends it the first times (psycopg binds server-side:
    planned with the values); "prepared": as psycopg sends it from the 6th execution on a
    connection (prepare_threshold 5), after 6 executions, so PostgreSQL's plan cache has
    chosen between its generic and custom plans; "generic": plan_cache_mode =
    force_generic_plan (what the plan cache may pick)."""
    hot = None
    counts = ("SELECT pg_stat_get_xact_tuples_updated('job_runs'::regclass), "
              "pg_stat_get_xact_tuples_hot_updated('job_runs'::regclass)")
    with conn.transaction(force_rollback=True):
        for stmt in prefix:
            conn.execute(stmt)
        if mode == "custom":
            before = conn.execute(counts).fetchone() if q.dml else None
            plan_rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS, TIMING) " + q.sql,
                                     q.args).fetchall()
        else:
            conn.execute("DEALLOCATE ALL")  # prepared statements outlive a rollback
            if mode == "generic":
                conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            dollar, values = _to_dollar(q.sql, q.args)
            conn.execute(f"PREPARE bench_q AS {dollar}")
            args = psql.SQL(", ").join(psql.Literal(v) for v in values)
            execute = (psql.SQL("EXECUTE bench_q({})").format(args) if values
                       else psql.SQL("EXECUTE bench_q"))
            if mode == "prepared":
                for _ in range(6):
                    with conn.transaction(force_rollback=True):
                        conn.execute(execute)
            before = conn.execute(counts).fetchone() if q.dml else None
            plan_rows = conn.execute(
                psql.SQL("EXPLAIN (ANALYZE, BUFFERS, TIMING) {}").format(execute)).fetchall()
            conn.execute("DEALLOCATE bench_q")
        if q.dml:  # this backend's not yet flushed counters: the statement's own delta
            after = conn.execute(counts).fetchone()
            if before is not None and after is not None:
                hot = f"{after[1] - before[1]} of {after[0] - before[0]} row updates HOT"
    plan = "\n".join(r[0] for r in plan_rows)
    ex, pl = _EXEC.search(plan), _PLAN.search(plan)
    return (float(ex.group(1)) if ex else float("nan"),
            float(pl.group(1)) if pl else float("nan"), plan, hot)


def _to_dollar(pysql: str, args: dict[str, Any]) -> tuple[str, list[Any]]:
    """%(name)s binds as $n (for PREPARE), in order of first appearance."""
    order: list[str] = []

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in order:
            order.append(m.group(1))
        return f"${order.index(m.group(1)) + 1}"

    out = re.sub(r"%\((\w+)\)s", sub, pysql).replace("%%", "%")
    return out, [args[k] for k in order]


def measure(conn: psycopg.Connection[Any], q: Query, repeat: int, *, variant: str = "indexed",
            prefix: Sequence[str] = (), mode: str = "custom", warm: bool = True) -> Result:
    runs: list[float] = []
    planning: list[float] = []
    plan, hot = "", None
    try:
        if warm and not q.dml:  # one untimed run first: the median is of a warm cache
            _explain_once(conn, q, prefix, mode)
        for _ in range(repeat):
            ex, pl, plan, hot = _explain_once(conn, q, prefix, mode)
            runs.append(ex)
            planning.append(pl)
    except psycopg.Error as exc:
        return Result(q.name, variant, [], float("nan"), None, [], "",
                      error=f"{type(exc).__name__}: {exc}".splitlines()[0])
    top = _TOP_ROWS.search(plan)
    kind = None
    if mode != "custom":
        kind = "generic plan" if re.search(r"\$\d", plan) else "custom plan"
    return Result(q.name, variant, runs, statistics.median(planning),
                  int(top.group(1)) if top else None,
                  sorted(set(_INDEX.findall(plan))), plan, hot, plan_kind=kind)


def queries(conn: psycopg.Connection[Any]) -> list[Query]:
    """Every hot query, its SQL taken from the module that runs it."""
    from workers import jobstore, metrics, relay

    def one(sql_: str, args: Sequence[Any] = ()) -> Any:
        row = conn.execute(sql_, args).fetchone()
        if row is None:
            raise SystemExit(f"the seed has no row for: {sql_}")
        return row

    queued = one("SELECT id, type FROM job_runs WHERE status = 'queued' AND delivered_at IS NULL "
                 "AND published_at IS NOT NULL AND not_before IS NULL "
                 "AND parent_id IS NULL LIMIT 1")
    running = conn.execute(
        "SELECT id, epoch, type FROM job_runs WHERE status = 'running' "
        "AND lease_expires_at > now() ORDER BY lease_expires_at LIMIT 8").fetchall()
    if not running:
        raise SystemExit("the seed has no running job")
    parent = one("SELECT id FROM job_runs WHERE status = 'waiting' LIMIT 1")
    # A cursor half-way down the history (page N of a newest-first listing).
    mid = one("SELECT created_at, id FROM job_runs WHERE created_at < "
              "(SELECT min(created_at) + (max(created_at) - min(created_at)) / 2 FROM job_runs) "
              "ORDER BY created_at DESC, id DESC LIMIT 1")
    rare_type = TYPES[-1]
    owner = "bench-host:boot:ns:1:1:000000000001"
    claim_args: dict[str, Any] = {"id": queued[0], "o": owner, "w": "bench-host:1", "ttl": 15.0,
                  "t": queued[1]}
    run_id, run_epoch, run_type = running[0]
    page = 51  # the API asks for limit + 1 rows

    hb_sql, hb_args = captured(jobstore.heartbeat, [(str(r[0]), int(r[1])) for r in running])
    pending_sql, pending_args = captured(jobstore.pending_count)

    def lj(**kw: Any) -> tuple[str, dict[str, Any]]:
        return captured(jobstore.list_jobs, limit=page, **kw)

    out = [
        Query("relay _UNPUBLISHED", pyformat(relay._UNPUBLISHED), dict(RELAY_ARGS),
              "workers/relay.py", "ix_job_runs_unpublished", "relay"),
        Query("relay _UNDELIVERED", pyformat(relay._UNDELIVERED), dict(RELAY_ARGS),
              "workers/relay.py", "ix_job_runs_undelivered", "relay"),
        Query("relay _LAPSED", pyformat(relay._LAPSED), dict(RELAY_ARGS),
              "workers/relay.py", "ix_job_runs_running_lease", "relay"),
        Query("gauge JOBS_BY_STATUS", pyformat(metrics.JOBS_BY_STATUS), {},
              "workers/metrics.py", "ix_job_runs_unfinished", "gauge"),
        Query("gauge pending_count()", pending_sql, pending_args,
              "workers/jobstore.py", "ix_job_runs_unpublished", "gauge"),
        Query("claim _CLAIM (queued id)", pyformat(jobstore._CLAIM), claim_args,
              "workers/jobstore.py", "pk_job_runs", "claim", dml=True),
        Query("claim _CLAIM_SINGLETON (queued id, type busy)", pyformat(jobstore._CLAIM_SINGLETON),
              {**claim_args, "t": run_type}, "workers/jobstore.py",
              "pk_job_runs + ix_job_runs_running_lease or ix_job_runs_unfinished", "claim",
              dml=True),
        Query("fence FENCE_SQL (id, epoch)", pyformat(jobstore.FENCE_SQL),
              {"id": run_id, "e": run_epoch, "ttl": 15.0}, "workers/jobstore.py",
              "pk_job_runs", "claim", dml=True),
        Query(f"heartbeat() ({len(running)} jobs)", hb_sql, hb_args, "workers/jobstore.py",
              "pk_job_runs", "claim", dml=True),
        Query("SUCCEED_SQL (id, epoch)", pyformat(jobstore.SUCCEED_SQL),
              {"id": run_id, "e": run_epoch, "r": '{"ok": true}'}, "workers/jobstore.py",
              "pk_job_runs", "claim", dml=True),
    ]
    listings: list[tuple[str, dict[str, Any], str]] = [
        ("list_jobs() newest first", {}, "ix_job_runs_created_id"),
        ("list_jobs(status='failed')", {"status": "failed"},
         "ix_job_runs_status_created or ix_job_runs_created_id"),
        ("list_jobs(status='queued')", {"status": "queued"}, "ix_job_runs_status_created"),
        ("list_jobs(status='dead')", {"status": "dead"}, "ix_job_runs_status_created"),
        (f"list_jobs(type='{rare_type}')", {"job_type": rare_type}, "ix_job_runs_type_created"),
        ("list_jobs(before=mid)", {"before": (mid[0], mid[1])}, "ix_job_runs_created_id"),
        ("list_jobs(status='failed', before=mid)", {"status": "failed",
                                                    "before": (mid[0], mid[1])},
         "ix_job_runs_created_id or ix_job_runs_status_created"),
        ("list_jobs(parent_id=waiting parent)", {"parent_id": parent[0]}, "ix_job_runs_parent"),
    ]
    for label, kw, expect in listings:
        s, a = lj(**kw)
        out.append(Query(label, s, a, "workers/jobstore.py", expect, "list"))
    ch_sql, ch_args = captured(jobstore.children, parent[0])
    out.append(Query("children(parent)", ch_sql, ch_args, "workers/jobstore.py",
                     "ix_job_runs_parent", "extra"))
    # The anti-example: what the gauge did before it was restricted to the watched statuses.
    out.append(Query("ANTI count(*) of every job by status, type",
                     "SELECT status, type, count(*) AS n FROM job_runs GROUP BY 1, 2", {},
                     "(written here: the former gauge)", "none possible: reads every row",
                     "anti"))
    return out


# -- report --------------------------------------------------------------------------------

def machine(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "kernel": platform.release(),
                            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    with contextlib.suppress(OSError):
        cpu = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.+)", cpu)
        info["cpu"] = m.group(1).strip() if m else None
    with contextlib.suppress(OSError):
        m = re.search(r"MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text())
        info["mem_gib"] = round(int(m.group(1)) / 2**20, 1) if m else None
    info["server"] = conn.execute("SELECT version()").fetchone()[0]  # type: ignore[index]
    for guc in ("shared_buffers", "work_mem", "effective_cache_size", "random_page_cost",
                "max_parallel_workers_per_gather", "jit", "default_statistics_target"):
        info[guc] = conn.execute(f"SHOW {guc}").fetchone()[0]  # type: ignore[index]
    repo = Path(__file__).resolve().parents[1]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=True,
                                     cwd=repo, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "workers/relay.py", "workers/metrics.py",
             "workers/jobstore.py", "workers/migrations/versions/0002_job_ownership.py"],
            check=True, cwd=repo, capture_output=True, text=True).stdout.split("\n")
        info["uncommitted_sql_sources"] = [ln[3:] for ln in dirty if ln.strip()]
    return info


def table_facts(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    facts["rows_by_status"] = dict(conn.execute(
        "SELECT status, count(*) FROM job_runs GROUP BY 1 ORDER BY 2 DESC").fetchall())
    facts["rows"] = sum(facts["rows_by_status"].values())
    facts["heap_mib"] = round(conn.execute(  # type: ignore[index]
        "SELECT pg_table_size('job_runs')").fetchone()[0] / 2**20)
    facts["index_kib"] = {n: s // 1024 for n, s in conn.execute(
        "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index "
        "WHERE indrelid = 'job_runs'::regclass ORDER BY 2 DESC").fetchall()}
    return facts


def print_result(q: Query, r: Result) -> None:
    print(f"\n### {q.name} [{r.variant}]  ({q.source}; expected: {q.expect})")
    if r.error:
        print(f"ERROR: {r.error}")
        return
    runs = ", ".join(f"{x:.3f}" for x in r.runs_ms)
    print(f"median execution {r.median_ms:.3f} ms (runs: {runs}); planning {r.planning_ms:.3f} "
          f"ms; rows {r.rows}; indexes used: {', '.join(r.indexes) or 'none'}"
          + (f"; {r.hot}" if r.hot else "") + (f"; {r.plan_kind}" if r.plan_kind else ""))
    print(r.plan)


def summary(results: list[tuple[Query, dict[str, Result]]], variants: Sequence[str]) -> str:
    shown = [v for v in variants if any(v in by for _, by in results)]
    head = "| query | expected index | used | rows | " + " | ".join(
        f"{v} ms" for v in shown) + " |"
    lines = [head, "|" + "---|" * (4 + len(shown))]
    for q, by in results:
        base = by.get("indexed") or next(iter(by.values()))
        used = ", ".join(base.indexes) if base.indexes else "seq scan"
        cells = []
        for v in shown:
            r = by.get(v)
            if r is None:
                cells.append("")
            elif r.error:
                cells.append("err")
            else:
                kind = " (generic)" if r.plan_kind == "generic plan" else ""
                cells.append(f"{r.median_ms:.3f}{kind}")
        lines.append(f"| {q.name} | {q.expect} | {used} | {base.rows} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


# A proposal, not the code: the undelivered candidates by the later of their publication
# and their due time, so the not-yet-due (countdown, retry backoff) are outside the range
# scan instead of filtered on every pass. Same rows as _UNDELIVERED: GREATEST(p, due) < t
# holds exactly when p < t and due < t.
_DUE = "GREATEST(published_at, COALESCE(next_attempt_at, not_before, '-infinity'))"
PROPOSED_INDEX = (
    f"CREATE INDEX ix_job_runs_undelivered_due ON job_runs (({_DUE})) "
    "WHERE delivered_at IS NULL AND published_at IS NOT NULL "
    "AND status IN ('queued','retrying')")
PROPOSED_UNDELIVERED = (
    "SELECT id, type, params, published_at FROM job_runs "
    "WHERE status IN ('queued', 'retrying') AND delivered_at IS NULL "
    f"AND published_at IS NOT NULL AND {_DUE} < now() - make_interval(secs => %(lost)s) "
    f"ORDER BY {_DUE} LIMIT %(n)s")

# A retry storm: an upstream down for 10 minutes; 50,000 jobs retrying with backoff, their
# retry messages sent (published) 1-10 minutes ago, due in the next 1-20 minutes.
STORM_ROWS = 50_000
STORM_SQL = _segment(
    "retry_storm", STORM_ROWS, status="retrying",
    created="now() - (1800 + r1 * 1800) * interval '1 second'",
    started="c + interval '50 ms'",
    published="now() - (61 + r3 * 540) * interval '1 second'",
    next_attempt="now() + (60 + r1 * 1140) * interval '1 second'",
    attempts="1 + floor(r2 * 4)::int", owner=True, error="'upstream_timeout'")

# Churn: jobs flowing through their whole life (accept, publish mark, claim, two
# heartbeats, success) in batches, set-based, committed, no VACUUM in between: each step is
# a non-HOT update (see the HOT column), so every step leaves a dead row version and dead
# entries in the indexes. At 10M rows autovacuum's default thresholds (20% of the table)
# would not run during it.
CHURN_BATCH = 2000
CHURN_STEPS = [
    ("accept",
     "WITH ins AS (INSERT INTO job_runs (id, type, params, max_attempts, source) "
     f"SELECT gen_random_uuid(), ({_TYPES_SQL})[1 + floor(power(random(), 2.5) * 10)::int], "
     "jsonb_build_object('segment', 'churn'), 5, 'api' FROM generate_series(1, "
     f"{CHURN_BATCH}) RETURNING id) INSERT INTO churn_ids SELECT id FROM ins"),
    ("published", "UPDATE job_runs SET published_at = now() "
                  "WHERE id IN (SELECT id FROM churn_ids) AND published_at IS NULL"),
    ("claim", "UPDATE job_runs SET status = 'running', attempts = 1, epoch = epoch + 1, "
              "owner = 'bench:churn:' || id, worker = 'bench:1', started_at = now(), "
              "delivered_at = now(), lease_expires_at = now() + interval '15 seconds' "
              "WHERE id IN (SELECT id FROM churn_ids)"),
    ("heartbeat", "UPDATE job_runs SET lease_expires_at = now() + interval '15 seconds' "
                  "WHERE id IN (SELECT id FROM churn_ids) AND status = 'running'"),
    ("heartbeat", "UPDATE job_runs SET lease_expires_at = now() + interval '15 seconds' "
                  "WHERE id IN (SELECT id FROM churn_ids) AND status = 'running'"),
    ("succeed", "UPDATE job_runs SET status = 'succeeded', result = '{\"ok\": true}', "
                "finished_at = now(), lease_expires_at = NULL "
                "WHERE id IN (SELECT id FROM churn_ids) AND status = 'running'"),
]


def churn(conn: psycopg.Connection[Any], jobs: int) -> float:
    """Run `jobs` jobs through their life cycle; returns the seconds it took."""
    started = time.monotonic()
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS churn_ids (id uuid PRIMARY KEY)")
    for _ in range(max(1, jobs // CHURN_BATCH)):
        conn.execute("TRUNCATE churn_ids")
        for _step, stmt in CHURN_STEPS:
            conn.execute(stmt)
    conn.execute("DROP TABLE churn_ids")
    return time.monotonic() - started


def index_sizes(conn: psycopg.Connection[Any]) -> dict[str, int]:
    return {n: s // 1024 for n, s in conn.execute(
        "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index "
        "WHERE indrelid = 'job_runs'::regclass AND indexrelid::regclass::text = ANY(%s)",
        [list(PARTIAL_INDEXES)]).fetchall()}


VARIANTS = ["indexed", "prepared", "generic plan", "no partial idx",
            "no partial, no status idx", "after VACUUM"]


def run_phase(conn: psycopg.Connection[Any], qs: Sequence[Query], repeat: int,
              repeat_dropped: int, phase: str, *, prepared: bool = True,
              dropped: bool = True) -> list[tuple[Query, dict[str, Result]]]:
    out: list[tuple[Query, dict[str, Result]]] = []
    drop = [f'DROP INDEX "{i}"' for i in PARTIAL_INDEXES]
    for q in qs:
        by: dict[str, Result] = {}
        log(f"[{phase}] {q.name}")
        by["indexed"] = measure(conn, q, repeat)
        if prepared and q.args:
            by["prepared"] = measure(conn, q, repeat, variant="prepared", mode="prepared")
            by["generic plan"] = measure(conn, q, repeat, variant="generic plan",
                                         mode="generic")
        if dropped and q.group in ("relay", "gauge"):
            by["no partial idx"] = measure(conn, q, repeat_dropped, warm=False,
                                           variant="no partial idx", prefix=drop)
            by["no partial, no status idx"] = measure(
                conn, q, repeat_dropped, warm=False, variant="no partial, no status idx",
                prefix=[*drop, f'DROP INDEX "{STATUS_INDEX}"'])
        for r in by.values():
            print_result(q, r)
        out.append((q, by))
    return out


def proposed(conn: psycopg.Connection[Any], repeat: int, phase: str
             ) -> tuple[Query, dict[str, Result]]:
    """The proposed _UNDELIVERED with its index in place of ix_job_runs_undelivered (only
    _UNDELIVERED reads it), built in a transaction rolled back."""
    q = Query("PROPOSED _UNDELIVERED by due time", PROPOSED_UNDELIVERED, dict(RELAY_ARGS),
              "(proposal, bench/job_table.py)", "ix_job_runs_undelivered_due", "proposal")
    log(f"[{phase}] {q.name}: building its index")
    with conn.transaction(force_rollback=True):
        conn.execute('DROP INDEX "ix_job_runs_undelivered"')
        conn.execute(PROPOSED_INDEX)
        conn.execute("ANALYZE job_runs")  # statistics of the index expression
        by = {"indexed": measure(conn, q, repeat),
              "prepared": measure(conn, q, repeat, variant="prepared", mode="prepared")}
    for r in by.values():
        print_result(q, r)
    return q, by


def _dump(results: list[tuple[Query, dict[str, Result]]]) -> list[dict[str, Any]]:
    return [{"query": asdict(q), "results": {k: {**asdict(r), "median_ms": r.median_ms}
                                             for k, r in by.items()}} for q, by in results]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.job_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--url", default=DEFAULT_URL, help="a server URL (any database on it)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per query (median)")
    p.add_argument("--repeat-dropped", type=int, default=3,
                   help="timed runs per query with the indexes dropped")
    p.add_argument("--keep", action="store_true", help="keep the scratch database")
    p.add_argument("--reuse", metavar="DBNAME",
                   help="measure an already seeded database (its steady state drifts with "
                        "time: reseed for figures to publish)")
    p.add_argument("--no-backlog", action="store_true",
                   help="skip the retry-storm, churn and incident-backlog phases")
    p.add_argument("--churn", type=int, default=100_000,
                   help="jobs run through their life cycle in the churn phase")
    p.add_argument("--json", metavar="PATH", help="also write every figure and plan as JSON")
    a = p.parse_args(argv)

    admin = libpq_url(a.url)
    name = a.reuse or create_database(admin)
    db_url = libpq_url(a.url, name)
    report: dict[str, Any] = {"database": name, "argv": sys.argv[1:]}
    started = time.monotonic()
    tables: list[tuple[str, str]] = []
    try:
        if not a.reuse:
            log(f"database {name}: migrating to {REVISION}")
            t = time.monotonic()
            migrate(db_url)
            log(f"migrated in {time.monotonic() - t:.1f} s; seeding {a.rows:,} rows")
            t = time.monotonic()
            report["seed_timings_s"] = {k: round(v, 1) for k, v in seed(db_url, a.rows).items()}
            report["seed_total_s"] = round(time.monotonic() - t, 1)
        with connect(db_url) as conn:
            report["machine"] = machine(conn)
            report["table"] = table_facts(conn)
            print("# warden job table at scale: bench/job_table.py")
            print("# machine: " + json.dumps(report["machine"]))
            print("# table: " + json.dumps(report["table"]))
            if "seed_timings_s" in report:
                print(f"# seed: {report['seed_total_s']} s "
                      f"{json.dumps(report['seed_timings_s'])}")
            qs = queries(conn)
            hot = [q for q in qs if q.group in ("relay", "gauge")]
            undelivered = [q for q in qs if q.name == "relay _UNDELIVERED"]
            gauge = [q for q in qs if q.group == "gauge"]

            print("\n## Phase: steady state")
            steady = run_phase(conn, qs, a.repeat, a.repeat_dropped, "steady")
            steady.append(proposed(conn, a.repeat, "steady"))
            report["steady"] = _dump(steady)
            tables.append((f"Steady state, {report['table']['rows']:,} rows", summary(
                steady, VARIANTS)))

            if not a.no_backlog:
                print(f"\n## Phase: retry storm (+{STORM_ROWS:,} retrying rows, rolled back)")
                with conn.transaction(force_rollback=True):
                    conn.execute(STORM_SQL)
                    conn.execute("ANALYZE job_runs")
                    storm = run_phase(conn, [*undelivered, *gauge], a.repeat,
                                      a.repeat_dropped, "storm", dropped=False)
                    storm.append(proposed(conn, a.repeat, "storm"))
                t = time.monotonic()  # the rolled-back rows left dead versions behind
                conn.execute("VACUUM job_runs")
                log(f"vacuum after the storm: {time.monotonic() - t:.0f} s")
                report["storm"] = _dump(storm)
                tables.append((f"Retry storm: +{STORM_ROWS:,} retrying rows, retry messages "
                               "sent 1-10 min ago, due in 1-20 min", summary(storm, VARIANTS)))

                print(f"\n## Phase: churn ({a.churn:,} jobs through their life, no VACUUM)")
                before_sizes = index_sizes(conn)
                secs = churn(conn, a.churn)
                conn.execute("ANALYZE job_runs")
                sizes = index_sizes(conn)
                log(f"churn of {a.churn:,} jobs in {secs:.0f} s; partial index KiB "
                    f"{before_sizes} -> {sizes}")
                churned = run_phase(conn, hot, a.repeat, a.repeat_dropped, "churn",
                                    prepared=False, dropped=False)
                t = time.monotonic()
                conn.execute("VACUUM job_runs")
                log(f"vacuum after the churn: {time.monotonic() - t:.0f} s")
                for q, by in churned:
                    r = measure(conn, q, a.repeat, variant="after VACUUM")
                    by["after VACUUM"] = r
                    print_result(q, r)
                report["churn"] = {"jobs": a.churn, "seconds": round(secs, 1),
                                   "partial_index_kib_before": before_sizes,
                                   "partial_index_kib_after": sizes,
                                   "results": _dump(churned)}
                print(f"# churn: {a.churn:,} jobs in {secs:.0f} s; partial index KiB "
                      f"before {json.dumps(before_sizes)}, after {json.dumps(sizes)}")
                tables.append((f"Churn: {a.churn:,} jobs through accept, publish, claim, 2 "
                               "heartbeats, success, committed without VACUUM (partial index "
                               f"KiB {json.dumps(sizes)}, were {json.dumps(before_sizes)})",
                               summary(churned, VARIANTS)))

                print("\n## Phase: incident backlog")
                t = time.monotonic()
                for _, _, stmt in BACKLOG_SQL:
                    conn.execute(stmt)
                conn.execute("ANALYZE job_runs")  # no VACUUM yet: an incident's pages are new
                log(f"backlog of {sum(n for _, n, _ in BACKLOG_SQL):,} rows in "
                    f"{time.monotonic() - t:.0f} s")
                report["backlog_rows"] = {n: c for n, c, _ in BACKLOG_SQL}
                backlog = run_phase(conn, hot, a.repeat, a.repeat_dropped, "backlog")
                backlog.append(proposed(conn, a.repeat, "backlog"))
                t = time.monotonic()
                conn.execute("VACUUM job_runs")  # what autovacuum would do, if it ran
                log(f"vacuum after the backlog: {time.monotonic() - t:.0f} s")
                for q, by in backlog:
                    if q in hot:
                        r = measure(conn, q, a.repeat, variant="after VACUUM")
                        by["after VACUUM"] = r
                        print_result(q, r)
                report["backlog"] = _dump(backlog)
                tables.append(("Incident backlog: " + ", ".join(
                    f"+{c:,} {n}" for n, c, _ in BACKLOG_SQL), summary(backlog, VARIANTS)))

        print(f"\n## Summary (median of {a.repeat} runs, {a.repeat_dropped} with indexes "
              "dropped; ms of server execution time)")
        for title, table in tables:
            print(f"\n### {title}\n\n{table}")
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"\n# done in {time.monotonic() - started:.0f} s; load average at the end: {load}")
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1, default=str))
    finally:
        if a.keep or a.reuse:
            log(f"kept database {name} ({db_url})")
        else:
            drop_database(admin, name)
            log(f"dropped database {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
