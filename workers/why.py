"""Why is this job not running? One answer per job, from its row, the queue and the workers.

The API (`GET /v1/jobs/{id}` -> `waiting_on`), `warden job ID` and the operations page show
it. Each reason names what the job waits on and until when, in the order an operator would
look: a time it waits for (countdown, backoff), another job (a singleton's holder, its
children), the outbox, the workers, the queue ahead of it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import text

from workers.db import session_scope
from workers.settings import get_settings

REASONS = ("done", "failed", "dead", "cancelled", "running", "children", "countdown",
           "backoff", "singleton", "deferred", "outbox", "no_worker", "queue")


class _Consumers(enum.Enum):
    LOOK_UP = "look up"


# explain(consumers=...) default: ask Redis (workers.liveness.queue_consumers) if needed.
LOOK_UP: Literal[_Consumers.LOOK_UP] = _Consumers.LOOK_UP
# What a caller may pass: the consumers, None (Redis did not answer), or LOOK_UP.
Consumers = list[str] | None | Literal[_Consumers.LOOK_UP]
UNREACHABLE = "Redis unreachable: cannot tell which workers consume"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def explain(row: Mapping[str, Any], *, singleton: bool = False, queue: str | None = None,
            consumers: Consumers = LOOK_UP
            ) -> dict[str, Any]:
    """`{"reason", "message", ...details}` for a job row (JOB_COLUMNS of jobstore).

    `consumers`: the queue's consumers when the caller looked them up already (None: Redis
    did not answer), so that a page of jobs asks Redis once, not once per queued job."""
    from workers.celery_app import QUEUE

    queue = queue or QUEUE
    status = row["status"]
    code, message = row.get("error_code"), row.get("error_message")
    if status == "succeeded":
        return {"reason": "done", "message": f"succeeded after {row['attempts']} attempt(s)"}
    if status in ("failed", "dead", "cancelled"):
        how = {"failed": "failed", "dead": f"dead after {row['attempts']} attempts",
               "cancelled": "cancelled"}[status]
        return {"reason": status, "message": f"{how}: {code or '-'}: {message or ''}".rstrip(),
                "error_code": code, "attempts": row["attempts"],
                "retryable": status in ("failed", "dead")}
    if status == "running":
        progress = row.get("progress") or {}
        done = f", progress {progress.get('done')}/{progress.get('total')}" if progress else ""
        lease = row.get("lease_expires_at")
        out: dict[str, Any] = {"reason": "running",
                               "message": f"running on {row.get('worker')} since "
                                          f"{_iso(row.get('started_at'))} (lease until "
                                          f"{_iso(lease)}){done}",
                               "worker": row.get("worker"), "lease_expires_at": _iso(lease)}
        if isinstance(lease, datetime) and lease < datetime.now(UTC):
            # Its owner stopped renewing (dead, stalled, or cut off from the database): it
            # may still renew; else it is taken over (ADR 0012).
            lost = get_settings().relay_lost_after
            out["message"] += (f"; its lease lapsed at {_iso(lease)}: unless its owner renews "
                               f"it, it is taken over from {_iso(lease + timedelta(seconds=lost))}"
                               " (at once if its owner is proven dead)")
        return out
    if status == "waiting":
        return {"reason": "children",
                "message": f"waiting for {row['children_pending']} of {row['children_total']} "
                           "child jobs to end",
                "children_pending": row["children_pending"],
                "children_total": row["children_total"]}
    with session_scope() as s:
        now: datetime = s.execute(text("SELECT now()")).scalar_one()
        not_before, next_at = row.get("not_before"), row.get("next_attempt_at")
        if not_before and not_before > now:
            return {"reason": "countdown", "until": _iso(not_before),
                    "message": f"countdown: may run from {_iso(not_before)}"}
        holder = None
        if singleton:
            holder = s.execute(
                text("SELECT id FROM job_runs WHERE type = :t AND status = 'running' "
                     "AND id <> :id AND lease_expires_at > now() LIMIT 1"),
                {"t": row["type"], "id": row["id"]}).scalar()
        if holder is not None:
            return {"reason": "singleton", "holder": str(holder),
                    "message": f"singleton: job {holder} of the type runs; this one runs after "
                               "it (no attempt spent waiting)"}
        if status == "queued" and next_at and next_at > now:
            # A worker took it and put it back for later without spending an attempt
            # (jobstore.defer): its delayed message is not in the queue's count, so "0 jobs
            # ahead, 1 worker consuming" would read as a stuck worker (drill D6).
            why = ("another job of the type was running when a worker took it (singleton)"
                   if singleton else "a worker put it back (no worker of this deploy knows "
                   "its type yet)")
            return {"reason": "deferred", "until": _iso(next_at),
                    "message": f"deferred until {_iso(next_at)}: {why}; no attempt spent"}
        if status == "retrying" and next_at and next_at > now:
            return {"reason": "backoff", "until": _iso(next_at), "error_code": code,
                    "message": f"backoff until {_iso(next_at)} after attempt {row['attempts']} "
                               f"of {row['max_attempts']} ({code})"}
        if row.get("published_at") is None:
            return {"reason": "outbox",
                    "message": "not yet published (outbox): the relay sends it within seconds "
                               "while Redis is reachable"}
        if consumers is LOOK_UP:
            from workers.liveness import queue_consumers

            live = queue_consumers(queue)
        else:
            live = consumers
        if live == []:
            return {"reason": "no_worker", "queue": queue,
                "message": f"no worker consumes its queue {queue!r} (none of this "
                           "deployment: a worker of another database refuses its message)"}
        ahead = s.execute(
            text("SELECT count(*) FROM job_runs WHERE status IN ('queued', 'retrying') "
                 "AND delivered_at IS NULL AND published_at IS NOT NULL AND "
                 "GREATEST(published_at, COALESCE(next_attempt_at, not_before, '-infinity')) "
                 "< GREATEST(CAST(:p AS timestamptz), COALESCE(CAST(:n AS timestamptz), "
                 "CAST(:nb AS timestamptz), '-infinity'))"),
            {"p": row["published_at"], "n": next_at, "nb": not_before}).scalar_one()
    workers = f", {len(live)} worker(s) consuming" if live else f"; {UNREACHABLE}"
    return {"reason": "queue", "queue": queue, "ahead": int(ahead), "workers": live,
            "message": f"{ahead} job(s) ahead of it in queue {queue!r}{workers}"}

