"""Backup gauges, read from the backups table at scrape time.

Why a collector reading the table (not gauges set by the jobs): the jobs run in workers,
/metrics is served by every API process; the table is the one place all of them agree on,
however many there are (aggregate with max()).

A timestamp of 0 means "never": a deployment with no verified backup is not protected, and
the age alert says so from its first day.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import text

from schedules import SCHEDULE
from workers.db import session_scope
from workers.metrics import REGISTRY, Cached
from workers.settings import get_settings

CREATE_TASK = "backup.create"

_NEWEST = text("""
SELECT
  (SELECT extract(epoch FROM max(snapshot_at)) FROM backups WHERE status = 'succeeded'),
  v.taken, v.restore_seconds
FROM (SELECT 1) one
LEFT JOIN LATERAL (
  SELECT extract(epoch FROM snapshot_at) AS taken, restore_seconds FROM backups
  WHERE status = 'succeeded' AND verdict = 'passed' ORDER BY snapshot_at DESC, id DESC LIMIT 1
) v ON true
""")


def schedule_period() -> float | None:
    """The period of the beat entry that runs backup.create (None without one)."""
    entry = next((e for e in SCHEDULE if e.task == CREATE_TASK), None)
    return entry.period if entry is not None else None


def _read() -> tuple[float | None, float | None, float | None]:
    with session_scope() as s:
        row = s.execute(_NEWEST).one()
    success, verified, restore = (None if v is None else float(v) for v in row)
    return success, verified, restore


class BackupCollector(Collector):
    """Newest successful and newest verified backup, and that one's restore time."""

    def __init__(self) -> None:
        self._values = Cached(_read)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Registration must not query the database (the API may start before it is up).
        yield from self._families((None, None, None))

    def _families(self, values: tuple[float | None, float | None, float | None]
                  ) -> Iterator[GaugeMetricFamily]:
        success, verified, restore = values
        yield GaugeMetricFamily(
            "warden_backup_last_success_timestamp_seconds",
            "Snapshot time of the newest backup that succeeded and still has its file (0: none)",
            value=success or 0.0)
        yield GaugeMetricFamily(
            "warden_backup_last_verified_timestamp_seconds",
            "Snapshot time of the newest backup that passed verification (0: none)",
            value=verified or 0.0)
        family = GaugeMetricFamily(
            "warden_backup_last_verified_restore_seconds",
            "How long restoring the newest verified backup took (its measured RTO)")
        if restore is not None:
            family.add_metric([], restore)
        yield family
        period = schedule_period()
        if period is not None:
            yield GaugeMetricFamily(
                "warden_backup_schedule_period_seconds",
                "Period of the backup.create beat entry (schedules/__init__.py)", value=period)
        yield GaugeMetricFamily(
            "warden_backup_rto_objective_seconds",
            "The restore time objective (WARDEN_BACKUP_RTO_OBJECTIVE)",
            value=get_settings().backup_rto_objective)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            values = self._values.get()
        except Exception:  # database down or table missing: other alerts say so
            return
        yield from self._families(values)


REGISTRY.register(BackupCollector())
