"""The restore drill as an operator runs it, with real processes (review 2026-12-07, D1 and
D3): seed, back up, restore into a new database, audit the copy inline, find the live
database untouched, then fix the live one with a reason, undo it, and find both in the
operator log (`warden oplog` and the /ui page).

Every step is the `warden` command in a process of its own, against a worker and an API
of this test's own database (a broker prefix of its own, so no other test's worker takes
its jobs).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import ROOT, Services, fresh_database, start_api, start_worker

pytestmark = pytest.mark.slow

# What the drill must leave alone on the live database: the data and everything the audit
# and the operator log write.
WATCHED = ("characters", "scenes", "scene_participants", "st_relationships", "xp_ledger",
           "audit_runs", "audit_findings", "audit_changes", "operator_log")


def _content(url: str) -> dict[str, list[str]]:
    with psycopg.connect(url) as conn:
        return {t: [r[0] for r in conn.execute(f"SELECT x::text FROM {t} x ORDER BY 1")]
                for t in WATCHED}


def _ledger_gaps(url: str) -> set[int]:
    """Characters whose xp is not their XP ledger's sum (the demo seeds a few on purpose)."""
    with psycopg.connect(url) as conn:
        return {int(r[0]) for r in conn.execute(
            "SELECT c.id FROM characters c LEFT JOIN xp_ledger l ON l.character_id = c.id "
            "GROUP BY c.id, c.xp HAVING c.xp <> coalesce(sum(l.delta), 0)")}


@pytest.fixture
def live(services: Services, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The live deployment's env: a database, a backup directory, a broker prefix."""
    with fresh_database(services) as url:
        copy = f"{url.rsplit('/', 1)[1]}_drill"
        yield services.env(WARDEN_DATABASE_URL=url, WARDEN_BACKUP_DIR=str(tmp_path / "bk"),
                           WARDEN_BROKER_KEY_PREFIX=f"drill-{uuid.uuid4().hex[:8]}:",
                           WARDEN_ENV="dev", DRILL_COPY=copy)
        with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{copy}" WITH (FORCE)')


def warden(env: dict[str, str], *args: str, timeout: float = 300
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _ok(done: subprocess.CompletedProcess[str], *codes: int) -> str:
    assert done.returncode in (codes or (0,)), (done.args, done.stdout, done.stderr)
    return done.stdout


def _ui_oplog(base: str, token: str) -> str:
    """The /ui operator log page, logged in through the form as a browser would."""
    with httpx.Client(base_url=base, timeout=30, follow_redirects=False) as ui:
        form = ui.get("/ui/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert csrf, form.text[:500]
        r = ui.post("/ui/login", data={"token": token, "csrf": csrf.group(1),
                                       "next": "/ui/oplog"})
        assert r.status_code == 303, r.text
        page = ui.get("/ui/oplog")
        assert page.status_code == 200, page.text[:500]
        return page.text


def test_restore_drill_audits_the_copy_and_fix_and_undo_are_in_the_operator_log(
        services: Services, live: dict[str, str]) -> None:
    url, copy_name = live["WARDEN_DATABASE_URL"], live["DRILL_COPY"]
    copy = {**live, "WARDEN_DATABASE_URL": url.rsplit("/", 1)[0] + f"/{copy_name}"}
    worker = start_worker(services, "drill", env={k: v for k, v in live.items()
                                                  if k.startswith("WARDEN_")})
    api = None
    try:
        # given seeded data with rule violations, and a backup of it
        _ok(warden(live, "seed", "--characters", "80", "--violations", "0.1"))
        made = _ok(warden(live, "backup", "create", "--wait", "--no-verify", "--timeout",
                          "120"))
        backup_id = json.loads(made)["result"]["backup_id"]
        # when it is restored into a new database and the copy is audited inline
        _ok(warden(live, "restore", str(backup_id), "--target-db", copy_name))
        before = _content(url)
        audited = warden(copy, "audit", "--inline")
        # then the copy's audit finds the seeded violations and is stored in the copy
        out = _ok(audited, 1)
        run_id = int(out.split()[2])
        with psycopg.connect(copy["WARDEN_DATABASE_URL"]) as conn:
            stored = conn.execute("SELECT mode, findings FROM audit_runs WHERE id = %s",
                                  (run_id,)).fetchone()
        assert stored is not None and stored[0] == "check" and stored[1] > 0
        # and the live database is untouched
        assert _content(url) == before
        # when the live database is fixed, with a reason, through its worker
        gaps = _ledger_gaps(url)
        fixed = _ok(warden(live, "audit", "--fix", "--reason", "drill: fix the seeded rows",
                           "--timeout", "120"), 0, 1)
        fix_run = int(fixed.split("warden audit undo ")[1].split()[0])
        # then xp is still its ledger's sum wherever it was before (N16)
        assert _ledger_gaps(url) == gaps
        # when the fix is undone
        _ok(warden(live, "audit", "undo", str(fix_run), "--reason", "drill: put them back"),
            0, 1)
        assert _ledger_gaps(url) == gaps
        # then the operator log holds both, with who and why
        entries = [json.loads(line) for line in
                   _ok(warden(live, "oplog", "--json")).splitlines()]
        mine = [(e["action"], e["target"], e["reason"]) for e in entries
                if e["action"].startswith("audit.")]
        assert sorted(mine) == sorted([
            ("audit.fix", f"audit_run:{fix_run}", "drill: fix the seeded rows"),
            ("audit.undo", f"audit_run:{fix_run}", "drill: put them back")])
        assert {e["actor"] for e in entries if e["action"].startswith("audit.")} == {
            f"cli:{_login()}"}
        # and so does the operations page
        token = _ok(warden(live, "token", "create", "--name", "drill", "--scopes", "read"))
        api, base = start_api(services, env={k: v for k, v in live.items()
                                             if k.startswith("WARDEN_")})
        page = _ui_oplog(base, token.strip())
        for text in ("audit.fix", "audit.undo", "drill: fix the seeded rows",
                     "drill: put them back"):
            assert text in page, text
        # and the copy still holds only its own check run
        with psycopg.connect(copy["WARDEN_DATABASE_URL"]) as conn:
            assert conn.execute("SELECT count(*) FROM operator_log WHERE action LIKE 'audit.%'"
                                ).fetchone() == (0,)
    finally:
        if api is not None:
            api.stop()
        worker.stop()


def _login() -> str:
    import getpass

    return getpass.getuser()

