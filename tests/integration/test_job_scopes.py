"""Each job type's scope, over the real API (review 2026-12-07, N3): an `enqueue` token may no
longer submit what only an operator may do, and who asked is the token, never a param."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
import uuid
from typing import Any

import httpx
import psycopg

from tests.conftest import ROOT, Proc, Services, wait_for_status
from workers.tokens import hash_token


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _catalogue(client: httpx.Client) -> dict[str, dict[str, Any]]:
    r = client.get("/v1/job-types")
    assert r.status_code == 200, r.text
    return {t["name"]: t for t in r.json()}


def _token_name(db: psycopg.Connection, token: str) -> str:
    row = db.execute("SELECT name FROM api_tokens WHERE token_hash = %s",
                     (hash_token(token),)).fetchone()
    assert row is not None
    return str(row[0])


def _cancel(api: str, admin: str, job_id: str) -> None:
    """Jobs made only to be accepted are not left to a worker of the shared database."""
    r = httpx.post(f"{api}/v1/jobs/{job_id}/cancel", json={"reason": "test cleanup"},
                   headers=_auth(admin))
    assert r.status_code == 200, r.text


def test_the_catalogue_says_which_scope_each_type_needs(client: httpx.Client) -> None:
    # given the job types as a client reads them
    types = _catalogue(client)
    # then the destructive and operator types need admin, whatever their params
    for name in ("backup.prune", "backup.verify", "migration.run", "migration.reverse",
                 "migration.retry_failed", "platform.prune_jobs"):
        assert (types[name]["scope"], types[name]["admin_when"]) == ("admin", None), name
    # an audit needs enqueue, and admin when it fixes
    assert types["audit.integrity"]["scope"] == "enqueue"
    assert types["audit.integrity"]["admin_when"] == {"fix": True}
    assert (types["platform.ping"]["scope"], types["platform.ping"]["admin_when"]) == (
        "enqueue", None)
    # and the reverse's actor is documented as the server's to set
    actor = types["migration.reverse"]["params_schema"]["properties"]["actor"]
    assert actor["readOnly"] is True and "replaced" in actor["description"]


def test_an_enqueue_token_is_refused_every_admin_job_type(client: httpx.Client) -> None:
    # given every type the catalogue says needs admin, with any params or the raising ones
    types = _catalogue(client)
    admin_only = [n for n, t in types.items() if t["scope"] == "admin"]
    raised = {n: t["admin_when"] for n, t in types.items() if t["admin_when"]}
    assert {"backup.prune", "migration.run", "migration.reverse"} <= set(admin_only)
    assert "audit.integrity" in raised
    cases = [(n, {}) for n in admin_only] + list(raised.items())
    for name, params in cases:
        # when the enqueue token submits it
        key = f"scope-{uuid.uuid4()}"
        r = client.post("/v1/jobs", json={"type": name, "params": params,
                                          "idempotency_key": key})
        # then 403 naming the type and the scope it needs, and no job was made
        assert r.status_code == 403, (name, r.text)
        assert f"job type '{name}' needs the 'admin' scope" in r.json()["detail"], name
        listed = client.get("/v1/jobs", params={"type": name, "limit": 500}).json()["items"]
        assert key not in {j["idempotency_key"] for j in listed}, name


def test_an_audit_that_fixes_needs_admin_and_one_that_checks_does_not(
        api: str, client: httpx.Client, tokens: dict[str, str]) -> None:
    # given jobs that must not run during the suite (countdown an hour), cancelled after
    later = {"countdown": 3600}
    check = client.post("/v1/jobs", json={"type": "audit.integrity", "params": {"fix": False},
                                          **later})
    fix = client.post("/v1/jobs", json={"type": "audit.integrity", "params": {"fix": True},
                                        **later})
    by_admin = httpx.post(f"{api}/v1/jobs", headers=_auth(tokens["admin"]),
                          json={"type": "audit.integrity",
                                "params": {"fix": True, "reason": "scope test"}, **later})
    prune = httpx.post(f"{api}/v1/jobs", headers=_auth(tokens["admin"]),
                       json={"type": "backup.prune", "params": {"keep_daily": 0}, **later})
    try:
        # then checking is the enqueue token's, fixing is not, and admin may do both
        assert check.status_code == 202, check.text
        assert fix.status_code == 403
        assert fix.json()["detail"] == ("job type 'audit.integrity' needs the 'admin' scope "
                                        "when fix=true")
        assert by_admin.status_code == 202, by_admin.text
        assert prune.status_code == 202, prune.text
    finally:
        for r in (check, by_admin, prune):
            if r.status_code == 202:
                _cancel(api, tokens["admin"], r.json()["id"])


def test_the_operator_log_of_a_reverse_names_the_token_not_a_param(
        api: str, tokens: dict[str, str], worker: Proc, db: psycopg.Connection) -> None:
    # given an admin token that claims, in the params, to be someone else
    reason = f"scope test {uuid.uuid4()}"
    r = httpx.post(f"{api}/v1/jobs", headers=_auth(tokens["admin"]), json={
        "type": "migration.reverse",
        "params": {"name": "legacy_spent_xp", "reason": reason, "actor": "alice (admin)"}})
    assert r.status_code == 202, r.text
    me = _token_name(db, tokens["admin"])
    # then the job record says who submitted it
    assert r.json()["params"]["actor"] == me
    # and once it ran, so does the operator log
    done = wait_for_status(r.json()["id"], {"succeeded", "failed", "dead"}, timeout=60)
    assert done["status"] == "succeeded", done
    log = httpx.get(f"{api}/v1/operator-log", headers=_auth(tokens["admin"]),
                    params={"action": "migration.reverse"}).json()["items"]
    entry = next(e for e in log if e["reason"] == reason)
    assert (entry["actor"], entry["target"]) == (me, "legacy_spent_xp")


def test_the_cli_lists_job_types_and_submits_as_its_login(
        services: Services, api: str, tokens: dict[str, str]) -> None:
    def warden(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, text=True,
                              capture_output=True, env=services.env(), timeout=120)

    # when an operator lists the job types: one line each, with the scope it needs
    listed = warden("job-types")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert lines["backup.prune"].split()[1:3] == ["admin", "singleton"]
    assert "enqueue (admin when fix=true)" in lines["audit.integrity"]
    assert lines["platform.ping"].split()[1] == "enqueue"
    # and --json is the API's catalogue, schemas included
    as_json = warden("job-types", "--json")
    assert as_json.returncode == 0, as_json.stderr
    full = {t["name"]: t for t in json.loads(as_json.stdout)}
    assert full["migration.run"]["scope"] == "admin"
    assert "properties" in full["migration.run"]["params_schema"]
    # when it submits a reverse naming someone else, then the job names its login
    out = warden("enqueue", "migration.reverse", "-p", "name=legacy_spent_xp", "-p",
                 "reason=cli test", "-p", "actor=mallory", "--countdown", "3600")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    try:
        assert job["params"]["actor"] == f"cli:{getpass.getuser()}"
    finally:
        _cancel(api, tokens["admin"], job["id"])
