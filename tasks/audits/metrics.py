"""The audit figures operators watch: the newest finished run's findings by check."""

from __future__ import annotations

from workers.metrics import SqlGauge, add_sql_gauges

_NEWEST = ("(SELECT id FROM audit_runs WHERE finished_at IS NOT NULL "
           "ORDER BY started_at DESC, id DESC LIMIT 1)")

add_sql_gauges(
    SqlGauge(
        "warden_audit_findings", "Findings of the newest finished integrity audit, by check",
        ("check",),
        "SELECT t.key, (t.value->>'findings')::float8 FROM audit_runs r, "
        "jsonb_each(r.totals) t WHERE r.id = " + _NEWEST +
        " AND jsonb_typeof(t.value) = 'object'"),
    SqlGauge(
        "warden_audit_findings_remaining",
        "Findings the newest finished integrity audit left unfixed (all of them in check mode)",
        (), "SELECT remaining FROM audit_runs WHERE id = " + _NEWEST),
    SqlGauge(
        "warden_audit_last_run_timestamp_seconds",
        "When the newest integrity audit finished (absent: never)", (),
        "SELECT EXTRACT(EPOCH FROM finished_at) FROM audit_runs WHERE id = " + _NEWEST),
)
