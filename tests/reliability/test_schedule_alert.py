"""A schedule whose job stops succeeding fires its generated staleness alert: the series a
real API exports, fed to `promtool test rules` with the rule `warden alerts render` writes."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from schedules import SCHEDULE
from tests.conftest import Isolated, Proc, Services, start_api, start_worker
from tests.reliability.test_metrics import scrape, value
from workers import alerts

pytestmark = pytest.mark.slow

ENTRY = next(e for e in SCHEDULE if e.name == "platform-heartbeat")


def test_a_schedule_that_stops_succeeding_fires_its_staleness_alert(
        iso: Isolated, services: Services, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (.ci/run installs Debian's prometheus package)")
    procs: list[Proc] = []
    try:
        api, url = start_api(services, env=iso.env)
        procs.append(api)
        worker = start_worker(services, "sched", env=iso.env)
        procs.append(worker)
        # given one slot of the heartbeat entry that succeeded, as beat fires it
        first = iso.insert_job(ENTRY.task, ENTRY.params, source="beat",
                               idempotency_key=f"{ENTRY.name}:2026-12-04T12:00")
        iso.wait(first, {"succeeded"}, timeout=60)
        # when the workers are gone and the next slot's job cannot succeed
        worker.stop()
        second = iso.insert_job(ENTRY.task, ENTRY.params, source="beat",
                                idempotency_key=f"{ENTRY.name}:2026-12-04T12:05")
        time.sleep(3)
        assert iso.job(second)["status"] == "queued"
        # then the API exports the first slot's success as the entry's last
        labels = {"entry": ENTRY.name, "task": ENTRY.task}
        deadline = time.monotonic() + 30
        samples = scrape(url)
        while value(samples, "warden_schedule_last_success_timestamp_seconds",
                    **labels) == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
            samples = scrape(url)
        now = time.time()
        last = value(samples, "warden_schedule_last_success_timestamp_seconds", **labels)
        since = value(samples, "warden_schedule_known_since_timestamp_seconds", **labels)
        assert now - 120 < last <= now
        assert iso.count("SELECT count(*) FROM job_runs WHERE status = 'succeeded' "
                         "AND source = 'beat'") == 1
    finally:
        for p in procs:
            p.stop()

    # and promtool, evaluating the generated rule over those values as time goes on,
    # keeps it quiet within two periods and fires it after two periods and its `for`.
    # promtool's clock starts at 0: shift the real timestamps so that its minute 60 is
    # the moment of the scrape.
    shift = now - 3600
    rules = tmp_path / "rules.yml"
    rules.write_text("groups:\n  - name: warden-schedules\n    rules:\n"
                     + alerts.schedule_rule(ENTRY) + "\n")
    rule = yaml.safe_load(rules.read_text())["groups"][0]["rules"][0]
    series = [
        {"series": f'warden_schedule_last_success_timestamp_seconds{{entry="{ENTRY.name}",'
                   f'task="{ENTRY.task}",instance="api"}}', "values": f"{last - shift:.3f}x180"},
        {"series": f'warden_schedule_known_since_timestamp_seconds{{entry="{ENTRY.name}",'
                   f'task="{ENTRY.task}",instance="api"}}', "values": f"{since - shift:.3f}x180"},
    ]
    limit_min = int(2 * ENTRY.period // 60)
    quiet = 60 + limit_min - 1
    firing = 60 + limit_min + 5 + 2  # past the limit, then the rule's `for: 5m`
    spec = tmp_path / "test.yml"
    spec.write_text(yaml.safe_dump({
        "rule_files": [str(rules)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": [
            {"eval_time": f"{quiet}m", "alertname": "WardenScheduleStale", "exp_alerts": []},
            {"eval_time": f"{firing}m", "alertname": "WardenScheduleStale", "exp_alerts": [
                {"exp_labels": rule["labels"], "exp_annotations": rule["annotations"]}]},
        ]}],
    }))
    done = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
