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
)
