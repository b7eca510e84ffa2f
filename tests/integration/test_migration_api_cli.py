"""Data migrations over the real API and the real CLI: listing, and every refusal's answer."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from tests.conftest import ROOT, Services

NAMES = {"legacy_spent_xp", "xp_opening_balances"}


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _warden(services: Services, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, text=True,
                          capture_output=True, env=services.env(), timeout=120)


def test_the_api_lists_every_migration_with_state_and_progress(
        api: str, tokens: dict[str, str]) -> None:
    # given a read token; when it lists the migrations and reads one
    listed = httpx.get(f"{api}/v1/migrations", headers=_auth(tokens["read"]))
    one = httpx.get(f"{api}/v1/migrations/legacy_spent_xp", headers=_auth(tokens["read"]))
    # then each registered migration is there with its status, progress and timings
    assert listed.status_code == 200, listed.text
    rows = {m["name"]: m for m in listed.json()}
    assert set(rows) == NAMES
    for m in rows.values():
        for key in ("status", "rows_done", "rows_total", "percent", "rows_per_second",
                    "eta_seconds", "seconds_running", "seconds_paused", "seconds_throttled",
                    "last_error", "attempts", "max_attempts", "description"):
            assert key in m, key
    assert one.status_code == 200
    assert one.json()["batches"] == [] or isinstance(one.json()["batches"], list)
    assert httpx.get(f"{api}/v1/migrations").status_code == 401
    # and Prometheus sees each one's status (the alerts' input)
    scraped = httpx.get(f"{api}/metrics").text
    for name in NAMES:
        status = rows[name]["status"]
        assert f'warden_data_migration{{name="{name}",status="{status}"}} 1.0' in scraped


def test_operator_actions_need_admin_a_reason_and_the_right_state(
        api: str, tokens: dict[str, str]) -> None:
    url = f"{api}/v1/migrations/xp_opening_balances"
    # a read token cannot pause
    assert httpx.post(f"{url}/pause", json={"reason": "x"},
                      headers=_auth(tokens["read"])).status_code == 403
    # a pause without a reason is a 422 naming the field
    for body in ({}, {"reason": "  "}):
        missing = httpx.post(f"{url}/pause", json=body, headers=_auth(tokens["admin"]))
        assert missing.status_code == 422, body
        assert missing.json()["detail"][0]["loc"] == ["body", "reason"]
    # a migration that is not running cannot be paused, resumed or retried: 409 with why
    for action, body in (("pause", {"reason": "x"}), ("resume", {}), ("retry", {})):
        r = httpx.post(f"{url}/{action}", json=body, headers=_auth(tokens["admin"]))
        assert r.status_code == 409, (action, r.text)
        assert "xp_opening_balances is" in r.json()["detail"]
    # an unknown migration is a 404
    r = httpx.post(f"{api}/v1/migrations/nope/cancel", json={"reason": "x"},
                   headers=_auth(tokens["admin"]))
    assert r.status_code == 404 and "unknown migration 'nope'" in r.json()["detail"]


def test_a_run_of_an_unknown_migration_is_refused_at_submit(
        api: str, tokens: dict[str, str]) -> None:
    # (migration.run needs the admin scope: an enqueue token is refused before its params)
    with httpx.Client(base_url=api, headers=_auth(tokens["admin"])) as client:
        r = client.post("/v1/jobs", json={"type": "migration.run", "params": {"name": "nope"}})
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["body", "params", "name"]
        r = client.post("/v1/jobs", json={"type": "migration.run", "params": {
            "name": "legacy_spent_xp", "batch_size": 0}})
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["body", "params", "batch_size"]


def test_cli_status_lists_and_errors_are_one_line(services: Services) -> None:
    # given the CLI; when it lists migrations, then both are shown with their state
    out = _warden(services, "migrate", "status", "--json")
    assert out.returncode == 0, out.stderr
    assert {m["name"] for m in json.loads(out.stdout)} == NAMES
    text = _warden(services, "migrate", "status")
    assert "legacy_spent_xp [" in text.stdout and "rows/s" in text.stdout
    # and every refusal is one `error:` line and a non-zero exit
    for args, message in (
        (("migrate", "data", "nope"), "unknown migration 'nope'"),
        (("migrate", "pause", "nope", "--reason", "x"), "unknown migration 'nope'"),
        (("migrate", "resume", "xp_opening_balances"), "only a paused migration"),
        (("migrate", "retry", "xp_opening_balances"), "only a failed migration"),
        (("migrate", "pause", "xp_opening_balances", "--reason", " "), "a reason is required"),
    ):
        res = _warden(services, *args)
        assert res.returncode != 0, args
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            args, res.stderr)
