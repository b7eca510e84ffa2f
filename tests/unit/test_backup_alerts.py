"""The backup alert rules (compose/alerts.yml), run by promtool on crafted gauge series, and
the runbook entry each one links to."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

RULES = ROOT / "compose" / "alerts.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
DAY = 86400
TOO_OLD = {
    "summary": None,  # filled per case: "No verified backup for <age>"
    "description": "The newest backup that passed verification (a real restore with every row "
                   "count checked) is older than two backup schedule periods. Backups are not "
                   "running, failing, or failing verification.",
    "runbook_url": "docs/runbook.md#wardenbackupverifiedtooold",
}


def _backup_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups if g["name"] == "warden-backups" for r in g["rules"]]


def _too_old(age: str) -> dict[str, Any]:
    return {"exp_labels": {"severity": "critical"},
            "exp_annotations": {**TOO_OLD, "summary": f"No verified backup for {age}"}}


def _series(name: str, values: str) -> dict[str, str]:
    return {"series": f'{name}{{instance="api-1"}}', "values": values}


def _run(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (.ci/run installs it)")
    # The backup group alone, as written in compose/alerts.yml (promtool evaluates every
    # rule of its files at every step: the other groups would only cost time).
    rules = tmp_path / "backup-rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [
        g for g in yaml.safe_load(RULES.read_text())["groups"] if g["name"] == "warden-backups"]}))
    spec = tmp_path / "backup-rules.test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m",
                                    "tests": tests}))
    done = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_verified_too_old_fires_after_two_schedule_periods_without_a_verified_backup(
        tmp_path: Path) -> None:
    # (a sample a minute: sparser series go stale between samples, and `for` starts over)
    period = _series("warden_backup_schedule_period_seconds", f"{DAY}x{5 * 1440}")
    _run(tmp_path, [
        # given a deployment that never verified a backup (the gauge says 0): quiet for two
        # periods, then firing once the condition has held for the rule's 10 minutes
        {"interval": "1m",
         "input_series": [_series("warden_backup_last_verified_timestamp_seconds",
                                  f"0x{3 * 1440}"), period],
         "alert_rule_test": [
             {"eval_time": "47h", "alertname": "WardenBackupVerifiedTooOld", "exp_alerts": []},
             {"eval_time": "48h5m", "alertname": "WardenBackupVerifiedTooOld",
              "exp_alerts": []},
             {"eval_time": "48h20m", "alertname": "WardenBackupVerifiedTooOld",
              "exp_alerts": [_too_old("2d 0h 20m 0s")]},
         ]},
        # given a backup verified every night (the gauge steps to each night's snapshot):
        # never fires, over four days
        {"interval": "1m",
         "input_series": [
             _series("warden_backup_last_verified_timestamp_seconds",
                     " ".join(f"{d * DAY}x1439" for d in range(5))), period],
         "alert_rule_test": [{"eval_time": f"{h}h", "alertname": "WardenBackupVerifiedTooOld",
                              "exp_alerts": []} for h in (24, 49, 73, 97, 110)]},
        # given backups that keep running but fail verification after the first night (the
        # newest verified stays at day 1): fires two periods after that one
        {"interval": "1m",
         "input_series": [
             _series("warden_backup_last_verified_timestamp_seconds", f"{DAY}x{4 * 1440}"),
             period],
         "alert_rule_test": [
             {"eval_time": "72h", "alertname": "WardenBackupVerifiedTooOld", "exp_alerts": []},
             {"eval_time": "74h", "alertname": "WardenBackupVerifiedTooOld",
              "exp_alerts": [_too_old("2d 2h 0m 0s")]},
         ]},
    ])


def test_restore_slow_fires_when_the_measured_restore_exceeds_the_objective(
        tmp_path: Path) -> None:
    objective = _series("warden_backup_rto_objective_seconds", "3600x100")
    rule = next(r for r in _backup_rules() if r["alert"] == "WardenBackupRestoreSlow")
    _run(tmp_path, [
        {"interval": "1m",
         "input_series": [_series("warden_backup_last_verified_restore_seconds", "3000x100"),
                          objective],
         "alert_rule_test": [{"eval_time": "30m", "alertname": "WardenBackupRestoreSlow",
                              "exp_alerts": []}]},
        {"interval": "1m",
         "input_series": [_series("warden_backup_last_verified_restore_seconds", "4000x100"),
                          objective],
         "alert_rule_test": [{"eval_time": "30m", "alertname": "WardenBackupRestoreSlow",
                              "exp_alerts": [{
                                  "exp_labels": {"severity": "warning"},
                                  "exp_annotations": {
                                      **rule["annotations"],
                                      "summary": "Restoring the newest verified backup took "
                                                 "1h 6m 40s, over the RTO objective"}}]}]},
    ])


def test_each_backup_alert_has_a_runbook_entry() -> None:
    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", RUNBOOK.read_text(), re.MULTILINE)}
    rules = _backup_rules()
    assert {r["alert"] for r in rules} == {"WardenBackupVerifiedTooOld",
                                           "WardenBackupRestoreSlow"}
    for rule in rules:
        url = rule["annotations"]["runbook_url"]
        assert url == f"docs/runbook.md#{rule['alert'].lower()}"
        assert url.split("#", 1)[1] in headings, f"{rule['alert']}: no runbook section"
