"""The audit as operators and services reach it: `warden audit` (exit codes for cron and CI,
--json printing the stored run, undo) with a real worker, and the runs and their findings
over the API (paged by cursor, filtered by check)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Proc, Services, start_api, start_worker, wait_for_status
from tests.integration.test_audit_helpers import (
    Isolated,
    add_character,
    add_scene,
    add_st,
    character_rows,
    constraints_off,
    isolated,
    warden,
    wipe,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def iso(services: Services) -> Iterator[Isolated]:
    with isolated(services) as found:
        yield found


@pytest.fixture(scope="module")
def node(services: Services, iso: Isolated) -> Iterator[Proc]:
    proc = start_worker(services, "audit", env=iso.overrides())
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def api(services: Services, iso: Isolated) -> Iterator[str]:
    proc, url = start_api(services, env=iso.overrides())
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def tokens(iso: Isolated) -> dict[str, str]:
    """Tokens in the isolated database (the API there checks against it)."""
    return {"read": iso.token("read"), "enqueue": iso.token("enqueue", "read"),
            "admin": iso.token("admin")}


@pytest.fixture
def conn(iso: Isolated) -> Iterator[psycopg.Connection[Any]]:
    with iso.connect() as c:
        wipe(c)
        yield c


def _fixable(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Violations that all have an automatic fix: 3 XP, 2 strength, 1 duplicate ST row."""
    ids = {}
    with constraints_off(conn):
        for n in range(3):
            ids[f"xp{n}"] = add_character(conn, xp=-1 - n)
        for n in range(2):
            ids[f"str{n}"] = add_character(conn, strength=11 + n)
        add_character(conn)
        add_st(conn, 1, 1, "mage")
        ids["dup"] = add_st(conn, 1, 1, "mage")
    return ids


def test_exit_codes_say_clean_findings_or_error(
        conn: psycopg.Connection[Any], iso: Isolated, node: Proc) -> None:
    # given fixable violations
    _fixable(conn)
    before = character_rows(conn)
    # when the audit runs: findings remain -> exit 1, and a summary per check
    checked = warden(iso, "audit")
    assert checked.returncode == 1, checked.stderr
    assert "findings=6 fixed=0 remaining=6" in checked.stdout
    assert "negative_xp" in checked.stdout and "findings=3" in checked.stdout
    # when it fixes them: nothing remains -> exit 0, with the undo command named
    fixed = warden(iso, "audit", "--fix", "--reason", "test")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "fixed=6 remaining=0" in fixed.stdout
    run_id = int(fixed.stdout.split("warden audit undo ")[1].split()[0])
    # a clean database -> exit 0
    clean = warden(iso, "audit")
    assert (clean.returncode, "findings=0" in clean.stdout) == (0, True)
    # when the fix is undone (nothing changed since): exit 0, the data as it was
    undone = warden(iso, "audit", "undo", str(run_id))
    assert undone.returncode == 0, undone.stderr
    assert f"audit run {run_id}: 6 row(s) reverted" in undone.stdout
    assert character_rows(conn) == before
    assert warden(iso, "audit").returncode == 1
    # errors -> exit 2 with one line: an unknown run, a second undo, no database
    for args, env, message in (
        (("audit", "undo", "999999"), {}, "no audit run 999999"),
        (("audit", "undo", str(run_id)), {}, "already undone"),
        (("audit",), {"WARDEN_DATABASE_URL": "postgresql://x@127.0.0.1:1/none"},
         "database unreachable"),
    ):
        out = warden(iso, *args, **env)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_json_prints_the_stored_run_and_verbose_its_findings(
        conn: psycopg.Connection[Any], iso: Isolated, node: Proc, api: str,
        tokens: dict[str, str]) -> None:
    # given fixable violations, audited for one check with --json --verbose
    ids = _fixable(conn)
    out = warden(iso, "audit", "--json", "--verbose", "--check", "negative_xp")
    assert out.returncode == 1, out.stderr
    printed = json.loads(out.stdout)
    # then it is the stored run, as the API serves it, with that check's findings
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {tokens['read']}"}) as c:
        served = c.get(f"/v1/audits/{printed['run']['id']}").json()
    findings = printed["findings"]
    assert printed["run"] == served["run"]
    assert printed["run"]["checks"] == ["negative_xp"]
    assert findings == served["findings"]["items"]
    # and `warden audit show` prints the same; --json without --verbose, the run alone
    shown = json.loads(warden(iso, "audit", "show", str(served["run"]["id"]), "--json").stdout)
    assert shown == printed
    alone = json.loads(warden(iso, "audit", "--json", "--check", "negative_xp").stdout)
    assert alone["id"] == printed["run"]["id"] + 1 and alone["findings"] == 3
    assert sorted((f["entity_id"], f["value"], f["fix"]) for f in findings) == [
        (ids["xp0"], -1, 0), (ids["xp1"], -2, 0), (ids["xp2"], -3, 0)]


