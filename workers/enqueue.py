"""The one way a job enters the system: row first, publish after commit, relay for the rest.

Every producer (API, CLI, beat, a parent job's fan-out) goes through `prepare` and an
insert. The job_runs row commits before anything is sent, so an accepted job survives a
Redis outage; `workers.relay.Relay` publishes what stayed unpublished.
"""

from __future__ import annotations

import atexit
import json
import queue
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from pydantic import BaseModel
from sqlalchemy import text

from workers import deployment, jobstore
from workers.celery_app import app, job_types
from workers.db import autocommit, session_scope
from workers.errors import JobError
from workers.metrics import JOBS_SUBMITTED
from workers.settings import get_settings

log = structlog.get_logger("warden.enqueue")

MAX_COUNTDOWN = 3600  # below the visibility timeout, or Redis would redeliver while it waits
PUBLISH_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


class UnknownJobType(LookupError):
    """The type names no registered job."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown job type {name!r}; known types: {', '.join(known)}")
        self.name = name
        self.known = known


class UnstorableParams(ValueError):
    """Params valid for the model but not storable as JSON in Postgres (NaN, NUL)."""


class InvalidCountdown(ValueError):
    """A countdown outside 0..MAX_COUNTDOWN seconds."""


class IdempotencyConflict(ValueError):
    """The key was already used for a different job (another type or other params)."""


class ReservedKey(IdempotencyConflict):
    """The key has the shape of a fan-out child's (`<parent job id>:<n>`): reserved, so no
    producer can take a child's key before its parent fans out (review N8)."""


# A fan-out child's idempotency key: its parent's id and its position.
CHILD_KEY = re.compile(r"^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}:\d+$")
# The keys Warden's own producers make (a backup's verify, an audit fix's awards, beat's
# slots, a migration's retries, a report's alert): a client taking one first would make the
# producer's insert a no-op, and its job never exist (adversarial review of issue 14).
RESERVED_KEY_PREFIXES = ("backup-verify:", "audit-fix-", "beat:", "migration.retry:",
                         "report.deliver_alert:")


class FanOutKeyTaken(JobError):
    """A child's key is held by a job that is not this parent's child (made before the key
    shape was reserved): the parent fails visibly instead of waiting for ever."""

    code = "fan_out_key_taken"


@dataclass(frozen=True)
class Submitted:
    job: Mapping[Any, Any]
    created: bool
    published: bool


def validate(job_type: str, params: dict[str, Any] | None) -> BaseModel:
    """Params as the type's model; raises UnknownJobType or pydantic.ValidationError."""
    types = job_types()
    task = types.get(job_type)
    if task is None:
        raise UnknownJobType(job_type, sorted(types))
    model: BaseModel = task.params.model_validate(params or {})
    return model


@dataclass(frozen=True)
class Prepared:
    """A validated job, ready to insert: the part of a submit that needs no I/O."""

    job_type: str
    clean: dict[str, Any]
    idempotency_key: str | None
    not_before: datetime | None
    source: str
    row_params: dict[str, Any]


# psycopg placeholders, so the same SQL serves the sync pool and the API's async connections.
INSERT_JOB = (
    "INSERT INTO job_runs (id, type, params, idempotency_key, max_attempts, source, "
    "not_before, expires_at) "
    "VALUES (%(id)s, %(t)s, %(p)s::jsonb, %(k)s, %(m)s, %(src)s, %(nb)s, %(ex)s) "
    f"ON CONFLICT (idempotency_key) DO NOTHING RETURNING {jobstore.JOB_COLUMNS}"
)
SELECT_BY_KEY = f"SELECT {jobstore.JOB_COLUMNS} FROM job_runs WHERE idempotency_key = %(k)s"


