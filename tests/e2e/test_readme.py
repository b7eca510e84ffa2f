"""The README's shell examples run as written (issue 14, point 12; drill D7: the retry example
had no body and got a 422 that did not mention `reason`).

Every ```sh block of README.md runs in bash against a live deployment of its own (the real
API with its relay, a real worker), from a folder whose `.warden/admin-token` holds an admin
token, exactly as `make up` leaves it. Only the placeholders are filled in (`<id>`,
`<failed-id>`, `<queued-id>`, `<backup-id>`), the API's port (the README's 8000) and the
restore's database name (unique on a shared server). Each `curl` must get a 2xx and each
`warden` command exit 0 (1 only where the README says it means findings or degraded), with
no `error:` line. The two blocks that start the stack itself or a deployment's long-running
processes are listed in SETUP and not run: `make up` is tests/e2e/test_up.py's, and the
rest of their commands are the ones this test starts.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import ROOT, Isolated, Services, isolated, start_api, start_worker
from workers.tokens import hash_token

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
ADMIN = "wdn_readme-admin-token-0123456789"
# The first line of each block that is not run, and why.
SETUP = {
    "make up": "starts the stack (tests/e2e/test_up.py)",
    "export WARDEN_DATABASE_URL=postgresql://warden:secret@db.internal:5432/warden":
        "a deployment's long-running processes (this test starts the API and a worker)",
}
# `warden` commands whose exit 1 the README documents as a result, not an error.
EXIT_1_IS_A_RESULT = {"audit", "validate", "report"}


def shell_blocks(text: str) -> list[str]:
    """The ```sh blocks of a Markdown text, in order."""
    return [m.group(1) for m in re.finditer(r"^```sh\n(.*?)^```", text, re.S | re.M)]


def commands(block: str) -> list[str]:
    """The `curl` and `warden` commands of a block (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines()
            if line.strip().startswith(("curl ", "warden "))]


@pytest.fixture(scope="module")
def stack(services: Services, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[Isolated, str, Path, dict[str, str]]]:
    """A deployment of its own with demo characters, an API, a worker, and a folder laid out
    as `make up` leaves it (`.warden/admin-token`)."""
    tmp = tmp_path_factory.mktemp("readme")
    with isolated(services, tmp) as iso:
        with psycopg.connect(iso.database_url, autocommit=True) as conn:
            conn.execute("INSERT INTO api_tokens (name, token_hash, scopes) "
                         "VALUES ('readme-admin', %s, '{admin}')", (hash_token(ADMIN),))
        (tmp / ".warden").mkdir()
        (tmp / ".warden" / "admin-token").write_text(ADMIN + "\n")
        env = services.env(**iso.env, WARDEN_DATA_DIR=str(tmp / "data"),
                           PYTHONPATH=str(ROOT))
        seeded = subprocess.run([sys.executable, "-m", "cli.main", "seed", "--characters", "40"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert seeded.returncode == 0, seeded.stderr
        worker = start_worker(services, "readme", env={**iso.env,
                                                       "WARDEN_DATA_DIR": str(tmp / "data")})
        api, base = start_api(services, env={**iso.env, "WARDEN_DATA_DIR": str(tmp / "data")})
        try:
            # a backup for `warden restore <backup-id>` (the README's own `backup create`
            # runs in the same block, after the ids are filled in)
            made = subprocess.run([sys.executable, "-m", "cli.main", "backup", "create",
                                   "--wait", "--no-verify", "--timeout", "120"], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=180)
            assert made.returncode == 0, made.stderr
            yield iso, base, tmp, env
        finally:
            api.stop()
            worker.stop()


def _placeholders(iso: Isolated) -> dict[str, str]:
    """A job for each placeholder, in the state its example needs."""
    done = iso.insert_job("platform.ping", {"echo": "readme"})
    failed = iso.insert_job("platform.ping", {"echo": "failed"})
    queued = iso.insert_job("platform.ping", {"echo": "queued"})
    with psycopg.connect(iso.database_url, autocommit=True) as conn:
        conn.execute("UPDATE job_runs SET status = 'failed', attempts = 1, finished_at = now(), "
                     "published_at = now(), error_code = 'internal_error', "
                     "error_message = 'for the README' WHERE id = %s", (failed,))
        # far in the future: the worker leaves it queued
        conn.execute("UPDATE job_runs SET not_before = now() + interval '1 hour' "
                     "WHERE id = %s", (queued,))
    return {"<id>": done, "<failed-id>": failed, "<queued-id>": queued}


def _run(block: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    prelude = (
        "set -u\n"
        # each command reports its outcome on a line of its own; the block goes on
        "curl() { command curl -w '\\n__HTTP__ %{http_code}\\n' \"$@\"; "
        "echo \"__CURL__ $?\"; }\n"
        f"warden() {{ {sys.executable} -m cli.main \"$@\" 2>>\"$WARDEN_ERRLOG\"; "
        "echo \"__EXIT__ $? $1\"; }\n")
    return subprocess.run(["bash", "-c", prelude + block], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_every_shell_example_of_the_readme_runs_as_written(
    stack: tuple[Isolated, str, Path, dict[str, str]]
) -> None:
    iso, base, tmp, env = stack
    blocks = shell_blocks(README.read_text())
    skipped = [b for b in blocks if b.splitlines()[0] in SETUP]
    assert len(skipped) == len(SETUP), "a SETUP block is gone or was changed"
    port = base.rsplit(":", 1)[1]
    copy_db = f"warden_readme_{uuid.uuid4().hex[:8]}"
    fill = _placeholders(iso)
    with psycopg.connect(iso.database_url, autocommit=True) as conn:
        row = conn.execute("SELECT max(id) FROM backups").fetchone()
    assert row is not None and row[0] is not None
    fill["<backup-id>"] = str(row[0])
    # one shell, as a reader runs them: a block uses what an earlier one set ($TOKEN)
    runnable = [b for b in blocks if b not in skipped]
    script = ""
    for n, block in enumerate(runnable):
        for name, value in fill.items():
            block = block.replace(name, value)
        script += f"echo __BLOCK__ {n}\n" + (
            block.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            .replace("localhost:8000", f"127.0.0.1:{port}")
            .replace("warden_copy", copy_db))
    errlog = tmp / "stderr.log"
    errlog.write_text("")
    try:
        done = _run(script, tmp, {**env, "WARDEN_ERRLOG": str(errlog)})
    finally:
        with psycopg.connect(iso.database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{copy_db}" WITH (FORCE)')
    parts = re.split(r"^__BLOCK__ \d+$", done.stdout, flags=re.M)[1:]
    errors = errlog.read_text()
    context = f"\n--- script:\n{script}\n--- stdout:\n{done.stdout[-6000:]}\n--- stderr:\n" \
              f"{done.stderr[-2000:]}{errors[-3000:]}"
    assert len(parts) == len(runnable), context
    ran = 0
    for block, out in zip(runnable, parts, strict=True):
        wanted = commands(block)
        statuses = re.findall(r"^__HTTP__ (\d+)$", out, re.M)
        exits = re.findall(r"^__EXIT__ (\d+) (\S+)$", out, re.M)
        curls = re.findall(r"^__CURL__ (\d+)$", out, re.M)
        # then every command ran, each curl got a 2xx, each warden command succeeded
        assert len(statuses) + len(exits) == len(wanted), (block, context)
        assert all(c == "0" for c in curls), (block, context)
        assert all(s.startswith("2") for s in statuses), (block, statuses, context)
        for code, command in exits:
            allowed = {"0", "1"} if command in EXIT_1_IS_A_RESULT else {"0"}
            assert code in allowed, (command, code, context)
        ran += len(wanted)
    assert not re.search(r"^error:", errors, re.M), context
    assert ran >= 15, ran
