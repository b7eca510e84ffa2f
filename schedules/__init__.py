"""The beat schedule as data: task names, never imports of task code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