def prepare(
    job_type: str,
    params: dict[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    countdown: float | None = None,
    expires: float | None = None,
    source: str = "api",
    client_key: bool = False,
) -> Prepared:
    """Validate params and build the row; raises UnknownJobType, ValidationError or
    UnstorableParams (all the client's to fix). `client_key`: the key comes from a client
    (API, `warden enqueue --key`), which may not take a key Warden's own producers use."""
    if idempotency_key is not None and source != "fan-out" and CHILD_KEY.match(idempotency_key):
        raise ReservedKey(f"idempotency key {idempotency_key!r} has the shape <job id>:<n>, "
                          "reserved for the children of a fanned-out job")
    if client_key and idempotency_key is not None and idempotency_key.startswith(
            RESERVED_KEY_PREFIXES):
        raise ReservedKey(f"idempotency key {idempotency_key!r} is reserved for Warden's own "
                          f"jobs (keys starting with {', '.join(RESERVED_KEY_PREFIXES)})")
    if countdown is not None and not 0 <= countdown <= MAX_COUNTDOWN:
        raise InvalidCountdown(f"countdown must be between 0 and {MAX_COUNTDOWN} seconds")
    model = validate(job_type, params)
    clean = model.model_dump(mode="json")
    try:
        encoded = json.dumps(clean, allow_nan=False)
    except ValueError as exc:
        raise UnstorableParams("params may not contain NaN or Infinity") from exc
    if "\\u0000" in encoded:
        raise UnstorableParams("params may not contain NUL characters (\\u0000)")
    task = job_types()[job_type]
    now = datetime.now(UTC)
    not_before = now + timedelta(seconds=countdown) if countdown else None
    row_params = {
        "id": uuid.uuid4(), "t": job_type, "p": encoded, "k": idempotency_key,
        "m": task.max_attempts or get_settings().max_attempts, "src": source, "nb": not_before,
        "ex": now + timedelta(seconds=expires) if expires else None,
    }
    return Prepared(job_type, clean, idempotency_key, not_before, source, row_params)


def existing_job(prepared: Prepared, existing: Mapping[Any, Any]) -> Submitted:
    """The job an earlier request made with this key, if it asked for the same thing."""
    if existing["type"] != prepared.job_type or existing["params"] != prepared.clean:
        raise IdempotencyConflict(
            f"idempotency key {prepared.idempotency_key!r} was used for another job "
            f"({existing['type']} {existing['id']})"
        )
    JOBS_SUBMITTED.labels(prepared.job_type, "deduplicated").inc()
    return Submitted(existing, created=False, published=True)


def after_insert(prepared: Prepared, row: Mapping[Any, Any], *,
                 background: bool = False) -> Submitted:
    """The row is committed: publish (or leave it to the relay), count, log. `background`
    hands the publish to the publisher thread (the API's event loop never waits on Redis)."""
    JOBS_SUBMITTED.labels(prepared.job_type, "created").inc()
    if background:
        published = publisher.submit(row["id"], prepared.job_type, prepared.clean,
                                     prepared.not_before)
    else:
        published = publish(row["id"], prepared.job_type, prepared.clean, prepared.not_before)
    log.info("job.accepted", job_id=str(row["id"]), job_type=prepared.job_type,
             idempotency_key=prepared.idempotency_key, source=prepared.source,
             published=published)
    return Submitted(row, created=True, published=published)


def submit(
    job_type: str,
    params: dict[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    countdown: float | None = None,
    expires: float | None = None,
    source: str = "api",
    client_key: bool = False,
) -> Submitted:
    """Validate, insert the job (or find the one with this key), commit, then publish."""
    prepared = prepare(job_type, params, idempotency_key=idempotency_key, countdown=countdown,
                       expires=expires, source=source, client_key=client_key)
    # Autocommit: the INSERT commits on its own, durably, before the 202 and the publish.
    with autocommit() as conn:
        row = conn.exec_driver_sql(INSERT_JOB, prepared.row_params).mappings().first()
        if row is None:
            found = conn.exec_driver_sql(SELECT_BY_KEY, {"k": idempotency_key}).mappings().one()
            return existing_job(prepared, found)
    return after_insert(prepared, row)


def submit_in(session: Any, job_type: str, params: dict[str, Any] | None = None, *,
              idempotency_key: str | None = None, source: str = "job") -> Prepared:
    """Insert a job in the caller's transaction (a job that queues follow-up work commits it
    with its own effect and outcome). Nothing is sent: publish it after the commit with
    `publish_prepared`, or leave it to the relay (its row is unpublished). A key already
    used makes this a no-op (ON CONFLICT), so a repeated run does not queue it twice."""
    prepared = prepare(job_type, params, idempotency_key=idempotency_key, source=source)
    conn = session.connection()
    if conn.exec_driver_sql(INSERT_JOB, prepared.row_params).first() is None:
        # The key is taken: by this same job (a repeated run: fine, nothing to do), or by
        # another one, which would leave the caller recording a job that does not exist.
        found = conn.exec_driver_sql(SELECT_BY_KEY, {"k": idempotency_key}).mappings().one()
        existing_job(prepared, found)  # raises IdempotencyConflict if it is another job
        prepared.row_params["id"] = found["id"]
    return prepared


def publish_prepared(prepared: Prepared) -> bool:
    """Send a job inserted with `submit_in`, once its transaction committed."""
    return publish(prepared.row_params["id"], prepared.job_type, prepared.clean,
                   prepared.not_before)


async def submit_async(prepared: Prepared, conn: Any) -> Submitted:
    """`submit` for the API's event loop: the insert on an async psycopg connection (no
    thread hop), the publish handed to the publisher thread."""
    async with conn.cursor() as cur:
        await cur.execute(INSERT_JOB, prepared.row_params)
        row = await cur.fetchone()
        if row is None:
            await cur.execute(SELECT_BY_KEY, {"k": prepared.idempotency_key})
            return existing_job(prepared, await cur.fetchone())
    return after_insert(prepared, row, background=True)


class _Breaker:
    """After a failed publish, accept-path publishes are skipped for a few seconds: a
    request must not wait out connect timeouts while Redis is down; the relay (which
    always tries) publishes those jobs once the broker is back."""

    OPEN_SECONDS = 5.0

    def __init__(self) -> None:
        self.open_until = 0.0

    def is_open(self) -> bool:
        return time.monotonic() < self.open_until

    def trip(self) -> None:
        self.open_until = time.monotonic() + self.OPEN_SECONDS


_breaker = _Breaker()


def publish(job_id: uuid.UUID | str, job_type: str, params: dict[str, Any],
            eta: datetime | None = None, *, countdown: float | None = None,
            force: bool = False) -> bool:
    """Send the job's message; False (logged) when the broker is unreachable."""
    if _breaker.is_open() and not force:
        return False
    try:
        app.send_task(
            job_type,
            kwargs={"params": params},
            task_id=str(job_id),
            eta=eta if eta and eta > datetime.now(UTC) else None,
            countdown=countdown if countdown and countdown > 0 else None,
            retry=True,
            retry_policy=PUBLISH_POLICY,
            headers=deployment.stamp(),
        )
    except Exception as exc:  # any broker failure: the relay will publish it later
        _breaker.trip()
        log.warning("job.publish_failed", job_id=str(job_id), error=f"{type(exc).__name__}: {exc}")
        return False
    _marker.mark(uuid.UUID(str(job_id)))
    return True


def publish_many(jobs: Iterable[tuple[uuid.UUID, str, dict[str, Any]]]) -> list[uuid.UUID]:
    """Send several messages over one producer connection (the relay's batches); returns
    the ids sent before the first failure. The caller marks them published."""
    sent: list[uuid.UUID] = []
    try:
        headers = deployment.stamp()
        with app.producer_or_acquire() as producer:
            for job_id, job_type, params in jobs:
                app.send_task(job_type, kwargs={"params": params if isinstance(params, dict)
                                                else {}},
                              task_id=str(job_id), producer=producer, retry=True,
                              retry_policy=PUBLISH_POLICY, headers=headers)
                sent.append(job_id)
    except Exception as exc:  # broker down: the rest waits for the next pass
        log.warning("relay.publish_failed", sent=len(sent), error=f"{type(exc).__name__}: {exc}")
    return sent


class Publisher:
    """Publishes from a background thread, so the API's event loop never waits on Redis.

    Why: a Redis that hangs (a partition, a paused server) instead of refusing would stall
    every route for its socket timeout. The row is committed before it gets here; if this
    process dies with messages still queued, or the send fails, the relay publishes them
    (published_at stays NULL).
    """

    MAX_QUEUED = 10_000

    def __init__(self) -> None:
        self._q: queue.Queue[tuple[uuid.UUID, str, dict[str, Any], datetime | None]] = (
            queue.Queue(self.MAX_QUEUED))
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job_id: uuid.UUID, job_type: str, params: dict[str, Any],
               eta: datetime | None = None) -> bool:
        """Hand over; False when the backlog is full or the breaker is open (the relay will
        publish it)."""
        if _breaker.is_open():
            return False
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._loop, name="publisher",
                                                    daemon=True)
                    self._thread.start()
        try:
            self._q.put_nowait((job_id, job_type, params, eta))
        except queue.Full:
            return False
        return True

    def _loop(self) -> None:
        while True:
            job_id, job_type, params, eta = self._q.get()
            if not publish(job_id, job_type, params, eta):
                # Broker down: drop what is queued; the relay has every one of those rows.
                while True:
                    try:
                        self._q.get_nowait()
                    except queue.Empty:
                        break


