"""Operator actions with a reason: one job or many by filter, a dry run that only counts,
and the operator log that records who, what, why and how many (issue 9, point 4)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from tests.conftest import ROOT, Isolated, Services, isolated, start_api
from workers.tokens import hash_token

ADMIN = "wdn_ops-admin-token-0123456789"


@pytest.fixture(scope="module")
def deployment(services: Services, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Isolated, str]]:
    with isolated(services, tmp_path_factory.mktemp("ops")) as iso:
        with psycopg.connect(iso.database_url, autocommit=True) as conn:
            conn.execute("INSERT INTO api_tokens (name, token_hash, scopes) "
                         "VALUES ('alice-ops', %s, '{admin}')", (hash_token(ADMIN),))
        api, base = start_api(services, env={**iso.env, "WARDEN_RELAY_GRACE": "3600"})
        try:
            yield iso, base
        finally:
            api.stop()


def _post(base: str, path: str, body: dict[str, object] | None) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=10,
                      headers={"Authorization": f"Bearer {ADMIN}"})


def _dead(iso: Isolated, job_type: str, n: int) -> list[str]:
    ids = [iso.insert_job(job_type, {}) for _ in range(n)]
    with psycopg.connect(iso.database_url, autocommit=True) as conn:
        conn.execute("UPDATE job_runs SET status = 'dead', attempts = 5, finished_at = now(), "
                     "error_code = 'transient:X' WHERE id = ANY(%s)", (ids,))
    return ids


def test_bulk_retry_counts_first_then_retries_and_logs(
    services: Services, deployment: tuple[Isolated, str]
) -> None:
    iso, base = deployment
    # given 3 dead flaky jobs and 2 dead ping jobs
    flaky = _dead(iso, "testing.flaky", 3)
    _dead(iso, "platform.ping", 2)
    body = {"status": "dead", "type": "testing.flaky", "reason": "dependency back: INC-7"}
    # when an operator asks for a dry run: then it counts, and changes nothing
    dry = _post(base, "/v1/jobs/retry", {**body, "dry_run": True})
    assert dry.status_code == 200, dry.text
    assert dry.json() == {"action": "retry", "matched": 3, "changed": 0, "dry_run": True}
    assert iso.count("SELECT count(*) FROM job_runs WHERE status = 'dead'") == 5
    # when it retries for real: exactly those 3 are queued again with a fresh budget
    done = _post(base, "/v1/jobs/retry", body).json()
    assert (done["matched"], done["changed"]) == (3, 3)
    assert iso.count("SELECT count(*) FROM job_runs WHERE id = ANY(%s) AND status = 'queued' "
                     "AND attempts = 0 AND manual_retries = 1", flaky) == 3
    assert iso.count("SELECT count(*) FROM job_runs WHERE status = 'dead'") == 2
    # and the operator log says who (the token's name), what, why and how many
    log = httpx.get(f"{base}/v1/operator-log", timeout=10,
                    headers={"Authorization": f"Bearer {ADMIN}"}).json()["items"]
    top = log[0]
    assert (top["actor"], top["action"], top["reason"], top["count"]) == (
        "alice-ops", "job.bulk_retry", "dependency back: INC-7", 3)
    assert top["details"]["type"] == "testing.flaky"
    # and the CLI shows the same log line
    out = subprocess.run([sys.executable, "-m", "cli.main", "oplog", "--limit", "1"], cwd=ROOT,
                         env=services.env(**iso.env), capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "alice-ops" in out.stdout and "job.bulk_retry" in out.stdout and "n=3" in out.stdout


def test_one_job_needs_a_reason_and_is_logged(deployment: tuple[Isolated, str]) -> None:
    iso, base = deployment
    (job,) = _dead(iso, "platform.ping", 1)
    # no body at all (the README's old example): the 422 names the field it needs (D7)
    for action in ("retry", "cancel"):
        bare = _post(base, f"/v1/jobs/{job}/{action}", None)
        assert bare.status_code == 422
        assert [e["loc"] for e in bare.json()["detail"]] == [["body", "reason"]], bare.text
    blank = _post(base, f"/v1/jobs/{job}/retry", {"reason": "   "})
    assert blank.status_code == 422
    assert blank.json()["detail"][0]["loc"] == ["body", "reason"]
    r = _post(base, f"/v1/jobs/{job}/retry", {"reason": "re-run after the fix"})
    assert r.status_code == 200 and r.json()["status"] == "queued"
    c = _post(base, f"/v1/jobs/{job}/cancel", {"reason": "not needed after all"})
    assert c.status_code == 200 and c.json()["status"] == "cancelled"
    assert c.json()["error"]["message"] == "cancelled by alice-ops: not needed after all"
    assert iso.count("SELECT count(*) FROM operator_log WHERE target = %s", job) == 2


def test_a_filter_that_cannot_match_the_action_is_422(deployment: tuple[Isolated, str]) -> None:
    _, base = deployment
    r = _post(base, "/v1/jobs/cancel", {"status": "dead", "reason": "x"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "status"]


def test_cli_bulk_cancel_dry_run_then_for_real(
    services: Services, deployment: tuple[Isolated, str]
) -> None:
    iso, _ = deployment
    queued = [iso.insert_job("testing.sleep_effect", {"seconds": 0}) for _ in range(2)]

    def warden(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT,
                              env=services.env(**iso.env), capture_output=True, text=True,
                              timeout=60, check=False)

    dry = warden("cancel", "--type", "testing.sleep_effect", "--status", "queued",
                 "--reason", "load test left-overs", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == "2 job(s) match (dry run: nothing changed)"
    real = warden("cancel", "--type", "testing.sleep_effect", "--status", "queued",
                  "--reason", "load test left-overs")
    assert real.stdout.strip() == "2 job(s) match; 2 cancelled"
    assert iso.count("SELECT count(*) FROM job_runs WHERE id = ANY(%s) AND status = "
                     "'cancelled'", queued) == 2
    assert iso.count("SELECT count(*) FROM operator_log WHERE action = 'job.bulk_cancel' "
                     "AND actor LIKE 'cli:%%' AND count = 2") == 1
