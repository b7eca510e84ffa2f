"""The validation figures operators watch: open issues by rule and severity."""

from __future__ import annotations

from workers.metrics import SqlGauge, add_sql_gauges

add_sql_gauges(
    SqlGauge(
        "warden_validation_issues_open",
        "Validation issues not resolved, by rule and severity (their lifecycle: "
        "GET /v1/validation/issues)", ("rule", "severity"),
        "SELECT rule, severity, count(*) FROM validation_issues WHERE resolved_at IS NULL "
        "GROUP BY 1, 2"),
)
