"""The beat entries of the audit, validation, report and data-migration families: each
task at its cadence, with its params, an `expires` within its period and a slot key that
names each firing once (a double-fired slot runs once, two slots never share a key)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from celery.schedules import crontab

from schedules import SCHEDULE, Entry
from workers.beat import slot_key

DAY, HOUR, QUARTER = 86_400.0, 3_600.0, 900.0


def _firings(entry: Entry, days: int = 2) -> list[datetime]:
    """Every firing of the entry's crontab over `days` days, minute by minute."""
    spec = crontab(**entry.cron)
    start = datetime(2026, 11, 22, tzinfo=UTC)
    minutes = (start + timedelta(minutes=m) for m in range(days * 24 * 60))
    return [t for t in minutes if t.minute in spec.minute and t.hour in spec.hour]


@pytest.mark.parametrize(("task", "period", "params"), [
    ("audit.integrity", DAY, {"fix": False}),  # nightly, checks only
    ("validation.characters", QUARTER, {"mode": "incremental"}),  # every 15 minutes
    ("report.health", HOUR, {"period_hours": 24, "alert": True}),  # hourly, alerts
    ("migration.retry_failed", HOUR, {}),  # hourly
])
def test_each_family_entry_runs_its_task_at_its_cadence(task: str, period: float,
                                                        params: dict[str, object]) -> None:
    # given the one entry of the task
    [entry] = [e for e in SCHEDULE if e.task == task]
    # then it fires every `period`, with these params, and a late message expires before
    # the next slot does the work again
    assert (entry.period, entry.params) == (period, params)
    assert 0 < entry.expires <= period
    # and its slot key names each firing once, and the same firing the same way
    fired = _firings(entry)
    keys = [slot_key(entry, t) for t in fired]
    assert len(fired) == 2 * DAY / period and len(set(keys)) == len(keys)
    assert all(k.startswith(f"{entry.name}:") for k in keys)
    assert slot_key(entry, fired[0] + timedelta(seconds=40)) == keys[0]
