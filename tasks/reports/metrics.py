"""The health report's figures: the newest report's score and whether it is degraded."""

from __future__ import annotations

from workers.metrics import SqlGauge, add_sql_gauges

_NEWEST = "FROM health_reports ORDER BY created_at DESC, id DESC LIMIT 1"

add_sql_gauges(
    SqlGauge("warden_health_score", "Health score of the newest report (0-100)", (),
             "SELECT health_score " + _NEWEST),
    SqlGauge("warden_health_degraded", "1 when the newest health report is degraded", (),
             "SELECT CASE WHEN status = 'healthy' THEN 0 ELSE 1 END " + _NEWEST),
    SqlGauge("warden_health_report_timestamp_seconds", "When the newest health report was made",
             (), "SELECT EXTRACT(EPOCH FROM created_at) " + _NEWEST),
)