publisher = Publisher()


class PublishedMarker:
    """Sets published_at in batches from a background thread.

    Why: it keeps the accept path at one transaction and one publish. If the process dies
    before a flush, the relay publishes those jobs again; a duplicate message is harmless
    (the job lease and the claim make the second delivery a no-op).
    """

    def __init__(self, interval: float = 0.2) -> None:
        self._q: queue.SimpleQueue[uuid.UUID] = queue.SimpleQueue()
        self._interval = interval
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def mark(self, job_id: uuid.UUID) -> None:
        self._q.put(job_id)
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._loop, name="publish-marker",
                                                    daemon=True)
                    self._thread.start()
                    atexit.register(self.flush)

    def _loop(self) -> None:
        while True:
            time.sleep(self._interval)
            self.flush()

    def flush(self) -> None:
        ids: list[uuid.UUID] = []
        while True:
            try:
                ids.append(self._q.get_nowait())
            except queue.Empty:
                break
        if not ids:
            return
        try:
            with session_scope() as s:
                s.execute(
                    text("UPDATE job_runs SET published_at=now() "
                         "WHERE id = ANY(:ids) AND published_at IS NULL"),
                    {"ids": ids},
                )
        except Exception as exc:  # the relay re-publishes; duplicates are harmless
            log.warning("job.mark_published_failed", count=len(ids), error=str(exc))


