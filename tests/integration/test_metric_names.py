"""Every warden_* series the alert rules and the Grafana dashboard read is one the API
exports: a rule over a series that does not exist never fires (as the old `not run` rules
over warden_jobs{status="succeeded"} did)."""

from __future__ import annotations

import json
import re

import httpx
import yaml

from tests.conftest import ROOT

NAME = re.compile(r"\b(warden_[a-z_]+)")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def _exported(api: str) -> set[str]:
    body = httpx.get(f"{api}/metrics", timeout=10).text
    names = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "counter":
                names.add(name + "_total")
            if kind == "histogram":
                names.update(name + s for s in SUFFIXES[:3])
    return names


def _referenced() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    groups = yaml.safe_load((ROOT / "compose" / "alerts.yml").read_text())["groups"]
    for rule in (r for g in groups for r in g["rules"]):
        for name in NAME.findall(rule["expr"]):
            out.setdefault(name, set()).add(f"alert {rule['alert']}")
    board = json.loads((ROOT / "compose" / "grafana" / "dashboards" / "warden.json").read_text())
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            for name in NAME.findall(target["expr"]):
                out.setdefault(name, set()).add(f"panel {panel['title']!r}")
    return out


def test_every_series_the_rules_and_dashboard_read_is_exported(api: str) -> None:
    exported = _exported(api)
    missing = {name: users for name, users in _referenced().items() if name not in exported}
    assert not missing, missing


def test_the_job_gauge_has_no_status_the_collector_does_not_count() -> None:
    # warden_jobs counts the unfinished and the dead; finished statuses are counters
    from workers.metrics import WATCHED_STATUSES

    text = (ROOT / "compose" / "alerts.yml").read_text() + (
        ROOT / "compose" / "grafana" / "dashboards" / "warden.json").read_text()
    for status in re.findall(r'warden_jobs\{[^}]*status=~?\\?"([a-z|]+)', text):
        for s in status.split("|"):
            assert s in WATCHED_STATUSES, f"warden_jobs has no status {s!r}"
