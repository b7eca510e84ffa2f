"""backup.create against a real PostgreSQL: the file, its manifest, the row, the tools.

Also home of the `backup_env` fixture the other backup test modules import: a migrated
database of its own (nothing else writes to it, so "the rows at backup time" are the rows
now) and a backup directory of its own, with this process's settings pointed at both.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.conftest import Services, _apply_env, fresh_database


@dataclass
class BackupEnv:
    database_url: str
    backup_dir: Path
    services: Services

    @property
    def dbname(self) -> str:
        return self.database_url.rsplit("/", 1)[1]

    def admin_url(self, db: str = "postgres") -> str:
        return self.database_url.rsplit("/", 1)[0] + f"/{db}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a `warden` child pointed at this database and directory."""
        return self.services.env(WARDEN_DATABASE_URL=self.database_url,
                                 WARDEN_BACKUP_DIR=str(self.backup_dir), **extra)

    def sql(self, query: str, *args: object) -> list[tuple[object, ...]]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            cur = conn.execute(query, args)
            return cur.fetchall() if cur.description else []


def point_settings(env: dict[str, str]) -> None:
    """Make this process's settings, engines and Redis client follow `env`."""
    from workers.db import reset_engine
    from workers.settings import get_settings

    os.environ.update(env)
    get_settings.cache_clear()
    reset_engine()


@pytest.fixture
def backup_env(services: Services, tmp_path: Path) -> Iterator[BackupEnv]:
    with fresh_database(services) as url:
        env = BackupEnv(url, tmp_path / "backups", services)
        point_settings({"WARDEN_DATABASE_URL": url, "WARDEN_BACKUP_DIR": str(env.backup_dir)})
        try:
            yield env
        finally:
            _apply_env(services)  # back to the session's database before it is dropped
            _drop_scratch_databases(env)


def _drop_scratch_databases(env: BackupEnv) -> None:
    """Scratch databases a verification left (a worker stopped mid-restore): the test's
    database goes, so no later verification of it would drop them."""
    from tasks.backups.service import scratch_prefix

    prefix = scratch_prefix(env.dbname)
    with psycopg.connect(env.admin_url(), autocommit=True) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE left(datname, %s) = %s",
            (len(prefix), prefix)).fetchall()]
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed_small(characters: int = 300) -> dict[str, int]:
    from domain.demo import seed

    return seed(characters, violations=0.05, rng_seed=7)


def table_counts_now(url: str) -> dict[str, int]:
    from tasks.backups.service import count_rows

    with psycopg.connect(url) as conn:
        return count_rows(conn)


def test_backup_writes_a_sealed_private_file_with_an_exact_manifest(
        backup_env: BackupEnv) -> None:
    from tasks.backups import service

    # given seeded data
    seed_small()
    live = table_counts_now(backup_env.database_url)
    # when a backup is made
    result = service.create_backup()
    # then the archive and its manifest exist under their final names, mode 0600, and
    # nothing temporary is left
    path = Path(result["path"])
    assert path.parent == backup_env.backup_dir
    names = sorted(p.name for p in backup_env.backup_dir.iterdir())
    assert names == [path.name, service.manifest_path(path).name]
    for p in (path, service.manifest_path(path)):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE(backup_env.backup_dir.stat().st_mode) == 0o700
    # and the manifest holds the file's real checksum and size, the versions, the times
    manifest = json.loads(service.manifest_path(path).read_text())
    digest, size = service.sha256_file(path)
    assert (manifest["sha256"], manifest["bytes"]) == (digest, size)
    server_num = int(backup_env.sql("SHOW server_version_num")[0][0])
    assert manifest["server_version_num"] == server_num
    assert int(manifest["pg_dump_version"].split(".")[0]) >= server_num // 10000
    assert manifest["started_at"] <= manifest["snapshot_at"] <= manifest["finished_at"]
    # and the exact row count of every table but the catalogue (whose data is not dumped)
    live.pop("public.backups")
    assert manifest["tables"] == live
    assert manifest["excluded_data"] == ["public.backups"]
    assert live["public.characters"] == 300
    # and the row says succeeded, with the same manifest
    row = backup_env.sql("SELECT status, sha256, bytes, table_counts, error FROM backups")
    assert row == [("succeeded", digest, size, live, None)]


