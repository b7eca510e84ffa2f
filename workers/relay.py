"""The relay: sends every job whose message is missing, wherever the platform runs.

It runs in every API, worker and beat process and as `warden relay` (one active at a time by
a Redis lease, an optimisation only: two relays in one pass send duplicates, which the claim
turns into no-ops). Nothing waits on the API for recovery.

Three kinds of rows, each found through a partial index over unfinished statuses
(docs/job-table-at-scale.md):
1. unpublished and due: accepted while Redis was down, a retry or a waiting singleton whose
   delayed message could not be sent, a parent whose children all ended;
2. published long ago and never delivered, whose message is neither in the queue nor held
   by a worker (Redis lost it, or it was dropped): "lost", told from "waiting in a long
   queue" by looking at the queue itself (its messages, or where its oldest one stands);
3. running with a lapsed lease whose owner is proven dead (this kernel, its pid gone) or
   lapsed WARDEN_RELAY_LOST_AFTER ago: a new message lets a worker take it over (the claim
   gives it a new epoch, fencing the old run). A shorter lapse is left alone: a database
   outage stops every heartbeat, and a healthy owner renews its lease once it is back.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import structlog
from sqlalchemy import text

from workers import identity, leases, stats
from workers.celery_app import QUEUE
from workers.db import session_scope
from workers.enqueue import publish_many
from workers.liveness import held_by_live_workers
from workers.redis_client import broker_key, get_redis, key
from workers.settings import get_settings

log = structlog.get_logger("warden.relay")

BATCH = 500
# A queue longer than this is not read message by message: the relay then only trusts the
# age of its oldest message (FIFO: anything published well before it has left the queue).
SCAN_LIMIT = 2000

_UNPUBLISHED = text(
    "SELECT id, type, params FROM job_runs "
    "WHERE status IN ('queued', 'retrying') AND published_at IS NULL "
    # A parent put back by its last child has no producer of its own: no grace for it.
    "AND (updated_at < now() - make_interval(secs => :grace) OR children_total > 0) "
    "AND COALESCE(next_attempt_at, not_before, '-infinity') <= now() "
    "ORDER BY updated_at LIMIT :n"
)
# Ordered by when delivery became due (the later of the publish and the due time), the key
# of ix_job_runs_undelivered: countdowns and backoffs not yet due are never read.
_DUE = "GREATEST(published_at, COALESCE(next_attempt_at, not_before, '-infinity'))"
_UNDELIVERED = text(
    "SELECT id, type, params, published_at FROM job_runs "
    "WHERE status IN ('queued', 'retrying') AND delivered_at IS NULL "
    f"AND published_at IS NOT NULL AND {_DUE} < now() - make_interval(secs => :lost) "
    f"ORDER BY {_DUE} LIMIT :n"
)
# Lapsed past the grace; sent again only when the owner is proven dead (this kernel, pid
# gone) or the lease lapsed WARDEN_RELAY_LOST_AFTER ago: a shorter lapse may be a database
# outage that a healthy owner rides out (its heartbeat renews the lease once it is back).
_LAPSED = text(
    "SELECT id, type, params, owner, "
    "lease_expires_at < now() - make_interval(secs => :lost) AS lapsed_long FROM job_runs "
    "WHERE status = 'running' AND lease_expires_at < now() - make_interval(secs => :grace) "
    "AND (published_at IS NULL OR published_at < now() - make_interval(secs => :lost)) "
    "ORDER BY lease_expires_at LIMIT :n"
)


def _message_id(raw: Any) -> str | None:
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # unacked: [message, exchange, routing_key]
            message = message[0]
        return str(message["headers"]["id"])
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


class BrokerView:
    """What the broker's queue holds right now, and what live workers hold.

    A message reserved by a worker counts only while that worker announces it (its
    liveness beat lists the messages it holds and has not started: a countdown waiting for
    its time, a message waiting for a free process of a busy worker). kombu's `unacked`
    hash cannot tell a live holder from a dead one, so it is not read: a message a worker
    held when it died is re-sent once its beat lapses.
    """

    def __init__(self, queue: str) -> None:
        client = get_redis()
        try:
            self.held = held_by_live_workers()
        except Exception as exc:  # a duplicate is harmless; a lost job is not
            log.warning("relay.held_unreadable", error=f"{type(exc).__name__}: {exc}")
            self.held = set()
        self.depth = int(client.llen(broker_key(queue)))
        self.queued: set[str] | None = None
        self.oldest: str | None = None
        self.tail: list[str] = []
        if self.depth <= SCAN_LIMIT:
            self.queued = {i for raw in client.lrange(broker_key(queue), 0, -1)
                           if (i := _message_id(raw)) is not None}
        else:  # LPUSH in, BRPOP out: the oldest waiting messages are the list's tail
            # (a few: one that is not a job's, by id or row, must not hide the others)
            self.tail = [i for raw in reversed(client.lrange(broker_key(queue), -10, -1))
                         if (i := _message_id(raw)) is not None and _is_uuid(i)]
            self.oldest = self.tail[0] if self.tail else None

    def present(self, job_id: str) -> bool | None:
        """True/False when the view is exact; None when only the oldest message is known."""
        if job_id in self.held:
            return True
        if self.queued is not None:
            return job_id in self.queued
        return None


class Relay:
    """One pass every WARDEN_RELAY_INTERVAL seconds, in a daemon thread."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """One pass; returns how many jobs were published."""
        settings = get_settings()
        # Not renewed: a relay that hangs mid-pass (a half-open socket) loses the lease after
        # its TTL and another process's relay takes over.
        ttl = max(30.0, settings.relay_interval * 5)
        with leases.held(key("lease:relay"), ttl=ttl, renew=False) as lease:
            if lease is None:
                return 0
            args = {"grace": settings.relay_grace, "lost": settings.relay_lost_after, "n": BATCH}
            with session_scope() as s:
                unpublished = s.execute(_UNPUBLISHED, args).all()
                undelivered = s.execute(_UNDELIVERED, args).all()
                lapsed = [r for r in s.execute(_LAPSED, args).all()
                          if r.lapsed_long or identity.holder_is_dead(r.owner)]
            try:
                lost = self._lost(undelivered) if undelivered else []
            except Exception as exc:  # the broker view failed: still send the other kinds
                log.warning("relay.lost_check_failed", error=f"{type(exc).__name__}: {exc}")
                lost = []
            sent = self._send([*unpublished, *lost, *lapsed])
            if sent:
                log.info("relay.published", count=sent, unpublished=len(unpublished),
                         lost=len(lost), lapsed=len(lapsed))
            # The job statistics are folded here too, so they stay current (and job_events
            # small) where nobody scrapes /metrics.
            try:
                stats.fold()
            except Exception as exc:
                log.warning("relay.stats_fold_failed", error=f"{type(exc).__name__}: {exc}")
            return sent

    def _lost(self, rows: Sequence[Any]) -> list[Any]:
        """The candidates whose message the broker does not hold."""
        view = BrokerView(QUEUE)
        oldest_published = None
        if view.queued is None and view.tail:
            with session_scope() as s:
                oldest_published = s.execute(
                    text("SELECT min(published_at) FROM job_runs WHERE id = ANY(:ids)"),
                    {"ids": [uuid.UUID(i) for i in view.tail]},
                ).scalar()
        lost = []
        for row in rows:
            present = view.present(str(row.id))
            if present is None:
                # Long queue: lost only if published well before the oldest waiting message.
                present = oldest_published is None or row.published_at >= oldest_published
            if not present:
                lost.append(row)
        if lost:
            log.warning("relay.messages_lost", count=len(lost), queue_depth=view.depth)
        return lost

    def _send(self, rows: Iterable[Any]) -> int:
        """Publish in one producer connection, then mark them all in one statement."""
        sent = publish_many((r.id, r.type, r.params) for r in rows)
        if sent:
            with session_scope() as s:
                s.execute(
                    text("UPDATE job_runs SET published_at = now() WHERE id = ANY(:ids) "
                         "AND status IN ('queued', 'retrying', 'running')"),
                    {"ids": sent},
                )
        return len(sent)

    def _loop(self) -> None:
        interval = get_settings().relay_interval
        while not self._stop.wait(interval):
            try:
                self.run_once()
            except Exception as exc:  # Redis or Postgres down: keep looping
                log.warning("relay.pass_failed", error=f"{type(exc).__name__}: {exc}")

    def start(self) -> None:
        """Run in a daemon thread until stop()."""
        self._thread = threading.Thread(target=self._loop, name="outbox-relay", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def run_forever(self) -> Iterator[int]:
        """The `warden relay` process: a pass every interval until stopped."""
        interval = get_settings().relay_interval
        while not self._stop.wait(interval):
            try:
                yield self.run_once()
            except Exception as exc:
                log.warning("relay.pass_failed", error=f"{type(exc).__name__}: {exc}")
