"""The beat schedule as data: task names, never imports of task code."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from celery.schedules import crontab

_ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class Entry:
    """One schedule entry.

    `slot_format` (strftime, in the platform's timezone) turns the firing time into the
    slot part of the idempotency key `<name>:<slot>`, so a slot fired twice (two beats, a
    restart) runs once. `expires` (seconds): a message not started by then is dropped,
    because the next slot will do the work.
    """

    name: str
    task: str
    cron: dict[str, str]
    expires: int
    slot_format: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The name is the first `:`-separated part of its jobs' idempotency keys (the job
        # event trigger reads the entry back with split_part(key, ':', 1)), and it is quoted
        # into the generated PromQL selector {entry="..."}: letters, digits, `.`, `_`, `-`.
        if not _ENTRY_NAME.fullmatch(self.name):
            raise ValueError(f"schedule entry name {self.name!r}: use letters, digits, '.', "
                             "'_' and '-' only (at most 100), never ':'")

    @property
    def period(self) -> float:
        """The longest gap between two firings, in seconds: what "overdue" is measured in
        (the staleness alert of every entry fires after two of them)."""
        return cron_period(**self.cron)


@lru_cache(maxsize=64)
def cron_period(minute: str = "*", hour: str = "*", day_of_week: str = "*",
                day_of_month: str = "*", month_of_year: str = "*") -> float:
    """The longest gap between two firings of a crontab over a 62-day window, in seconds
    (a nightly entry: 86400). No firing twice in the window: the window itself."""
    spec = crontab(minute=minute, hour=hour, day_of_week=day_of_week,
                   day_of_month=day_of_month, month_of_year=month_of_year)
    start = datetime(2026, 1, 1, tzinfo=UTC)  # any fixed day: only the gaps matter
    days = 62
    fires: list[datetime] = []
    for d in range(days):
        day = start + timedelta(days=d)
        # celery counts days of the week from Sunday = 0
        if (day.isoweekday() % 7 not in spec.day_of_week or day.day not in spec.day_of_month
                or day.month not in spec.month_of_year):
            continue
        fires += [day.replace(hour=h, minute=m) for h in sorted(spec.hour)
                  for m in sorted(spec.minute)]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(fires)]
    return max(gaps) if gaps else float(days * 86400)


# The health check of the platform itself; job families add their entries here.
SCHEDULE: tuple[Entry, ...] = (
    Entry(
        name="platform-heartbeat",
        task="platform.ping",
        cron={"minute": "*/5"},
        expires=300,
        slot_format="%Y-%m-%dT%H:%M",
        params={"echo": "beat"},
    ),
    # Failed data migrations come back while their pass has attempts left (tasks/
    # data_migrations); hourly, at :17 to stay off the top of the hour's other jobs.
    Entry(
        name="migration-retry-failed",
        task="migration.retry_failed",
        cron={"minute": "17"},
        expires=3600,
        slot_format="%Y-%m-%dT%H",
        params={},
    ),
    # Backups (tasks/backups): nightly, when the service is quietest. The create job
    # submits the verification of its own backup (keyed by the backup id) the moment it has
    # committed; prune follows three hours later, and keeps any backup still being verified.
    # expires 6 h: a backup not started by 08:30 would run into the day's traffic; the next
    # night makes one (and WardenBackupVerifiedTooOld fires after two missed nights).
    Entry(
        name="backup-nightly",
        task="backup.create",
        cron={"minute": "30", "hour": "2"},
        expires=6 * 3600,
        slot_format="%Y-%m-%d",
        params={"verify": True},
    ),
    Entry(
        name="backup-prune",
        task="backup.prune",
        cron={"minute": "30", "hour": "5"},
        expires=6 * 3600,
        slot_format="%Y-%m-%d",
        params={},
    ),
    # Audits, validation, health (tasks/audits, tasks/validation, tasks/reports).
    # The nightly audit checks only (fixing is an operator's decision: `warden audit --fix`),
    # at 03:00, after the backup; expires 6 h like the backup's (the next night audits).
    Entry(
        name="audit-nightly",
        task="audit.integrity",
        cron={"minute": "0", "hour": "3"},
        expires=6 * 3600,
        slot_format="%Y-%m-%d",
        params={"fix": False},
    ),
    # Every 15 minutes; a slot not started within its 15 minutes is dropped (the next one
    # reads from the same watermark, so nothing is missed).
    Entry(
        name="validation-incremental",
        task="validation.characters",
        cron={"minute": "*/15"},
        expires=15 * 60,
        slot_format="%Y-%m-%dT%H:%M",
        params={"mode": "incremental"},
    ),
    # Job-table retention (tasks/platform): nightly at 04:30, between the audit and the day;
    # expires 6 h like the other nightly entries (the next night prunes what is left).
    Entry(
        name="job-retention",
        task="platform.prune_jobs",
        cron={"minute": "30", "hour": "4"},
        expires=6 * 3600,
        slot_format="%Y-%m-%d",
        params={},
    ),
    # Hourly, over the last 24 hours (the seed's cron did the same with --json); a degraded
    # report alerts the webhook. Expires within its hour: the next report supersedes it.
    Entry(
        name="health-hourly",
        task="report.health",
        cron={"minute": "0"},
        expires=3600,
        slot_format="%Y-%m-%dT%H",
        params={"period_hours": 24, "alert": True},
    ),
)
