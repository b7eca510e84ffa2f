"""RedBeat scheduler that sends through the enqueue path, with a key per slot.

Why subclass: beat must not bypass job_runs (the job would be invisible to the API), and a
slot fired twice (failover between two beats, a restart inside the slot) must run once,
which the deterministic idempotency key `<entry>:<slot>` gives.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from celery.schedules import crontab
from redbeat import RedBeatScheduler, RedBeatSchedulerEntry

from schedules import SCHEDULE, Entry
from workers.enqueue import submit
from workers.settings import get_settings

log = structlog.get_logger("warden.beat")


def slot_key(entry: Entry, when: datetime | None = None) -> str:
    """`<entry name>:<slot>` for the slot containing `when` (now by default)."""
    tz = ZoneInfo(get_settings().timezone)
    when = (when or datetime.now(tz)).astimezone(tz)
    return f"{entry.name}:{when.strftime(entry.slot_format)}"


def scheduled_time(entry: Any) -> datetime | None:
    """When the firing entry was due by its schedule (not when beat got to it), so a late
    or repeated firing of one slot gets that slot's key. None before the first run."""
    last = getattr(entry, "last_run_at", None)
    schedule = getattr(entry, "schedule", None)
    if last is None or not isinstance(schedule, crontab):
        return None
    if last.tzinfo is None:
        last = last.replace(tzinfo=UTC)
    # (start, delta, now): the first fire time after `last` is start + delta.
    start, delta, _ = schedule.remaining_delta(last)
    due: datetime = start + delta
    return due


def beat_schedule() -> dict[str, dict[str, Any]]:
    """The schedule in Celery's beat_schedule shape (RedBeat loads it into Redis)."""
    return {
        e.name: {
            "task": e.task,
            "schedule": crontab(**e.cron),
            "kwargs": {"params": e.params},
            "options": {"expires": e.expires},
        }
        for e in SCHEDULE
    }


class WardenScheduler(RedBeatScheduler):
    """Fires entries through workers.enqueue.submit."""

    def setup_schedule(self) -> None:
        self.app.conf.beat_schedule = beat_schedule()
        super().setup_schedule()

    def apply_async(self, entry: RedBeatSchedulerEntry, producer: Any = None,
                    advance: bool = True, **_: Any) -> Any:
        spec = next((e for e in SCHEDULE if e.name == entry.name), None)
        if spec is None:
            # An entry added by hand in Redis: through submit as well, so that it has a row
            # and its message this deployment's stamp (a bare message is refused by the
            # workers unless WARDEN_ADOPT_BARE_MESSAGES). Its kwargs are the job's params,
            # or {"params": {...}} as a `celery call` would send them.
            kwargs = dict(entry.kwargs or {})
            task, params = entry.task, kwargs.get("params", kwargs)
            due = scheduled_time(entry) or datetime.now(UTC).replace(second=0, microsecond=0)
            key = f"beat:{entry.name}:{int(due.timestamp())}"
            expires = None
        else:
            task, params = spec.task, spec.params
            key, expires = slot_key(spec, scheduled_time(entry)), spec.expires
        try:
            sub = submit(task, params, idempotency_key=key, expires=expires, source="beat")
        except Exception as exc:
            # Not advanced: the entry stays due and fires again next tick, same slot key.
            log.error("beat.submit_failed", entry=entry.name, key=key, error=str(exc))
            raise
        # Advance RedBeat's last-run (as Celery's own apply_async does before sending), or the
        # entry would stay due and fire on every tick.
        if advance:
            self.reserve(entry)
        log.info("beat.fired", entry=entry.name, idempotency_key=key, job_id=str(sub.job["id"]),
                 created=sub.created)
        return sub
