"""The backups API and the backup gauges on /metrics, from a real API process."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import start_api
from tests.integration.test_backup_create import BackupEnv, backup_env, seed_small

__all__ = ["backup_env"]


@pytest.fixture
def api_on(backup_env: BackupEnv) -> Iterator[str]:
    proc, url = start_api(backup_env.services, env={
        "WARDEN_DATABASE_URL": backup_env.database_url,
        "WARDEN_BACKUP_DIR": str(backup_env.backup_dir)})
    try:
        yield url
    finally:
        proc.stop()


def _gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("warden_backup_")}


def test_list_get_and_bad_input(backup_env: BackupEnv, api_on: str) -> None:
    from tasks.backups import service
    from workers.tokens import create_token

    # given a verified backup and a read token
    seed_small(60)
    made = service.create_backup()
    service.verify_backup(made["backup_id"])
    headers = {"Authorization": f"Bearer {create_token('bk-read', ['read'])}"}
    with httpx.Client(base_url=api_on, headers=headers, timeout=10) as client:
        # when the list is read, then it shows size, age, verdict and restore time
        listed = client.get("/v1/backups")
        assert listed.status_code == 200, listed.text
        [row] = listed.json()
        assert row["id"] == made["backup_id"] and row["bytes"] == made["bytes"]
        assert row["verdict"] == "passed" and row["restore_seconds"] > 0
        assert row["age_seconds"] >= 0 and row["verifying"] is False
        assert "table_counts" not in row or row["table_counts"] is None
        # and one backup carries its manifest counts and verification report
        one = client.get(f"/v1/backups/{made['backup_id']}").json()
        assert one["table_counts"]["public.characters"] == 60
        assert one["verify_report"]["steps"]["restore"]["ok"] is True
        # and bad input is a 422 naming the field, an unknown id a 404
        bad = client.get("/v1/backups/0")
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["path", "backup_id"]
        assert client.get("/v1/backups", params={"limit": 0}).json()["detail"][0]["loc"] == [
            "query", "limit"]
        assert client.get("/v1/backups/abc").status_code == 422
        assert client.get("/v1/backups/999999").status_code == 404
    # and without a token, 401
    assert httpx.get(f"{api_on}/v1/backups", timeout=10).status_code == 401


def test_gauges_follow_the_backups_table(backup_env: BackupEnv, api_on: str) -> None:
    from tasks.backups import service

    # given no backup yet: the timestamps say "never" (0), with the schedule and the RTO
    empty = _gauges(api_on)
    assert empty["warden_backup_last_success_timestamp_seconds"] == 0
    assert empty["warden_backup_last_verified_timestamp_seconds"] == 0
    assert "warden_backup_last_verified_restore_seconds" not in empty
    assert empty["warden_backup_schedule_period_seconds"] == 86400  # nightly
    assert empty["warden_backup_rto_objective_seconds"] == 3600
    # when a backup is verified, and a newer one is made but not verified
    seed_small(30)
    verified = service.create_backup()
    service.verify_backup(verified["backup_id"])
    newer = service.create_backup()
    rows = dict(backup_env.sql(
        "SELECT id, extract(epoch FROM snapshot_at)::float8 FROM backups"))
    restore_seconds = backup_env.sql("SELECT restore_seconds FROM backups WHERE id = %s",
                                     verified["backup_id"])[0][0]
    # then (within the collector's 5 s cache) the newest success is the newer one, the
    # newest verified the older one with its restore time
    deadline = time.monotonic() + 15
    gauges = _gauges(api_on)
    while gauges["warden_backup_last_verified_timestamp_seconds"] == 0:
        assert time.monotonic() < deadline, gauges
        time.sleep(0.5)
        gauges = _gauges(api_on)
    assert gauges["warden_backup_last_success_timestamp_seconds"] == pytest.approx(
        rows[newer["backup_id"]])
    assert gauges["warden_backup_last_verified_timestamp_seconds"] == pytest.approx(
        rows[verified["backup_id"]])
    assert gauges["warden_backup_last_verified_restore_seconds"] == pytest.approx(
        restore_seconds)