def test_the_api_pages_findings_by_cursor_and_filters_by_check(
        conn: psycopg.Connection[Any], iso: Isolated, node: Proc, api: str,
        tokens: dict[str, str]) -> None:
    # given a fix run over six findings of two checks and a duplicate triple
    _fixable(conn)
    run_id = json.loads(warden(iso, "audit", "--fix", "--reason", "test", "--json").stdout)["id"]
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {tokens['read']}"}) as c:
        # when a client pages through them two at a time
        seen, cursor, pages = [], None, 0
        while True:
            params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = c.get(f"/v1/audits/{run_id}", params=params).json()["findings"]
            seen += page["items"]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        # then it gets every finding once, ordered by check, then id
        keys = [(f["check"], f["id"]) for f in seen]
        assert keys == sorted(set(keys))
        assert len(seen) == 6 and pages == 3
        assert {f["outcome"] for f in seen} == {"fixed"}
        # and a filter by check returns only that check's
        only = c.get(f"/v1/audits/{run_id}", params={"check": "attribute_range"}).json()
        assert [f["field"] for f in only["findings"]["items"]] == ["strength", "strength"]
        # and the run is listed, with its changed rows before/after
        listed = c.get("/v1/audits").json()
        assert run_id in [r["id"] for r in listed["items"]]
        changes = c.get(f"/v1/audits/{run_id}/changes").json()["items"]
        assert len(changes) == 6
        assert {(ch["action"], json.dumps(ch["after"])) for ch in changes
                if ch["entity"] == "st_relationship"} == {("delete", "null")}
        # bad input is a 422 naming the field; an unknown run a 404
        bad = c.get(f"/v1/audits/{run_id}", params={"cursor": "nope"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "cursor"]
        bad = c.get(f"/v1/audits/{run_id}", params={"check": "nope"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "check"]
        assert c.get("/v1/audits/999999").status_code == 404
    assert httpx.get(f"{api}/v1/audits").status_code == 401


def test_an_audit_job_submitted_over_the_api_is_stored(
        conn: psycopg.Connection[Any], node: Proc, api: str, tokens: dict[str, str]) -> None:
    from tests.conftest import wait_for_status

    _fixable(conn)
    with httpx.Client(base_url=api, headers={"Authorization":
                                             f"Bearer {tokens['enqueue']}"}) as c:
        bad = c.post("/v1/jobs", json={"type": "audit.integrity", "params": {"checks": ["x"]}})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"][:3] == ["body", "params", "checks"]
        job = c.post("/v1/jobs", json={"type": "audit.integrity",
                                       "params": {"checks": ["duplicate_st_relationships"]}})
        assert job.status_code == 202, job.text
        done = wait_for_status(job.json()["id"], {"succeeded", "failed", "dead"}, timeout=60)
    assert done["status"] == "succeeded", done
    assert done["result"]["findings"] == 1 and done["result"]["remaining"] == 1


def test_a_fix_without_a_reason_is_refused_by_the_cli_and_the_api(
        conn: psycopg.Connection[Any], iso: Isolated, node: Proc, api: str,
        tokens: dict[str, str]) -> None:
    # given fixable violations
    _fixable(conn)
    before = character_rows(conn)
    fixes = ("SELECT count(*) FROM job_runs WHERE type = 'audit.integrity' "
             "AND params->>'fix' = 'true'")
    fix_jobs = conn.execute(fixes).fetchone()
    # when an operator asks for a fix without saying why: one line, exit 2, nothing queued
    for args in (("audit", "--fix"), ("audit", "--fix", "--reason", " "),
                 ("audit", "--fix", "--inline")):
        out = warden(iso, *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert out.stderr.strip().splitlines() == [
            "error: --fix is an operator action: give --reason WHY (recorded in the operator "
            "log)"], args
    # and over the API an audit.integrity job with fix=true and no reason is a 422 naming
    # the field
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {tokens['admin']}"}) as c:
        bad = c.post("/v1/jobs", json={"type": "audit.integrity", "params": {"fix": True}})
        assert bad.status_code == 422, bad.text
        assert bad.json()["detail"][0]["loc"][:3] == ["body", "params", "reason"]
        assert "reason" in bad.json()["detail"][0]["msg"]
    assert character_rows(conn) == before
    assert conn.execute(fixes).fetchone() == fix_jobs
    # when the API's fix has a reason, the operator log names the token, not the client's
    # word, and the reason
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {tokens['admin']}"}) as c:
        job = c.post("/v1/jobs", json={"type": "audit.integrity", "params": {
            "fix": True, "reason": "nightly findings reviewed", "actor": "someone-else"}})
        assert job.status_code == 202, job.text
        done = wait_for_status(job.json()["id"], {"succeeded", "failed", "dead"}, timeout=60)
    assert done["status"] == "succeeded", done
    token_name = conn.execute("SELECT name FROM api_tokens WHERE name LIKE 't-admin-%'"
                              ).fetchone()
    log = conn.execute("SELECT actor, action, reason, count FROM operator_log").fetchall()
    assert log == [(token_name[0] if token_name else None, "audit.fix",
                    "nightly findings reviewed", 6)]


def test_an_award_blocked_by_a_legacy_violation_names_it_and_the_fix_gives_it(
        conn: psycopg.Connection[Any], iso: Isolated, node: Proc) -> None:
    # given a finished scene awaiting XP; one participant has a legacy rule violation
    with constraints_off(conn):
        legacy = add_character(conn, dexterity=0)
    clean = add_character(conn, xp=2)
    scene = add_scene(conn, finished=True, xp_given=False)
    conn.execute("INSERT INTO scene_participants (scene_id, character_id) VALUES (%s, %s), "
                 "(%s, %s)", (scene, legacy, scene, clean))
    # when a storyteller awards the scene
    out = warden(iso, "enqueue", "xp.award_scene", "-p", f"scene_id={scene}", "-p",
                 f'awards={{"{legacy}": true, "{clean}": true}}', "--wait", "--timeout", "60")
    # then the job fails once, cleanly, with a domain code naming the character, the rule
    # and what to do; it is not retried and nothing was given
    assert out.returncode == 1, out.stdout + out.stderr
    job = json.loads(out.stdout)
    row = conn.execute("SELECT status, error_code, error_message, attempts FROM job_runs "
                       "WHERE id = %s", (job["id"],)).fetchone()
    assert row is not None
    assert row[:2] == ("failed", "character_rule_violation"), row
    assert f"character {legacy} breaks rule dexterity_range" in row[2], row[2]
    assert "warden audit --fix" in row[2], row[2]
    assert row[3] == 1
    assert {r["xp"] for r in character_rows(conn).values()} == {0, 2}
    # when the operator runs the fix: it fixes the character and runs the storyteller's
    # award again (its own awards: the storyteller chose who earned XP), queueing no other
    fixed = warden(iso, "audit", "--fix", "--reason", "D4: legacy dexterity")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "award_submitted=1" in fixed.stdout
    awards = conn.execute("SELECT id FROM job_runs WHERE type = 'xp.award_scene'").fetchall()
    assert [str(a[0]) for a in awards] == [job["id"]]
    done = wait_for_status(job["id"], {"succeeded", "failed", "dead"}, timeout=60)
    assert (done["status"], done["manual_retries"]) == ("succeeded", 1), done
    # then both got the scene's XP, and the audit finds nothing left, not even a report
    rows = character_rows(conn)
    assert (rows[legacy]["dexterity"], rows[legacy]["xp"], rows[clean]["xp"]) == (1, 1, 3)
    again = warden(iso, "audit")
    assert again.returncode == 0, again.stdout
    assert "findings=0" in again.stdout and "reports=" not in again.stdout
