"""Data-migration throughput (status and progress: api_stub/routes/migrations.py)."""

from __future__ import annotations

from workers.metrics import SqlGauge, add_sql_gauges

add_sql_gauges(
    SqlGauge(
        "warden_data_migration_rows_per_second",
        "Rows per second of the current pass, over its running time (paused and throttled "
        "time left out, as the ETA does)", ("name",),
        "SELECT name, CASE WHEN seconds_running > 0 THEN rows_done / seconds_running "
        "ELSE 0 END FROM data_migrations"),
)
