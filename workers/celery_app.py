"""The Celery app and its configuration: the bottom of the job core.

Everything in workers/ that sends or runs a job builds on this module, and it imports none
of them: the job lifecycle (jobstore, enqueue, jobs, relay) sits above it, and the wiring of
Celery's signals and the per-process threads sits on top (`workers.app`, which Celery's own
CLI and `warden worker|beat` load). Task modules are found by name (every
`tasks/<family>/tasks.py`), never imported at import time: workers/ stays free of business
code, and a job family is added by adding its package.
"""

from __future__ import annotations

import importlib.util
import pkgutil
from typing import Any

from celery import Celery

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


def registered_job_tasks() -> dict[str, Any]:
    """Name -> task for every job task (a JobTask with a params model): the job-type
    catalogue. The task modules are imported by name, and a job task is known by its
    `warden_job` mark, so this module needs nothing above it."""
    for module in task_modules():  # not app.loader: that would need the broker URL
        importlib.import_module(module)
    return {
        name: task
        for name, task in sorted(app.tasks.items())
        if getattr(task, "warden_job", False) and getattr(task, "params", None) is not None
    }


_catalogue: dict[str, Any] | None = None


def job_types() -> dict[str, Any]:
    """Registered job types (cached: the registry does not change while a process runs)."""
    global _catalogue
    if _catalogue is None:
        _catalogue = registered_job_tasks()
    return _catalogue
