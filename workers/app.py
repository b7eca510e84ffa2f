"""The Celery app as its processes run it: Celery's signals wired to the job core, and the
threads every worker and beat runs (the relay, the worker's liveness beat).

`celery -A workers.app ...` and `warden worker|beat|flower` load this module; task modules
import the app from here. Nothing in workers/ imports it: the dependencies point one way,
from this wiring down through the job lifecycle (relay -> jobs -> enqueue -> jobstore) to
the Celery app and its configuration (workers.celery_app) at the bottom.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import structlog
from celery import signals

from workers import db, deployment, jobstore
from workers import logging as wlogging
from workers.celery_app import (
    QUEUE,
    app,
    celery_config,
    job_types,
    registered_job_tasks,
    task_modules,
)
from workers.liveness import WorkerBeat
from workers.relay import Relay
from workers.settings import get_settings

__all__ = ["QUEUE", "app", "celery_config", "job_types", "registered_job_tasks",
           "task_modules"]

log = structlog.get_logger("warden.jobs")


@signals.worker_process_init.connect
def _child_init(**kwargs: Any) -> None:
    """In each pool child: fresh DB pool (never the parent's sockets)."""
    db.dispose_after_fork(**kwargs)


SUPPORTED_POOLS = ("prefork",)


@signals.worker_init.connect
def _mark_soft_shutdown(sender: Any = None, **_: Any) -> None:
    """From the start of a cold shutdown's soft wait (Ctrl-C of `warden up`, SIGQUIT), a job
    this worker terminates was stopped by the shutdown, and gives its attempt back
    (jobs.SHUTTING_DOWN). Celery sends `worker_shutting_down` only after it has cancelled
    the running jobs, too late for them to know, so the worker's own wait is wrapped."""
    from workers import jobs

    wait = getattr(sender, "wait_for_soft_shutdown", None)
    if wait is None:
        return

    def marked() -> None:
        jobs.SHUTTING_DOWN.value = 1
        wait()

    sender.wait_for_soft_shutdown = marked


@signals.worker_init.connect
def _check_pool(sender: Any = None, **_: Any) -> None:
    """Only prefork enforces time limits and gives each job its own process (the owner
    token names a process): threads/solo/gevent pools are refused with a clear message."""
    pool = getattr(sender, "pool_cls", None)
    name = pool if isinstance(pool, str) else f"{getattr(pool, '__module__', '')}"
    if pool is not None and "prefork" not in name:
        raise SystemExit(
            f"error: the {name!r} pool is not supported: Warden needs prefork (time limits, "
            "one process per running job); use --pool prefork"
        )


_relay: Relay | None = None
_worker_beat: WorkerBeat | None = None


@signals.worker_ready.connect
@signals.beat_init.connect
def _start_relay(**_: Any) -> None:
    """Every worker and beat runs the relay (one active at a time, by a Redis lease), so
    recovery never waits on an API process."""
    global _relay
    if _relay is None:
        _relay = Relay()
        _relay.start()


@signals.worker_ready.connect
def _start_worker_beat(sender: Any = None, **_: Any) -> None:
    """Announce this worker, its queues and the messages it holds in Redis
    (workers.liveness)."""
    global _worker_beat
    consumer = getattr(sender, "consumer", sender)
    hostname = getattr(sender, "hostname", None) or "unknown"
    try:
        queues = sorted(q.name for q in consumer.task_consumer.queues)
    except Exception:
        queues = [QUEUE]
    _worker_beat = WorkerBeat(str(hostname), queues, deployment.identity, _held_messages)
    _worker_beat.start()


def _held_messages() -> list[str]:
    """Ids of the jobs whose messages this worker holds but has not started: countdowns
    waiting for their time, messages waiting for a free pool process."""
    from celery.worker import state

    for _ in range(5):  # the consumer's thread changes these sets while we read them
        try:
            return [str(r.id) for r in [*state.scheduled_requests, *state.reserved_requests]
                    if r not in state.active_requests]
        except RuntimeError:
            continue
    return []


@signals.worker_shutdown.connect
def _stop_threads(**_: Any) -> None:
    if _relay is not None:
        _relay.stop()
    if _worker_beat is not None:
        _worker_beat.stop()


def _foreign(headers: Any) -> str | None:
    """The deployment a message was stamped for, when it is not this one's (its job row is
    in another database, whose id this database may hold too: a restored copy's)."""
    stamp = (headers or {}).get(deployment.STAMP_HEADER) if hasattr(headers, "get") else None
    if not stamp:
        return None
    try:
        return None if stamp == deployment.identity() else str(stamp)
    except Exception:  # cannot tell: the database is away, and no write would succeed
        return None


@signals.task_unknown.connect
def _unknown_task(message: Any = None, name: str = "", id: str = "", **_: Any) -> None:
    """A worker that does not know a job's type: within WARDEN_UNKNOWN_TYPE_GRACE the job
    is left to a worker that does (a rolling deploy), then it fails with
    `unknown_job_type` (jobstore.fail_unknown_type) instead of its message being dropped
    silently."""
    if (stamped := _foreign(getattr(message, "headers", None))) is not None:
        log.error("job.wrong_deployment", job_id=id, job_type=name, stamped=stamped)
        return
    try:
        outcome = jobstore.fail_unknown_type(id, name, socket.gethostname())
        log.warning("job.unknown_type", job_id=id, job_type=name, outcome=outcome)
    except Exception:  # the message is gone either way; the relay re-sends a lost one
        log.exception("job.unknown_type_not_recorded", job_id=id, job_type=name)


@signals.task_revoked.connect
def _revoked(request: Any = None, terminated: bool = False, **_: Any) -> None:
    """A job revoked with Celery's control (Flower's Revoke) ends visibly in job_runs:
    `cancelled` if it had not started, `failed` (retryable) if its run was terminated;
    otherwise every worker drops each copy for hours while the relay keeps re-sending it.
    A terminated run is recorded from a thread once its process is proven dead, off the
    worker's event loop."""
    job_id = getattr(request, "id", None)
    if not job_id:
        return
    if (stamped := _foreign(getattr(request, "request_dict", None))) is not None:
        log.error("job.wrong_deployment", job_id=job_id, stamped=stamped)
        return

    def record() -> None:
        try:
            jobstore.record_revoked(str(job_id), terminated=terminated)
        except Exception:
            log.exception("job.revoke_not_recorded", job_id=job_id)

    if terminated:
        threading.Thread(target=record, name="revoked", daemon=True).start()
    else:
        record()


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    """Celery processes log JSON lines like every other process."""
    wlogging.configure(get_settings().log_level)
