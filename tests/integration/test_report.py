"""The health report of DOMAIN.md on crafted data sets whose scores are computed by hand:
each penalty alone, all together, the empty period; and its stored history."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tasks.reports import service
from tests.conftest import Services
from tests.integration.test_audit_helpers import (
    Isolated,
    add_character,
    add_scene,
    constraints_off,
    isolated,
    wipe,
)
from workers.db import session_scope


@pytest.fixture(scope="module")
def iso(services: Services) -> Iterator[Isolated]:
    with isolated(services) as found:
        yield found


@pytest.fixture
def conn(iso: Isolated) -> Iterator[psycopg.Connection[Any]]:
    with iso.connect() as c:
        wipe(c)
        yield c


def _report(period: int = 24) -> dict[str, Any]:
    with session_scope() as s:
        return service.build_report(s, period)


def _decisions(conn: psycopg.Connection[Any], character_id: int, approved: int, denied: int,
               *, hours_ago: float = 1, pending: int = 0) -> None:
    """Spend requests created and decided `hours_ago`, and some still pending."""
    for state, n in (("Approved", approved), ("Denied", denied), ("Pending", pending)):
        for _ in range(n):
            conn.execute(
                "INSERT INTO xp_spend_requests (character_id, trait_name, trait_type, "
                "trait_value, cost, state, created_at, decided_at) VALUES (%s, 'brawl', "
                "'ability', 2, 2, %s, now() - make_interval(secs => %s), "
                "CASE WHEN %s <> 'Pending' THEN now() - make_interval(secs => %s) END)",
                (character_id, state, hours_ago * 3600, state, hours_ago * 3600))


def _awaiting(conn: psycopg.Connection[Any], n: int, days_ago: int = 0) -> None:
    for _ in range(n):
        add_scene(conn, finished=True, xp_given=False, days_ago=days_ago)


def _findings(conn: psycopg.Connection[Any], n: int) -> None:
    with constraints_off(conn):
        for _ in range(n):
            add_character(conn, xp=-1)


def _score(report: dict[str, Any]) -> tuple[int, str, int, int, int]:
    c = report["checks"]
    return (report["health_score"], report["status"], c["data_integrity"]["penalty"],
            c["xp_activity"]["penalty"], c["scene_xp_awards"]["penalty"])


def test_the_report_has_domain_md_s_shape(conn: psycopg.Connection[Any]) -> None:
    cid = add_character(conn, xp=4, status="App")
    add_character(conn, xp=8, status="Sub")
    _decisions(conn, cid, approved=2, denied=1, pending=1)
    add_scene(conn, finished=True, xp_given=True)
    report = _report()
    assert set(report) == {"timestamp", "period_hours", "checks", "health_score", "status"}
    assert set(report["checks"]) == {"data_integrity", "xp_activity", "scene_xp_awards",
                                     "character_stats"}
    assert report["period_hours"] == 24
    xp = report["checks"]["xp_activity"]
    assert xp["requests"] == {"Pending": 1, "Approved": 2, "Denied": 1}
    assert (xp["decisions"], xp["approval_rate"]) == (3, 0.6667)
    assert report["checks"]["scene_xp_awards"] == {"finished": 1, "awarded": 1, "awaiting": 0,
                                                   "penalty": 0}
    stats = report["checks"]["character_stats"]
    assert (stats["total"], stats["by_status"]["App"], stats["by_status"]["Sub"]) == (2, 1, 1)
    assert stats["average_xp"] == 6.0


def test_no_data_scores_100_and_no_decision_means_no_approval_penalty(
        conn: psycopg.Connection[Any]) -> None:
    report = _report()
    assert _score(report) == (100, "healthy", 0, 0, 0)
    assert report["checks"]["xp_activity"]["approval_rate"] is None


def test_activity_outside_the_period_counts_for_nothing(conn: psycopg.Connection[Any]) -> None:
    # given a bad week: 0% approval and 15 scenes awaiting XP, all two days ago
    cid = add_character(conn)
    _decisions(conn, cid, approved=0, denied=5, hours_ago=48)
    _awaiting(conn, 15, days_ago=3)
    # then a 24-hour report sees an empty period: no decisions, no scenes played; the 15
    # scenes still await XP (a state, whenever played: the scenes penalty)
    day = _report(24)
    assert _score(day) == (90, "healthy", 0, 0, 10)
    assert day["checks"]["xp_activity"]["decisions"] == 0
    assert day["checks"]["xp_activity"]["requests"] == {"Pending": 0, "Approved": 0,
                                                        "Denied": 0}
    assert day["checks"]["scene_xp_awards"] == {"finished": 0, "awarded": 0, "awaiting": 15,
                                                "penalty": 10}
    # and a week-long report sees both: 100 - 10 - 10
    week = _report(24 * 7)
    assert _score(week) == (80, "degraded", 0, 10, 10)
    assert week["checks"]["xp_activity"]["requests"] == {"Pending": 0, "Approved": 0,
                                                         "Denied": 5}
    assert week["checks"]["scene_xp_awards"]["finished"] == 15


@pytest.mark.parametrize(("findings", "expected"), [
    (1, (95, "healthy", 5, 0, 0)),  # 100 - 5 x 1
    (2, (90, "healthy", 10, 0, 0)),  # 100 - 5 x 2: 90 is still healthy
    (3, (85, "degraded", 15, 0, 0)),  # 100 - 5 x 3
    (11, (50, "degraded", 50, 0, 0)),  # min(5 x 11, 50) = 50
])
def test_the_findings_penalty_alone(conn: psycopg.Connection[Any], findings: int,
                                    expected: tuple[int, str, int, int, int]) -> None:
    _findings(conn, findings)
    report = _report()
    assert report["checks"]["data_integrity"]["findings"] == findings
    assert report["checks"]["data_integrity"]["by_check"]["negative_xp"] == findings
    assert _score(report) == expected


@pytest.mark.parametrize(("approved", "denied", "expected"), [
    (8, 2, (100, "healthy", 0, 0, 0)),  # 80% is not below 80%
    (7, 3, (90, "healthy", 0, 10, 0)),  # 70% < 80%: 100 - 10
    (0, 1, (90, "healthy", 0, 10, 0)),  # one decision, a denial
])
def test_the_approval_penalty_alone(conn: psycopg.Connection[Any], approved: int, denied: int,
                                    expected: tuple[int, str, int, int, int]) -> None:
    cid = add_character(conn)
    _decisions(conn, cid, approved=approved, denied=denied, pending=4)
    assert _score(_report()) == expected


@pytest.mark.parametrize(("awaiting", "expected"), [
    (10, (100, "healthy", 0, 0, 0)),  # 10 is not more than 10
    (11, (90, "healthy", 0, 0, 10)),  # 100 - 10
])
def test_the_scenes_penalty_alone(conn: psycopg.Connection[Any], awaiting: int,
                                  expected: tuple[int, str, int, int, int]) -> None:
    _awaiting(conn, awaiting)
    report = _report()
    assert report["checks"]["scene_xp_awards"]["awaiting"] == awaiting
    assert _score(report) == expected


def test_all_penalties_together(conn: psycopg.Connection[Any]) -> None:
    # given 3 findings (-15), 50% approval (-10) and 12 scenes awaiting XP (-10)
    _findings(conn, 3)
    cid = add_character(conn)
    _decisions(conn, cid, approved=1, denied=1)
    _awaiting(conn, 12)
    # then 100 - 15 - 10 - 10 = 65
    assert _score(_report()) == (65, "degraded", 15, 10, 10)
    # and with every penalty at its largest: 100 - 50 - 10 - 10 = 30
    _findings(conn, 20)
    assert _score(_report()) == (30, "degraded", 50, 10, 10)


def test_the_score_function_floors_at_zero() -> None:
    assert service.score(findings=0, decisions=0, approved=0, awaiting=0).value == 100
    assert service.score(findings=10**6, decisions=3, approved=0, awaiting=99).value == 30
    s = service.score(findings=1, decisions=5, approved=3, awaiting=11)
    assert (s.value, s.status) == (75, "degraded")


def test_reports_are_stored_with_their_history(conn: psycopg.Connection[Any]) -> None:
    # given a healthy report, then a degraded one
    with session_scope() as s:
        first = service.create_report(s, 24, job_id=None, alert=True, webhook_configured=True)
    _findings(conn, 4)
    with session_scope() as s:
        second = service.create_report(s, 24, job_id=None, alert=True,
                                       webhook_configured=False)
        muted = service.create_report(s, 24, job_id=None, alert=False,
                                      webhook_configured=True)
    # then each is stored, with whether it must alert
    assert (first["status"], first["alert_state"]) == ("healthy", "none")
    assert (second["status"], second["alert_state"]) == ("degraded", "no_webhook")
    assert muted["alert_state"] == "not_requested"
    assert second["report"]["health_score"] == second["health_score"] == 80
    # and the history lists them newest first
    with session_scope() as s:
        listed = service.history(s, limit=10)
    assert [r["id"] for r in listed] == [muted["id"], second["id"], first["id"]]


def test_a_job_stores_one_report_however_often_it_runs(conn: psycopg.Connection[Any]) -> None:
    # given a report made for a job
    job = "5d1f1c3e-8e0a-4a51-9a57-0f3f5c0e0002"
    with session_scope() as s:
        first = service.create_report(s, 24, job_id=job, alert=True, webhook_configured=True)
    # when the job runs again after the data changed
    _findings(conn, 5)
    with session_scope() as s:
        again = service.create_report(s, 24, job_id=job, alert=True, webhook_configured=True)
    # then it returns the report it made, and there is one
    assert again == first and again["health_score"] == 100
    assert conn.execute("SELECT count(*) FROM health_reports").fetchone() == (1,)


def test_scenes_awaiting_xp_are_what_the_audit_counts_whenever_played(
        conn: psycopg.Connection[Any]) -> None:
    """Drill D5: the health page said "Scenes awaiting XP 0" while the audit counted 251."""
    from tasks.audits import service as audits

    # given finished scenes not given XP, played today, 3 days ago and a year ago
    _awaiting(conn, 2)
    _awaiting(conn, 3, days_ago=3)
    _awaiting(conn, 4, days_ago=365)
    add_scene(conn, finished=True, xp_given=True, days_ago=3)
    # when the audit runs and a 24-hour report is made
    with session_scope() as s:
        run = audits.run_audit(s, check_names=["scene_xp"])
    audited = run["totals"]["scene_xp"]["reports"]
    report = _report(24)
    # then both count the same 9 scenes
    assert audited == 9, run["totals"]
    assert report["checks"]["scene_xp_awards"]["awaiting"] == audited
    # while the period's own figures stay the period's
    assert report["checks"]["scene_xp_awards"]["finished"] == 2


def test_the_cli_text_says_which_requests_and_decisions_it_counts(
        iso: Isolated, conn: psycopg.Connection[Any]) -> None:
    """Drill D5: "requests={'Denied': 0 ...} decisions=14 approval_rate=85.7%" read as a
    contradiction: the decisions were made in the period on requests created before it."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    # given 3 requests created 3 days ago and decided an hour ago, and one created today
    cid = add_character(conn)
    for state in ("Approved", "Approved", "Denied"):
        conn.execute("INSERT INTO xp_spend_requests (character_id, trait_name, trait_type, "
                     "trait_value, cost, state, created_at, decided_at) VALUES (%s, 'brawl', "
                     "'ability', 2, 2, %s, now() - interval '3 days', now() - interval "
                     "'1 hour')", (cid, state))
    _decisions(conn, cid, approved=0, denied=0, pending=1)
    # when the report is printed
    out = subprocess.run([sys.executable, "-m", "cli.main", "report", "--inline"], cwd=ROOT,
                         env=iso.env(), capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 1), out.stderr
    line = next(x for x in out.stdout.splitlines() if "xp_activity" in x)
    # then it names both populations, and they add up as read
    assert "requests created in the period: Approved=0 Denied=0 Pending=1" in line, line
    assert "decided in the period: 3 (approved 2, denied 1), approval_rate=66.7%" in line, line
