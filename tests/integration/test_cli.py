"""The `warden` command as an operator uses it: one clear line and a non-zero exit on error."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from tests.conftest import ROOT, Proc, Services


def warden(services: Services, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, text=True,
                          capture_output=True, env=services.env(**env), timeout=120)


def test_enqueue_wait_prints_the_result(services: Services, worker: Proc) -> None:
    out = warden(services, "enqueue", "platform.ping", "--param", "echo=cli", "--wait")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert (job["status"], job["result"]["echo"], job["source"]) == ("succeeded", "cli", "cli")
    shown = warden(services, "job", job["id"])
    assert json.loads(shown.stdout)["id"] == job["id"]
    listed = warden(services, "jobs", "--type", "platform.ping")
    assert job["id"] in listed.stdout


def test_errors_are_one_line_and_nonzero(services: Services) -> None:
    cases = [
        (("enqueue", "nope.nothing"), "unknown job type 'nope.nothing'"),
        (("enqueue", "platform.ping", "--param", "echo=[1]"), "param echo"),
        (("enqueue", "platform.ping", "--param", "noequals"), "key=value"),
        (("job", "not-a-uuid"), "is not a job id"),
        (("job", str(uuid.uuid4())), "no job"),
        (("retry", str(uuid.uuid4()), "--reason", "x"), "no job"),
        (("retry", str(uuid.uuid4())), "Missing option '--reason'"),
        (("retry", "--reason", "x"), "give a job id, or a filter"),
        (("cancel", "--status", "dead", "--reason", "x"), "cancel applies to"),
        (("token", "create", "--name", "x", "--scopes", "root"), "scopes must be"),
    ]
    for args, message in cases:
        out = warden(services, *args)
        assert out.returncode != 0, args
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, (args, out.stderr)
        assert lines[0].startswith("error: ") and message in lines[0], (args, lines)


def test_retry_refuses_a_job_that_is_not_failed(services: Services) -> None:
    queued = json.loads(warden(services, "enqueue", "platform.ping", "--countdown", "600").stdout)
    out = warden(services, "retry", queued["id"], "--reason", "test")
    assert out.returncode == 1
    assert "only failed or dead jobs can be retried" in out.stderr


def test_unreachable_database_and_bad_setting_are_clear(services: Services) -> None:
    down = warden(services, "jobs", WARDEN_DATABASE_URL="postgresql://x@127.0.0.1:1/none")
    assert down.returncode == 1
    assert down.stderr.startswith("error: database unreachable")
    bad = warden(services, "jobs", WARDEN_API_PORT="not-a-port")
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("error: invalid setting WARDEN_API_PORT")


def test_token_create_prints_a_token_that_works_once_stored_hashed(
    services: Services, db: object
) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    out = warden(services, "token", "create", "--name", name, "--scopes", "enqueue,read")
    token = out.stdout.strip()
    assert out.returncode == 0 and token.startswith("wdn_")
    row = db.execute("SELECT token_hash, scopes FROM api_tokens WHERE name=%s",  # type: ignore[attr-defined]
                     (name,)).fetchone()
    assert row[0] != token and len(row[0]) == 64
    assert sorted(row[1]) == ["enqueue", "read"]
    again = warden(services, "token", "create", "--name", name)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_celery_cli_works_on_the_app(services: Services, worker: Proc) -> None:
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "workers.app", "inspect",
                          "ping", "--timeout", "5"], cwd=ROOT, text=True, capture_output=True,
                         env=services.env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pong" in out.stdout


def test_bad_input_is_refused_at_once_and_leaves_nothing_behind(services: Services) -> None:
    """Drill D9: each of these used to exit 0 (an empty list, a sweep of no character, a
    database created with that name) or leave a failed job in the job list."""
    import psycopg

    def count(sql: str, *args: object) -> int:
        with psycopg.connect(services.database_url, autocommit=True) as conn:
            row = conn.execute(sql, args).fetchone()
        assert row is not None
        return int(row[0])

    jobs_sql = "SELECT count(*) FROM job_runs WHERE type IN ('backup.verify', " \
               "'validation.characters')"
    before = count(jobs_sql)
    cases = [
        (("jobs", "--status", "bogus"), 2, "'bogus' is not a job status; one of: queued"),
        (("validate", "--character", "999999"), 2, "no character 999999"),
        (("restore", "1", "--target-db", "bad name;drop"), 2, "not a plain database name"),
        (("backup", "verify", "99"), 1, "no backup 99"),
        (("backup", "verify", "99", "--wait"), 1, "no backup 99"),
    ]
    for args, code, message in cases:
        out = warden(services, *args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == code, (args, out.returncode, out.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, out.stderr)
        assert message in lines[0], (args, lines)
        assert out.stdout == "", (args, out.stdout)
    # and nothing was left behind: no job submitted, no database created
    assert count(jobs_sql) == before
    assert count("SELECT count(*) FROM pg_database WHERE datname = 'bad name;drop'") == 0
    # while a good status still lists
    assert warden(services, "jobs", "--status", "failed").returncode == 0
