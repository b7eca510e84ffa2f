"""The Celery app, importable as `workers.app` so Celery's own CLI works.

Task modules are found by name (every `tasks/<family>/tasks.py`), never imported here:
workers/ stays free of business code, and a job family is added by adding its package.
"""

from __future__ import annotations

import importlib.util
import pkgutil
from typing import Any

from celery import Celery, signals

from workers import db
from workers import logging as wlogging
from workers.settings import Settings, SettingsError, get_settings

QUEUE = "warden"
UNCONFIGURED_REDIS = "redis://set-WARDEN_REDIS_URL-or-run-warden-up.invalid:6379/0"


def task_modules() -> list[str]:
    """`tasks.<family>.tasks` for every family package under tasks/."""
    spec = importlib.util.find_spec("tasks")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for info in pkgutil.iter_modules(list(spec.submodule_search_locations)):
        if info.ispkg and importlib.util.find_spec(f"tasks.{info.name}.tasks") is not None:
            found.append(f"tasks.{info.name}.tasks")
    return sorted(found) + list(get_settings().extra_task_modules)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings; each non-default says why."""
    try:
        redis_url = settings.redis_dsn()
    except SettingsError:
        # The registry must load without Redis (job-type catalogue, `warden jobs`); a
        # connection attempt then names the problem in its host name.
        redis_url = UNCONFIGURED_REDIS
    return {
        "broker_url": redis_url,
        # Results live in Postgres (job_runs.result); no result backend to keep in sync.
        "result_backend": None,
        "task_ignore_result": True,
        # At-least-once: ack after the task ran; a lost worker's task goes back to the queue.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,  # poison pills are capped by job_runs.attempts
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "broker_transport_options": {
            # Above the hard limit, or a long-running job would be delivered twice.
            "visibility_timeout": settings.effective_visibility_timeout,
            "socket_connect_timeout": 2,
            "socket_timeout": 10,
            "socket_keepalive": True,
            "retry_on_timeout": True,
            "health_check_interval": 10,
            **({"global_keyprefix": settings.broker_key_prefix}
               if settings.broker_key_prefix else {}),
        },
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a worker waits out a Redis outage
        "broker_connection_timeout": 2,
        "broker_heartbeat": 0,
        # SIGTERM is a warm shutdown (running jobs finish). SIGQUIT, or SIGTERM with
        # REMAP_SIGTERM=SIGQUIT, is a cold shutdown that first gives jobs 10 s (soft shutdown);
        # an unfinished job's message stays unacked and is delivered again.
        "worker_soft_shutdown_timeout": 10.0,
        "worker_enable_soft_shutdown_on_idle": True,
        # A dropped broker connection (a client kill, a failover) must not SIGTERM every
        # running job: they finish and record their outcomes in Postgres; a message that
        # comes back meanwhile is a duplicate, which the claim makes a no-op.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_default_queue": QUEUE,
        # Flower shows a job from the moment it is sent, not just when a worker takes it.
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "worker_hijack_root_logger": False,
        "timezone": settings.timezone,
        "enable_utc": True,
        # Beat: RedBeat keeps the schedule and its lock in Redis (two beats are safe).
        "beat_scheduler": "workers.beat:WardenScheduler",
        "redbeat_redis_url": redis_url,
        # Under the deployment's prefix like every other key (RedBeat's lock included).
        "redbeat_key_prefix": f"{settings.broker_key_prefix}warden:redbeat:",
        "redbeat_lock_timeout": 60,
        "redbeat_redis_options": {"socket_connect_timeout": 2, "socket_timeout": 10,
                                  "retry_on_timeout": True, "health_check_interval": 10},
        "beat_max_loop_interval": 5,
    }


app = Celery("warden", include=task_modules())
app.add_defaults(lambda: celery_config(get_settings()))


@signals.worker_process_init.connect
def _child_init(**kwargs: Any) -> None:
    """In each pool child: fresh DB pool (never the parent's sockets)."""
    db.dispose_after_fork(**kwargs)


SUPPORTED_POOLS = ("prefork",)


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


_relay: Any = None


@signals.worker_ready.connect
@signals.beat_init.connect
def _start_relay(**_: Any) -> None:
    """Every worker and beat runs the relay (one active at a time, by a Redis lease), so
    recovery never waits on an API process."""
    global _relay
    from workers.relay import Relay

    if _relay is None:
        _relay = Relay()
        _relay.start()


_worker_beat: Any = None


@signals.worker_ready.connect
def _start_worker_beat(sender: Any = None, **_: Any) -> None:
    """Announce this worker and its queues in Redis (workers.liveness)."""
    global _worker_beat
    from workers.liveness import WorkerBeat

    consumer = getattr(sender, "consumer", sender)
    hostname = getattr(sender, "hostname", None) or "unknown"
    try:
        queues = sorted(q.name for q in consumer.task_consumer.queues)
    except Exception:
        queues = [QUEUE]
    _worker_beat = WorkerBeat(str(hostname), queues)
    _worker_beat.start()


@signals.worker_shutdown.connect
def _stop_relay(**_: Any) -> None:
    if _relay is not None:
        _relay.stop()
    if _worker_beat is not None:
        _worker_beat.stop()


@signals.task_unknown.connect
def _unknown_task(message: Any = None, name: str = "", id: str = "", **_: Any) -> None:
    """A worker that does not know a job's type (a rolling deploy, a removed type) fails the
    job with `unknown_job_type` instead of dropping its message silently."""
    from workers import jobstore

    try:
        import socket

        jobstore.fail_unknown_type(id, name, socket.gethostname())
    except Exception:  # the message is gone either way; the relay cannot help here
        import structlog

        structlog.get_logger("warden.jobs").exception("job.unknown_type_not_recorded",
                                                      job_id=id, job_type=name)


@signals.task_revoked.connect
def _revoked(request: Any = None, terminated: bool = False, **_: Any) -> None:
    """A job revoked with Celery's control (Flower's Revoke) ends visibly in job_runs:
    `cancelled` if it had not started, `failed` (retryable) if its run was terminated;
    otherwise every worker drops each copy for hours while the relay keeps re-sending it."""
    from workers import jobstore

    job_id = getattr(request, "id", None)
    if not job_id:
        return
    try:
        jobstore.record_revoked(str(job_id), terminated=terminated)
    except Exception:
        import structlog

        structlog.get_logger("warden.jobs").exception("job.revoke_not_recorded", job_id=job_id)


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    """Celery processes log JSON lines like every other process."""
    wlogging.configure(get_settings().log_level)


def registered_job_tasks() -> dict[str, Any]:
    """Name -> task for every JobTask with a params model (the job-type catalogue)."""
    from workers.jobs import JobTask

    for module in task_modules():  # not app.loader: that would need the broker URL
        importlib.import_module(module)
    return {
        name: task
        for name, task in sorted(app.tasks.items())
        if isinstance(task, JobTask) and getattr(task, "params", None) is not None
    }
