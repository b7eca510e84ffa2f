"""Data-migration figures: each migration's status and progress, and its throughput."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tasks.data_migrations import service
from workers.db import session_scope
from workers.metrics import REGISTRY, Cached, SqlGauge, add_sql_gauges


def _read() -> list[dict[str, Any]]:
    with session_scope() as s:
        return service.list_migrations(s)


class MigrationCollector(Collector):
    """`warden_data_migration{name,status}` (1 for the current status) and its rows done and
    total, for every registered migration (run or not), read at scrape time, cached."""

    def __init__(self) -> None:
        self._rows = Cached(_read)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            rows = self._rows.get()
        except Exception:  # database down: /readyz says so; metrics stay scrapeable
            return
        status = GaugeMetricFamily("warden_data_migration", "Data migrations by status (1)",
                                   labels=["name", "status"])
        done = GaugeMetricFamily("warden_data_migration_rows_done",
                                 "Rows the current pass has done", labels=["name"])
        total = GaugeMetricFamily("warden_data_migration_rows_total",
                                  "Rows the current pass will visit", labels=["name"])
        for m in rows:
            status.add_metric([m["name"], m["status"]], 1)
            done.add_metric([m["name"]], m["rows_done"])
            total.add_metric([m["name"]], m["rows_total"] or 0)
        yield from (status, done, total)


REGISTRY.register(MigrationCollector())
add_sql_gauges(
    SqlGauge(
        "warden_data_migration_rows_per_second",
        "Rows per second of the current pass, over its running time (paused and throttled "
        "time left out, as the ETA does)", ("name",),
        "SELECT name, CASE WHEN seconds_running > 0 THEN rows_done / seconds_running "
        "ELSE 0 END FROM data_migrations"),
)
