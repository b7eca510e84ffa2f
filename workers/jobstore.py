"""SQL on job_runs: ownership (claim, heartbeat, fence) and every state change of a job.

Ownership lives here (ADR 0007). A claim is one conditional UPDATE that gives the job an
owner token, a lease expiry and a new epoch; the owner heartbeats the lease; every outcome
write is conditional on that epoch, so a run that lost the job (its lease lapsed and
another run claimed it) can change nothing. Outcome writes are single statements retried on
a fresh connection (`with_retry`): a stale pooled connection after a database restart costs
a reconnect, never a second run of the effect.

Kept apart from the Celery base class so the API, the relay and the CLI share it, and so the
hot path (claim, finish) is plain SQL with no ORM overhead: it is what the ping bench measures.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy.exc
import structlog
from sqlalchemy import text
from sqlalchemy.engine import Connection, RowMapping

from workers import identity
from workers.db import autocommit, get_engine, session_scope
from workers.models import FINAL_STATUSES
from workers.settings import get_settings

log = structlog.get_logger("warden.jobstore")

JOB_COLUMNS = (
    "id, type, params, idempotency_key, status, attempts, max_attempts, source, created_at, "
    "updated_at, not_before, expires_at, published_at, started_at, finished_at, "
    "next_attempt_at, result, error_code, error_message, worker, manual_retries, epoch, "
    "lease_expires_at, delivered_at, parent_id, children_total, children_pending, progress"
)

# Errors after which a single statement may simply be sent again on a fresh connection:
# the connection died (restart, terminated backend, network), the pool was exhausted, or
# the statement lost a deadlock. Every statement sent through `with_retry` is idempotent
# (conditional on the epoch or on the owner token).
RETRYABLE_DB_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
)

T = TypeVar("T")


def with_retry(fn: Callable[[], T], what: str, budget: float | None = None) -> T:
    """Run `fn` (one idempotent statement), again after a connection error, for up to
    `budget` seconds (WARDEN_OUTCOME_RETRY_SECONDS); SQLAlchemy invalidates the dead
    connection, so each try gets a fresh one."""
    budget = get_settings().outcome_retry_seconds if budget is None else budget
    deadline = time.monotonic() + budget
    delay = 0.05
    while True:
        try:
            return fn()
        except RETRYABLE_DB_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("db.retrying", what=what, delay=round(delay, 2),
                        error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _uuid(job_id: str | uuid.UUID) -> uuid.UUID:
    return job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))


@dataclass(frozen=True)
class Claim:
    """What the worker should do with a delivery.

    action: run (this run owns the job: `epoch`), done (already succeeded: `result`),
    final (failed/dead/cancelled/expired), waiting (a parent waiting for its children),
    busy (another live run owns it), singleton_busy (another job of the type runs),
    dead (the attempt budget was spent by lost workers), early (not due yet: `due_in`),
    foreign (no row, and adoption is not allowed: another database's message).
    """

    action: str
    attempts: int = 0
    max_attempts: int = 0
    epoch: int = 0
    result: Any = None
    status: str | None = None
    idempotency_key: str | None = None
    due_in: float = 0.0


# A job not started before expires_at is cancelled instead of run. A job that started
# (orphaned and reclaimed, a retry, a parent back to add up its children) is never
# cancelled by it: its work is under way, and a beat entry's next slot would not finish it.
_EXPIRED = ("(started_at IS NULL AND status <> 'running' AND expires_at IS NOT NULL "
            "AND expires_at < now())")
# A takeover of a lapsed run from an owner that could not be proven dead (another host, a
# database outage that stopped its heartbeats) does not spend the job's last attempt: the
# owner may well be healthy. It is counted in `lapses` instead; past this many, the job is
# dead (a job that kills every worker it lands on must still end).
MAX_LAPSES = 3
_CLAIM_SET = (
    "UPDATE job_runs SET "
    f"status = CASE WHEN {_EXPIRED} THEN 'cancelled' ELSE 'running' END, "
    f"attempts = attempts + CASE WHEN {_EXPIRED} OR owner IS NOT DISTINCT FROM :o THEN 0 "
    "  WHEN status = 'running' AND attempts >= max_attempts THEN 0 ELSE 1 END, "
    "lapses = lapses + CASE WHEN status = 'running' AND owner IS DISTINCT FROM :o "
    "  AND attempts >= max_attempts THEN 1 ELSE 0 END, "
    "epoch = epoch + CASE WHEN owner IS NOT DISTINCT FROM :o THEN 0 ELSE 1 END, "
    f"lease_expires_at = CASE WHEN {_EXPIRED} THEN NULL "
    "ELSE now() + make_interval(secs => :ttl) END, "
    f"started_at = CASE WHEN {_EXPIRED} THEN started_at ELSE now() END, "
    f"finished_at = CASE WHEN {_EXPIRED} THEN now() END, "
    f"error_code = CASE WHEN {_EXPIRED} THEN 'expired' ELSE error_code END, "
    f"error_message = CASE WHEN {_EXPIRED} THEN 'not started before expires_at' "
    "ELSE error_message END, "
    "owner = :o, worker = :w, next_attempt_at = NULL, delivered_at = now(), "
    "published_at = COALESCE(published_at, now()) "
)
# A lease that lapsed this long ago (WARDEN_RELAY_LOST_AFTER) belongs to an owner that is
# gone or cut off for good; a shorter lapse may be a database outage its owner rides out
# (its heartbeat resumes), so only an owner proven dead (same kernel, pid gone: `_TAKEOVER`)
# is taken over sooner.
_LAPSED_LONG = ("COALESCE(lease_expires_at, '-infinity') "
                "< now() - make_interval(secs => :lost)")
# Claimable: queued or retrying within the budget; running and already ours (a retried
# claim whose answer was lost); running whose lease lapsed long ago (see _LAPSED_LONG).
_CLAIMABLE = (
    "((status IN ('queued', 'retrying') AND attempts < max_attempts "
    # A copy of the message that arrives before the job is due (a requeue, a restore) does
    # not run it early: the backoff holds, and no attempt is spent.
    "  AND COALESCE(next_attempt_at, not_before, '-infinity') <= now() + interval '1 second') "
    " OR (status = 'running' AND owner = :o) "
    f" OR (status = 'running' AND {_LAPSED_LONG} "
    "     AND (attempts < max_attempts OR lapses < :max_lapses)))"
)
_RETURNING = "RETURNING status, attempts, max_attempts, epoch, idempotency_key"
_CLAIM = text(f"{_CLAIM_SET} WHERE id = :id AND {_CLAIMABLE} {_RETURNING}")
# Any running job of the type blocks the claim: one whose lease lapsed is either fenced
# just before (its owner is proven dead or lapsed long ago) or may still be alive.
_CLAIM_SINGLETON = text(
    f"{_CLAIM_SET} WHERE id = :id AND {_CLAIMABLE} AND NOT EXISTS ("
    "  SELECT 1 FROM job_runs o WHERE o.type = :t AND o.status = 'running' AND o.id <> :id) "
    f"{_RETURNING}"
)
# Under the type's advisory lock, before a singleton's claim: the running jobs of the type
# whose lease lapsed. Those whose owner is proven dead or lapsed long ago are fenced off
# (new epoch, not running), so a stalled holder that resumes can commit nothing while the
# next job of the type runs; the relay sends it again (unpublished, due now).
_LAPSED_SINGLETONS = text(
    "SELECT id, epoch, owner, attempts, max_attempts, lapses, "
    f"{_LAPSED_LONG} AS lapsed_long FROM job_runs "
    "WHERE type = :t AND status = 'running' AND id <> :id "
    "AND COALESCE(lease_expires_at, '-infinity') <= now() FOR UPDATE"
)
_FENCE_SINGLETON = text(
    "UPDATE job_runs SET status = 'retrying', epoch = epoch + 1, lease_expires_at = NULL, "
    "attempts = attempts - :spare, lapses = lapses + :spare, "
    "next_attempt_at = now(), published_at = NULL, delivered_at = NULL, "
    "error_code = 'lease_lapsed', error_message = 'its lease lapsed while another job of "
    "the singleton type was due' "
    "WHERE id = :fid AND epoch = :fe AND status = 'running'"
)
# A takeover of a job whose owner provably died on this kernel (SIGKILL, OOM): its lease
# may not have lapsed yet, but nobody is left to heartbeat it.
_TAKEOVER = text(
    f"{_CLAIM_SET} WHERE id = :id AND status = 'running' AND epoch = :seen "
    f"AND attempts < max_attempts {_RETURNING}"
)


def claim(
    job_id: str,
    job_type: str,
    params: Any,
    owner: str,
    worker: str,
    default_max_attempts: int,
    *,
    singleton: bool = False,
    adopt: bool = True,
) -> Claim:
    """Claim the job for this run, or say why not (see Claim.action). `adopt`: a message
    with no row may be given one (a bare `celery call`); else it is `foreign`."""
    jid = _uuid(job_id)
    settings = get_settings()
    args = {"id": jid, "o": owner, "w": worker, "ttl": settings.lease_ttl, "t": job_type,
            "lost": settings.relay_lost_after, "max_lapses": MAX_LAPSES}
    for _ in range(2):  # a second round only for a singleton just given a queued row
        row = with_retry(lambda: _claim_once(args, singleton), "claim")
        if row is not None:
            if row.status == "cancelled":
                return Claim("final", row.attempts, row.max_attempts, row.epoch,
                             status="cancelled")
            return Claim("run", row.attempts, row.max_attempts, row.epoch,
                         idempotency_key=row.idempotency_key)
        found = with_retry(
            lambda: _not_claimed(jid, job_type, params, args, default_max_attempts, singleton,
                                 adopt),
            "claim-inspect",
        )
        if found.action != "adopted":
            return found
    return Claim("busy")


def _claim_once(args: dict[str, Any], singleton: bool) -> Any:
    if not singleton:
        with autocommit() as conn:
            return conn.execute(_CLAIM, args).first()
    # Singletons: the type's advisory lock serializes their claims, and the NOT EXISTS runs
    # in a statement that starts after the lock is held, so it sees every committed claim.
    with get_engine().begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
                     {"k": f"warden:singleton:{args['t']}"})
        for held in conn.execute(_LAPSED_SINGLETONS, args).all():
            proven = identity.holder_is_dead(held.owner)
            if not (proven or held.lapsed_long):
                continue  # its owner may be riding out an outage: the claim waits
            # Not proven dead on its last attempt: the attempt is given back (see MAX_LAPSES).
            spare = int(not proven and held.attempts >= held.max_attempts
                        and held.lapses < MAX_LAPSES)
            conn.execute(_FENCE_SINGLETON, {"fid": held.id, "fe": held.epoch, "spare": spare})
        return conn.execute(_CLAIM_SINGLETON, args).first()


_INSPECT = text(
    "SELECT status, attempts, max_attempts, epoch, owner, result, lapses, "
    "COALESCE(lease_expires_at, '-infinity') > now() AS lease_live, "
    f"{_LAPSED_LONG} AS lapsed_long, "
    # NULL when neither is set: before PostgreSQL 17, '-infinity' - now() is an error.
    "EXTRACT(EPOCH FROM COALESCE(next_attempt_at, not_before) - now()) AS due_in "
    "FROM job_runs WHERE id = :id"
)
_MARK_DEAD = text(
    "UPDATE job_runs SET status='dead', finished_at=now(), error_code='worker_lost', "
    "lease_expires_at=NULL, error_message=:m WHERE id=:id AND epoch=:e AND status=:st"
)


def _not_claimed(jid: uuid.UUID, job_type: str, params: Any, args: dict[str, Any],
                 default_max_attempts: int, singleton: bool, adopt: bool) -> Claim:
    with session_scope() as s:
        cur = s.execute(_INSPECT, {**args, "id": jid}).first()
        if cur is None:
            if not adopt:
                return Claim("foreign")
            return _adopt(s, jid, job_type, params, args, default_max_attempts, singleton)

        def claim_as(action: str, status: str | None = None, due_in: float = 0.0) -> Claim:
            return Claim(action, cur.attempts, cur.max_attempts, cur.epoch,
                         status=status or cur.status, due_in=due_in)

        def dead(message: str) -> Claim:
            # Guarded by the state seen: never over a final status or another run's claim.
            s.execute(_MARK_DEAD, {"id": jid, "e": cur.epoch, "st": cur.status, "m": message})
            return claim_as("dead", "dead")

        if cur.status == "running" and cur.owner == args["o"]:
            # Our own takeover or adoption committed and its answer was lost: it is ours.
            return claim_as("run")
        if cur.status == "succeeded":
            return Claim("done", cur.attempts, cur.max_attempts, cur.epoch, cur.result,
                         cur.status)
        if cur.status in FINAL_STATUSES or cur.status == "waiting":
            return claim_as("final" if cur.status != "waiting" else "waiting")
        if cur.status == "running":
            if identity.holder_is_dead(cur.owner):
                if cur.attempts >= cur.max_attempts:
                    return dead("attempt budget spent: the worker was lost on every attempt")
                row = s.execute(_TAKEOVER, {**args, "seen": cur.epoch}).first()
                if row is not None:
                    log.info("job.taken_over", previous_owner=cur.owner)
                    return Claim("run", row.attempts, row.max_attempts, row.epoch,
                                 idempotency_key=row.idempotency_key)
            elif cur.lapsed_long and cur.attempts >= cur.max_attempts \
                    and cur.lapses >= MAX_LAPSES:
                return dead(f"its lease lapsed {cur.lapses + 1} times on its last attempt "
                            "and no owner was left to finish it")
            # A live run, or one whose lease lapsed not long ago (its owner may be riding
            # out a database outage): if it is gone, the relay sends the job again later.
            return claim_as("busy")
        # queued or retrying, not claimed
        if cur.attempts >= cur.max_attempts:
            # The budget was spent by lost workers (a poison pill).
            return dead("attempt budget spent: the worker was lost on every attempt")
        if cur.due_in is not None and cur.due_in > 1:
            return claim_as("early", due_in=float(cur.due_in))
        if singleton:
            return claim_as("singleton_busy")
        # Due by this statement's clock but not by the claim's (each has its own now()):
        # a hair early. Sent again for its due time, never acked as if someone had it.
        return claim_as("early", due_in=max(float(cur.due_in or 0.0), 0.5))


def _adopt(s: Any, jid: uuid.UUID, job_type: str, params: Any, args: dict[str, Any],
           default_max_attempts: int, singleton: bool = False) -> Claim:
    """A message sent past the enqueue path (`celery call`): give it a row. Params that are
    not a JSON object cannot be this job's params: the job is recorded failed, never run. A
    singleton type's row is adopted `queued` and then claimed like any other (`adopted`),
    so the type's one-at-a-time guard holds for it too."""
    valid = isinstance(params, dict)
    stored = params if valid else {"_raw": params}
    status, code, message = ("running", None, None) if valid else (
        "failed", "invalid_params", "params must be a JSON object (send kwargs={'params': {...}})")
    if valid and singleton:
        s.execute(
            text("INSERT INTO job_runs (id, type, params, max_attempts, source, published_at) "
                 "VALUES (:id, :t, CAST(:p AS jsonb), :m, 'celery', now()) "
                 "ON CONFLICT (id) DO NOTHING"),
            {**args, "p": json.dumps(stored, default=str), "m": default_max_attempts})
        return Claim("adopted")
    row = s.execute(
        text("INSERT INTO job_runs (id, type, params, status, attempts, max_attempts, source, "
             "started_at, published_at, delivered_at, worker, owner, epoch, lease_expires_at, "
             "error_code, error_message, finished_at) VALUES (:id, :t, CAST(:p AS jsonb), "
             "CAST(:st AS varchar), 1, :m, 'celery', now(), now(), now(), :w, :o, 1, "
             "now() + make_interval(secs => :ttl), :c, :msg, "
             "CASE WHEN CAST(:st AS varchar) = 'failed' THEN now() END) "
             "ON CONFLICT (id) DO NOTHING "
             "RETURNING epoch"),
        {**args, "p": json.dumps(stored, default=str), "m": default_max_attempts, "st": status,
         "c": code, "msg": message},
    ).first()
    if row is None:  # another delivery adopted it first
        return Claim("busy")
    if not valid:
        return Claim("final", 1, default_max_attempts, 1, status="failed")
    return Claim("run", 1, default_max_attempts, 1)


# -- outcomes: conditional on the epoch ----------------------------------------------------

SUCCEED_SQL = text(
    "UPDATE job_runs SET status='succeeded', result=CAST(:r AS jsonb), finished_at=now(), "
    "error_code=NULL, error_message=NULL, lease_expires_at=NULL "
    "WHERE id=:id AND epoch=:e AND status='running'"
)


def encode_result(result: Any) -> str:
    """The result as stored JSON; ValueError (NaN, not JSON-able) is the task's bug."""
    return json.dumps(result, default=str, allow_nan=False)


def succeed(job_id: str, epoch: int, result: Any) -> bool:
    """Record the result. False when this run no longer owns the job (nothing changed)."""
    args = {"id": _uuid(job_id), "e": epoch, "r": encode_result(result)}

    def once() -> bool:
        with autocommit() as conn:
            return conn.execute(SUCCEED_SQL, args).rowcount == 1

    return with_retry(once, "succeed") or recorded(job_id, epoch, "succeeded")


def finish(job_id: str, epoch: int, status: str, code: str, message: str,
           retry_in: float | None = None) -> bool:
    """Record an error outcome: failed/dead (final) or retrying, due `retry_in` seconds
    from now by the database's clock (the relay compares with the same clock). A retry is
    unpublished until its message is sent (the relay sends it when due if the worker
    could not). False when this run no longer owns the job."""
    args = {"id": _uuid(job_id), "e": epoch, "st": status, "c": code[:100],
            "m": message[:4000], "d": retry_in or 0.0}

    def once() -> bool:
        with autocommit() as conn:
            return conn.execute(
                text("UPDATE job_runs SET status=CAST(:st AS varchar), error_code=:c, "
                     "error_message=:m, lease_expires_at=NULL, "
                     "next_attempt_at=CASE WHEN CAST(:st AS varchar)='retrying' "
                     "  THEN now() + make_interval(secs => :d) END, "
                     "published_at=CASE WHEN CAST(:st AS varchar)='retrying' "
                     "  THEN NULL ELSE published_at END, "
                     "delivered_at=CASE WHEN CAST(:st AS varchar)='retrying' "
                     "  THEN NULL ELSE delivered_at END, "
                     "finished_at=CASE WHEN CAST(:st AS varchar)='retrying' THEN NULL "
                     "  ELSE now() END "
                     "WHERE id=:id AND epoch=:e AND status='running'"), args,
            ).rowcount == 1

    return with_retry(once, f"record-{status}") or recorded(job_id, epoch, status)


def recorded(job_id: str, epoch: int, status: str) -> bool:
    """Whether this epoch's outcome `status` is what the row holds: after an outcome write
    whose answer was lost, tells "it committed" from "another run owns the job"."""
    def once() -> bool:
        with autocommit() as conn:
            row = conn.execute(text("SELECT status, epoch FROM job_runs WHERE id=:id"),
                               {"id": _uuid(job_id)}).first()
        return row is not None and row.status == status and row.epoch == epoch

    return with_retry(once, "read-back")


# clock_timestamp(), not now(): in the family's transaction now() is when the transaction
# BEGAN, so a step longer than the lease would commit a lease already in the past and hand
# a healthy run's job to the relay; and never shorten the heartbeat's lease.
FENCE_SQL = text(
    "UPDATE job_runs SET lease_expires_at = GREATEST(lease_expires_at, "
    "clock_timestamp() + make_interval(secs => :ttl)) "
    "WHERE id=:id AND epoch=:e AND status='running'"
)


def fence(conn: Connection | Any, job_id: str, epoch: int) -> bool:
    """In the caller's transaction, as its last statement: True while this epoch owns the
    job. Its row lock holds off any claim until the transaction ends, so the effects of
    this transaction commit only if the run still owns the job at COMMIT."""
    result = conn.execute(FENCE_SQL, {"id": _uuid(job_id), "e": epoch,
                                      "ttl": get_settings().lease_ttl})
    return bool(result.rowcount == 1)


def heartbeat(owned: Iterable[tuple[str, int]]) -> set[str]:
    """Extend the leases of the jobs this process runs; returns the ids still owned."""
    pairs = list(owned)
    if not pairs:
        return set()
    with autocommit() as conn:
        rows = conn.execute(
            text("UPDATE job_runs j SET lease_expires_at = now() + make_interval(secs => :ttl) "
                 "FROM unnest(CAST(:ids AS uuid[]), CAST(:epochs AS bigint[])) AS h(id, epoch) "
                 "WHERE j.id = h.id AND j.epoch = h.epoch AND j.status = 'running' "
                 "RETURNING j.id"),
            {"ids": [_uuid(i) for i, _ in pairs], "epochs": [e for _, e in pairs],
             "ttl": get_settings().lease_ttl},
        ).all()
    return {str(r.id) for r in rows}


def save_progress(job_id: str, epoch: int, progress: dict[str, Any]) -> bool:
    """A long job's progress (fenced); False when the run no longer owns the job."""
    with autocommit() as conn:
        return conn.execute(
            text("UPDATE job_runs SET progress = CAST(:p AS jsonb) "
                 "WHERE id=:id AND epoch=:e AND status='running'"),
            {"id": _uuid(job_id), "e": epoch, "p": json.dumps(progress, default=str)},
        ).rowcount == 1


def defer(job_id: str, seconds: float) -> None:
    """Look at a queued or retrying job again in `seconds` (a singleton that must wait),
    without spending an attempt; unpublished until its delayed message is sent."""
    def once() -> None:
        with autocommit() as conn:
            conn.execute(
                text("UPDATE job_runs SET next_attempt_at = now() + make_interval(secs => :d), "
                     "published_at = NULL, delivered_at = NULL "
                     "WHERE id=:id AND status IN ('queued', 'retrying')"),
                {"id": _uuid(job_id), "d": seconds},
            )

    with_retry(once, "defer")


def fail_unknown_type(job_id: str, job_type: str, worker: str) -> str:
    """A worker received a type it does not know. In a rolling deploy a newer worker may
    know it: a job younger than WARDEN_UNKNOWN_TYPE_GRACE is sent again later (deferred,
    unpublished: the relay sends it). Past that (a removed type), it ends failed with
    `unknown_job_type`, retryable by an operator once a worker knows it; so does a run of
    the type whose lease lapsed that long ago (left `running`, it would be re-sent for
    ever). Each write is conditional on the state and epoch seen, so a healthy run by a
    worker that knows the type is never touched. Returns deferred, failed or left."""
    settings = get_settings()
    args = {"id": _uuid(job_id), "g": settings.unknown_type_grace,
            "lost": settings.relay_lost_after,
            "m": f"worker {worker} does not know the job type {job_type!r}"}

    def once() -> str:
        with session_scope() as s:
            cur = s.execute(text(
                "SELECT status, epoch, created_at > now() - make_interval(secs => :g) AS young, "
                f"{_LAPSED_LONG} AND lease_expires_at < now() - make_interval(secs => :g) "
                "AS lapsed_past_grace FROM job_runs WHERE id = :id"), args).first()
            if cur is None:
                return "left"
            guard = {**args, "e": cur.epoch, "st": cur.status}
            if cur.status in ("queued", "retrying") and cur.young:
                s.execute(text(
                    "UPDATE job_runs SET next_attempt_at = now() + make_interval(secs => "
                    "LEAST(30, GREATEST(:g / 4, 1))), published_at = NULL, delivered_at = NULL "
                    "WHERE id=:id AND epoch=:e AND status=:st"), guard)
                return "deferred"
            if cur.status in ("queued", "retrying") or (cur.status == "running"
                                                         and cur.lapsed_past_grace):
                done = s.execute(text(
                    "UPDATE job_runs SET status='failed', finished_at=now(), "
                    "error_code='unknown_job_type', error_message=:m, lease_expires_at=NULL "
                    "WHERE id=:id AND epoch=:e AND status=:st RETURNING 1"), guard).first()
                return "failed" if done is not None else "left"
            return "left"

    return with_retry(once, "unknown-type")


def give_back(job_id: str, epoch: int) -> bool:
    """A run its worker's shutdown terminated (Ctrl-C, a cold stop after the soft shutdown's
    10 s): the job goes back to `queued` with the attempt it spent refunded, and a new epoch
    fences anything the stopped run might still try. Its message is requeued by Celery
    (reject on worker lost); the relay sends it again if that copy is lost. A shutdown is the
    operator's doing, not the job's: it must not bring a job closer to `dead` (drill D11)."""
    def once() -> bool:
        with autocommit() as conn:
            return conn.execute(
                text("UPDATE job_runs SET status='queued', attempts=GREATEST(attempts - 1, 0), "
                     "epoch=epoch + 1, owner=NULL, lease_expires_at=NULL, delivered_at=NULL, "
                     "next_attempt_at=NULL WHERE id=:id AND epoch=:e AND status='running'"),
                {"id": _uuid(job_id), "e": epoch},
            ).rowcount == 1

    return with_retry(once, "give_back")


def record_revoked(job_id: str, *, terminated: bool) -> bool:
    """Celery revoked the job (Flower, `celery control revoke`): a job not started is
    cancelled. A run that was terminated is failed (an operator may retry it) once its
    owner is provably dead, conditional on the epoch seen: a revoke that reached this
    worker never ends a run another worker holds. A job that already ended keeps its
    outcome."""
    if terminated:
        return fail_if_owner_dead(job_id, "revoked", "revoked with Celery control (Flower): "
                                  "its run was terminated")

    def once() -> bool:
        with autocommit() as conn:
            return conn.execute(
                text("UPDATE job_runs SET finished_at=now(), lease_expires_at=NULL, "
                     "status='cancelled', error_code='revoked', error_message='revoked with "
                     "Celery control (Flower)' WHERE id=:id AND status IN ('queued', "
                     "'retrying')"),
                {"id": _uuid(job_id)},
            ).rowcount == 1

    return with_retry(once, "revoked")


def fail_if_owner_dead(job_id: str, code: str, message: str, wait: float = 5.0) -> bool:
    """From a worker's main process after it killed a pool child (hard time limit): record
    the outcome only once the owner is provably dead, conditional on the epoch seen. A
    database error (a restart) is tried again until `wait` runs out: unrecorded, the job
    would be sent again by the relay and run to its hard limit once more."""
    deadline = time.monotonic() + wait
    while True:
        try:
            recorded = _fail_if_owner_dead_once(job_id, code, message)
        except RETRYABLE_DB_ERRORS as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("db.retrying", what="record-time-limit",
                        error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            time.sleep(0.5)
            continue
        if recorded is not None:
            return recorded
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _fail_if_owner_dead_once(job_id: str, code: str, message: str) -> bool | None:
    """True/False when decided (recorded, or not running any more); None while the owner
    still lives."""
    with session_scope() as s:
        cur = s.execute(text("SELECT status, epoch, owner, error_code FROM job_runs "
                             "WHERE id=:id"), {"id": _uuid(job_id)}).first()
        if cur is None or cur.status != "running":
            # (failed with our code: our UPDATE committed and its answer was lost)
            return cur is not None and cur.status == "failed" and cur.error_code == code
        if not identity.holder_is_dead(cur.owner):
            return None
        done = s.execute(
            text("UPDATE job_runs SET status='failed', finished_at=now(), "
                 "error_code=:c, error_message=:m, lease_expires_at=NULL "
                 "WHERE id=:id AND epoch=:e AND status='running' RETURNING 1"),
            {"id": _uuid(job_id), "e": cur.epoch, "c": code, "m": message},
        ).first()
        return done is not None


# -- fan-out -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Child:
    """A child job as its parent sees it once every child has ended."""

    id: str
    type: str
    status: str
    params: dict[str, Any]
    result: Any
    error_code: str | None
    error_message: str | None
    attempts: int


def fan_out_state(job_id: str) -> tuple[int, int]:
    """(children_total, children_pending) of a parent."""
    with autocommit() as conn:
        row = conn.execute(text("SELECT children_total, children_pending FROM job_runs "
                                "WHERE id=:id"), {"id": _uuid(job_id)}).one()
    return int(row.children_total), int(row.children_pending)


def children(parent_id: str | uuid.UUID) -> list[Child]:
    """Every child of a parent, oldest first."""
    with session_scope() as s:
        rows = s.execute(
            text("SELECT id, type, status, params, result, error_code, error_message, attempts "
                 "FROM job_runs WHERE parent_id=:p ORDER BY created_at, id"),
            {"p": _uuid(parent_id)},
        ).all()
    return [Child(str(r.id), r.type, r.status, r.params, r.result, r.error_code,
                  r.error_message, r.attempts) for r in rows]


def children_summary(parent_id: str | uuid.UUID) -> dict[str, int]:
    """Children of a parent counted by status."""
    with session_scope() as s:
        rows = s.execute(text("SELECT status, count(*) AS n FROM job_runs WHERE parent_id=:p "
                              "GROUP BY status"), {"p": _uuid(parent_id)}).all()
    return {r.status: int(r.n) for r in rows}


# -- reads and operator actions --------------------------------------------------------------

def list_jobs(
    *,
    status: str | None = None,
    job_type: str | None = None,
    parent_id: uuid.UUID | None = None,
    limit: int = 50,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> list[RowMapping]:
    """Newest first, filtered; `before` is the (created_at, id) of the last row already seen."""
    where: list[str] = ["true"]
    args: dict[str, Any] = {"limit": limit}
    if status:
        where.append("status = :status")
        args["status"] = status
    if job_type:
        where.append("type = :type")
        args["type"] = job_type
    if parent_id is not None:
        where.append("parent_id = :parent")
        args["parent"] = parent_id
    if before is not None:
        where.append("(created_at, id) < (:cts, :cid)")
        args["cts"], args["cid"] = before
    with session_scope() as s:
        return list(s.execute(
            text(f"SELECT {JOB_COLUMNS} FROM job_runs WHERE {' AND '.join(where)} "
                 "ORDER BY created_at DESC, id DESC LIMIT :limit"),
            args,
        ).mappings().all())


def pending_count() -> int:
    """Jobs accepted but not yet confirmed published (the outbox depth)."""
    with session_scope() as s:
        return int(s.execute(text(
            "SELECT count(*) FROM job_runs WHERE status IN ('queued', 'retrying') "
            "AND published_at IS NULL"
        )).scalar_one())


def get(job_id: str | uuid.UUID) -> RowMapping | None:
    """One job row as a mapping, or None."""
    with session_scope() as s:
        return s.execute(
            text(f"SELECT {JOB_COLUMNS} FROM job_runs WHERE id=:id"), {"id": _uuid(job_id)}
        ).mappings().first()


class JobNotFound(LookupError):
    """No job with that id."""


class JobStateConflict(RuntimeError):
    """The job is in a state that does not allow the operation."""


# An operator's retry: a fresh attempt budget, and a fresh allowance of spared lapses (a
# job that ended dead by lapsing would otherwise be declared dead again by the first outage
# on its new last attempt). Due from the retry (next_attempt_at = now): the queue's oldest
# age and the job's queue wait count from when it was put back, not from its creation days
# ago (a bulk retry of last week's dead jobs read as a week-old queue).
RETRY_SET = ("status='queued', attempts=0, lapses=0, published_at=NULL, delivered_at=NULL, "
             "next_attempt_at=now(), finished_at=NULL, expires_at=NULL, "
             "manual_retries=manual_retries+1")


def operator_retry(job_id: str | uuid.UUID) -> RowMapping:
    """Put a failed or dead job back in the queue with a fresh attempt budget.

    The caller publishes it (or the relay does, since published_at is reset).
    """
    jid = _uuid(job_id)
    with session_scope() as s:
        row = s.execute(
            text(f"UPDATE job_runs SET {RETRY_SET} WHERE id=:id AND status IN "
                 f"('failed','dead') RETURNING {JOB_COLUMNS}"),
            {"id": jid},
        ).mappings().first()
        if row is not None:
            return row
        _raise_for_state(s, jid, "only failed or dead jobs can be retried")
    raise AssertionError("unreachable")


def operator_cancel(job_id: str | uuid.UUID) -> RowMapping:
    """Cancel a job that has not started; a running job is left to finish (409)."""
    jid = _uuid(job_id)
    with session_scope() as s:
        row = s.execute(
            text("UPDATE job_runs SET status='cancelled', finished_at=now(), "
                 "error_code='cancelled', error_message='cancelled by an operator' "
                 "WHERE id=:id AND status IN ('queued','retrying') "
                 f"RETURNING {JOB_COLUMNS}"),
            {"id": jid},
        ).mappings().first()
        if row is not None:
            return row
        _raise_for_state(s, jid, "only queued or retrying jobs can be cancelled")
    raise AssertionError("unreachable")


def _raise_for_state(s: Any, jid: uuid.UUID, rule: str) -> None:
    current = s.execute(text("SELECT status FROM job_runs WHERE id=:id"), {"id": jid}).first()
    if current is None:
        raise JobNotFound(f"no job {jid}")
    raise JobStateConflict(f"job is {current.status}; {rule}")