def test_counts_are_those_of_the_dump_snapshot_even_with_concurrent_writes(
        backup_env: BackupEnv) -> None:
    from tasks.backups import service

    # given seeded data and a writer inserting characters while the backup runs
    seed_small(200)
    stop = threading.Event()

    def writer() -> None:
        with psycopg.connect(backup_env.database_url, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO characters (name, owner_id, chronicle_id) "
                             "VALUES ('late', 1, 1)")
                time.sleep(0.002)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        result = service.create_backup()
    finally:
        stop.set()
        thread.join()
    # when the archive is restored
    copy = f"{backup_env.dbname}_snap"
    from tasks.backups import restore

    report = restore.restore(result["backup_id"], copy)
    try:
        # then the restored characters are exactly the manifest's count (the dump and the
        # count saw one snapshot), though the live table has grown since
        manifest = json.loads(service.manifest_path(result["path"]).read_text())
        restored = report.counts["public.characters"][1]
        assert restored == manifest["tables"]["public.characters"]
        live = backup_env.sql("SELECT count(*) FROM characters")[0][0]
        assert isinstance(live, int) and live > restored
    finally:
        with psycopg.connect(backup_env.admin_url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{copy}" WITH (FORCE)')


def test_running_the_same_job_twice_makes_one_backup(backup_env: BackupEnv) -> None:
    from tasks.backups import service

    # given a backup made by job J
    seed_small(50)
    job_id = "0b7c9a4e-2f51-4c0e-9d5e-6a1f3b2c4d5e"
    first = service.create_backup(job_id)
    # when J runs again (a duplicate delivery after success)
    second = service.create_backup(job_id)
    # then it returns the same backup, and there is one row and one archive
    assert second["backup_id"] == first["backup_id"]
    assert backup_env.sql("SELECT count(*) FROM backups") == [(1,)]
    assert len(list(backup_env.backup_dir.glob("*.dump"))) == 1


def test_a_too_old_pg_dump_is_a_clear_error_before_anything_is_written(
        backup_env: BackupEnv, tmp_path: Path) -> None:
    from tasks.backups import service
    from tasks.backups.pgtools import PgToolsTooOld

    # given WARDEN_PG_BIN_DIR naming client tools of PostgreSQL 9.6
    old = tmp_path / "pg96"
    old.mkdir()
    for tool in ("pg_dump", "pg_restore"):
        script = old / tool
        script.write_text(f"#!/bin/sh\necho '{tool} (PostgreSQL) 9.6.24'\n")
        script.chmod(0o755)
    point_settings({"WARDEN_PG_BIN_DIR": str(old)})
    try:
        # when a backup is asked for
        with pytest.raises(PgToolsTooOld) as caught:
            service.create_backup()
    finally:
        del os.environ["WARDEN_PG_BIN_DIR"]
        point_settings({})
    # then the error names the version, the setting and what is needed
    message = str(caught.value)
    assert "9.6" in message and "WARDEN_PG_BIN_DIR" in message
    assert caught.value.code == "pg_dump_too_old"
    # and nothing was written: no file, no row
    assert not backup_env.backup_dir.exists() or not any(backup_env.backup_dir.iterdir())
    assert backup_env.sql("SELECT count(*) FROM backups") == [(0,)]


def test_the_password_is_never_on_a_command_line_nor_in_the_environment(
        backup_env: BackupEnv) -> None:
    from tasks.backups import service

    # given the application connects as a role with a password
    secret = "s3cret:pass\\word-for-backups"
    role = f"bk_{backup_env.dbname[-10:]}"
    backup_env.sql(f"CREATE ROLE \"{role}\" LOGIN SUPERUSER PASSWORD '{secret}'")
    url = backup_env.database_url.replace("postgres@", f"{role}:s3cret%3Apass%5Cword-for-backups@")
    point_settings({"WARDEN_DATABASE_URL": url})
    seed_small(20)
    # and a session holding a lock that keeps pg_dump waiting, so it can be looked at
    blocker = psycopg.connect(backup_env.database_url)
    blocker.execute("LOCK TABLE characters IN ACCESS EXCLUSIVE MODE")
    seen: dict[str, bytes] = {}
    done: dict[str, object] = {}

    def run() -> None:
        try:
            done["result"] = service.create_backup()
        except Exception as exc:
            done["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not seen:
            for pid in (p for p in os.listdir("/proc") if p.isdigit()):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if (b"pg_dump" in cmd and b"--snapshot" in cmd
                            and backup_env.dbname.encode() in cmd):
                        seen = {"cmdline": cmd, "environ": Path(f"/proc/{pid}/environ")
                                .read_bytes()}
                        break
                except OSError:
                    continue
            time.sleep(0.05)
    finally:
        blocker.rollback()
        blocker.close()
        thread.join(60)
        point_settings({"WARDEN_DATABASE_URL": backup_env.database_url})
        backup_env.sql(f'DROP OWNED BY "{role}"')
        backup_env.sql(f'DROP ROLE "{role}"')
    # then pg_dump ran with neither the password in its arguments nor in its environment
    assert seen, "pg_dump was never seen running"
    assert secret.encode() not in seen["cmdline"]
    assert b"s3cret" not in seen["cmdline"] and b"s3cret" not in seen["environ"]
    assert b"PGPASSFILE=" in seen["environ"] and b"PGPASSWORD" not in seen["environ"]
    # and the backup still succeeded, the passfile gone with it
    assert "result" in done, done
    passfile = next(v for v in seen["environ"].split(b"\0") if v.startswith(b"PGPASSFILE="))
    assert not Path(passfile.split(b"=", 1)[1].decode()).exists()


def test_pg_tools_found_are_at_least_the_servers_major(backup_env: BackupEnv) -> None:
    from tasks.backups.pgtools import find_tools, tool_version

    # given the server this suite runs on (embedded, or the machine's PostgreSQL 15)
    num = int(backup_env.sql("SHOW server_version_num")[0][0])
    # when the tools are looked up without WARDEN_PG_BIN_DIR
    tools = find_tools(num // 10000)
    # then they run and are of the server's major (the nearest, so same when installed)
    major, _ = tool_version(tools.bin_dir / "pg_dump")
    assert major == tools.major >= num // 10000
    out = subprocess.run([tools.path("pg_restore"), "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert str(tools.major) in out


def test_a_second_backup_while_one_runs_waits_its_turn(backup_env: BackupEnv) -> None:
    from tasks.backups import service

    # given a backup held mid-dump by a lock on characters
    seed_small(20)
    blocker = psycopg.connect(backup_env.database_url)
    blocker.execute("LOCK TABLE characters IN ACCESS EXCLUSIVE MODE")
    first: dict[str, object] = {}
    thread = threading.Thread(target=lambda: first.update(service.create_backup()))
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not backup_env.sql("SELECT 1 FROM backups WHERE dump_pid IS NOT NULL"):
            assert time.monotonic() < deadline, "the first backup never started pg_dump"
            time.sleep(0.05)
        # when a second backup is asked for meanwhile
        with pytest.raises(service.BackupBusy):
            service.create_backup()
        # then it wrote nothing (a transient error: the job is retried later, i.e. waits)
        assert backup_env.sql("SELECT count(*) FROM backups") == [(1,)]
        # and the database itself allows one running backup only
        with pytest.raises(psycopg.errors.UniqueViolation):
            backup_env.sql("INSERT INTO backups (database, path, partial_path) "
                           "VALUES ('x', 'x', 'x')")
    finally:
        blocker.rollback()
        blocker.close()
        thread.join(60)
    # and the first one finished undisturbed
    assert backup_env.sql("SELECT status FROM backups") == [("succeeded",)]
    assert first["backup_id"] == 1


def test_the_migration_downgrades_and_upgrades(backup_env: BackupEnv) -> None:
    from workers.migrate import downgrade, upgrade

    # given the schema at head, when downgraded below 0005 the backups table is gone
    downgrade("0004", url=backup_env.database_url)
    assert backup_env.sql("SELECT to_regclass('backups')") == [(None,)]
    # and when upgraded again it is back, with its one-running-backup index
    upgrade(url=backup_env.database_url)
    assert backup_env.sql("SELECT indexname FROM pg_indexes WHERE tablename = 'backups' "
                          "ORDER BY 1") == [("ix_backups_job_id",), ("ix_backups_status_snapshot",),
                                            ("pk_backups",), ("uq_backups_one_running",)]