_marker = PublishedMarker()


def fan_out_children(parent_id: str, epoch: int,
                     specs: Sequence[tuple[str, dict[str, Any]]]) -> list[uuid.UUID] | None:
    """Insert a parent's children and put the parent in `waiting`, in one transaction
    fenced by the parent's epoch (None when the parent run lost its job: nothing
    inserted); then publish them. Keys `<parent>:<n>` make a repeated fan-out a no-op."""
    prepared = [prepare(t, p, idempotency_key=f"{parent_id}:{n}", source="fan-out")
                for n, (t, p) in enumerate(specs)]
    with session_scope() as s:
        parked = s.execute(
            text("UPDATE job_runs SET status='waiting', children_total=:n, children_pending=:n, "
                 "attempts=attempts-1, lease_expires_at=NULL "
                 "WHERE id=:id AND epoch=:e AND status='running' RETURNING 1"),
            {"id": uuid.UUID(parent_id), "e": epoch, "n": len(prepared)},
        ).first()
        if parked is None:
            s.rollback()
            return None
        conn = s.connection()
        inserted = sum(
            conn.exec_driver_sql(INSERT_CHILD, {**p.row_params, "parent": uuid.UUID(parent_id)}
                                 ).rowcount for p in prepared)
        if inserted != len(prepared):
            # Counted children that do not exist would leave the parent waiting for ever.
            s.rollback()
            raise FanOutKeyTaken(f"{len(prepared) - inserted} of {len(prepared)} child keys "
                                 f"({parent_id}:<n>) belong to jobs that are not its children")
    for p in prepared:
        publish(p.row_params["id"], p.job_type, p.clean)
    return [p.row_params["id"] for p in prepared]


INSERT_CHILD = (
    "INSERT INTO job_runs (id, type, params, idempotency_key, max_attempts, source, "
    "not_before, expires_at, parent_id) "
    "VALUES (%(id)s, %(t)s, %(p)s::jsonb, %(k)s, %(m)s, %(src)s, %(nb)s, %(ex)s, %(parent)s) "
    "ON CONFLICT (idempotency_key) DO NOTHING"
)
