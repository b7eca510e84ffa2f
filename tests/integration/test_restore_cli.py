"""`warden restore` and `warden backup list|prune --dry-run`, run as an operator runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.conftest import ROOT
from tests.integration.test_backup_create import BackupEnv, backup_env, seed_small

__all__ = ["backup_env"]


def warden(env: BackupEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env.env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


def _content(url: str) -> list[tuple[object, ...]]:
    """Every user table with its rows as text: what "changes nothing" is checked against."""
    with psycopg.connect(url) as conn:
        tables = conn.execute("SELECT schemaname, tablename FROM pg_tables "
                              "WHERE schemaname = 'public' ORDER BY 2").fetchall()
        out: list[tuple[object, ...]] = []
        for schema, name in tables:
            rows = conn.execute(f'SELECT t::text FROM "{schema}"."{name}" t ORDER BY 1')
            out.append((name, [r[0] for r in rows]))
        return out


@pytest.fixture
def made(backup_env: BackupEnv) -> dict[str, object]:
    from tasks.backups import service

    seed_small(150)
    return service.create_backup()


@pytest.fixture
def other_db(backup_env: BackupEnv) -> str:
    """A database name next to the application's, dropped afterwards."""
    name = f"{backup_env.dbname}_target"
    yield name  # type: ignore[misc]
    with psycopg.connect(backup_env.admin_url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_restore_onto_a_non_empty_database_without_force_changes_nothing(
        backup_env: BackupEnv, made: dict[str, object], other_db: str) -> None:
    # given a database holding someone's table and rows
    with psycopg.connect(backup_env.admin_url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{other_db}"')
    target = backup_env.admin_url(other_db)
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("CREATE TABLE characters (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO characters VALUES (1, 'precious'), (2, 'also precious')")
    before = _content(target)
    # when the backup is restored onto it without --force
    done = warden(backup_env, "restore", str(made["backup_id"]), "--target-db", other_db)
    # then it is refused with one error line, and the database is exactly as it was
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: database ")
    assert "--force" in done.stderr
    assert _content(target) == before
    # when --force is given, the backup's tables replace the same-named ones
    forced = warden(backup_env, "restore", str(made["backup_id"]), "--target-db", other_db,
                    "--force")
    assert forced.returncode == 0, forced.stderr
    assert "tables of the backup match its row counts" in forced.stdout
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM characters").fetchone() == (150,)


def test_the_live_database_needs_force_twice(backup_env: BackupEnv,
                                             made: dict[str, object]) -> None:
    # given the live application database with its data
    before = _content(backup_env.database_url)
    # when restored over with a single --force
    once = warden(backup_env, "restore", str(made["backup_id"]), "--target-db",
                  backup_env.dbname, "--force")
    # then it is refused, naming the double --force, and nothing changed
    assert once.returncode == 1
    assert "live application database" in once.stderr and "twice" in once.stderr
    assert _content(backup_env.database_url) == before
    # when --force is given twice, it is restored, and the catalogue (whose rows no dump
    # holds) is rebuilt from the manifests on disk
    backup_env.sql("DELETE FROM characters WHERE id IN (SELECT id FROM characters LIMIT 10)")
    twice = warden(backup_env, "restore", str(made["backup_id"]), "--target-db",
                   backup_env.dbname, "--force", "--force")
    assert twice.returncode == 0, twice.stderr
    assert backup_env.sql("SELECT count(*) FROM characters") == [(150,)]
    assert backup_env.sql("SELECT id, status, sha256 FROM backups") == [
        (made["backup_id"], "succeeded", made["sha256"])]
    assert "rebuilt from 1 manifests" in twice.stdout


def test_a_checksum_mismatch_is_refused_before_anything_is_touched(
        backup_env: BackupEnv, made: dict[str, object], other_db: str) -> None:
    # given the archive has one byte flipped
    path = Path(str(made["path"]))
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    # when it is restored into a new database
    done = warden(backup_env, "restore", str(made["backup_id"]), "--target-db", other_db)
    # then it is refused, and the target was not even created
    assert done.returncode == 1
    assert "does not match its manifest" in done.stderr
    assert backup_env.sql("SELECT count(*) FROM pg_database WHERE datname = %s",
                          other_db) == [(0,)]


def test_restore_reports_row_counts_and_works_from_the_manifest_alone(
        backup_env: BackupEnv, made: dict[str, object], other_db: str) -> None:
    # given the catalogue lost its row (a disaster: the database came back without it)
    backup_env.sql("DELETE FROM backups")
    # when restored into a new database
    done = warden(backup_env, "restore", str(made["backup_id"]), "--target-db", other_db)
    # then the manifest beside the archive served, and each table's count is reported
    assert done.returncode == 0, done.stderr
    assert "from the manifest" in done.stdout
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("public.characters"))
    assert line.split()[1:] == ["150", "150"]


def test_an_unknown_backup_is_one_error_line(backup_env: BackupEnv) -> None:
    done = warden(backup_env, "restore", "999", "--target-db", "nowhere")
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: no backup 999 (neither in the backups table nor a "
                                   f"manifest in {backup_env.backup_dir})")


def test_backup_list_shows_size_age_verdict_and_restore_time(
        backup_env: BackupEnv, made: dict[str, object]) -> None:
    from tasks.backups import service

    # given a verified backup and one never verified
    service.verify_backup(int(str(made["backup_id"])))
    newer = service.create_backup()
    # when listed
    done = warden(backup_env, "backup", "list")
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.strip().splitlines()
    # then each shows its size, age, verdict and restore time, newest first
    assert header.split() == ["ID", "TAKEN", "(UTC)", "AGE", "SIZE", "STATUS", "VERDICT",
                              "RESTORE"]
    assert lines[0].split()[0] == str(newer["backup_id"])
    assert lines[0].split()[-2:] == ["-", "-"]  # not verified, no restore time
    old = lines[1].split()
    assert old[0] == str(made["backup_id"]) and "passed" in old
    assert old[-1] == "s" and float(old[-2]) >= 0  # "0.3 s"
    assert "KiB" in lines[1]
    # and the dry run of prune lists both as kept, deleting nothing
    dry = warden(backup_env, "backup", "prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would delete 0 backups" in dry.stdout
    assert dry.stdout.count("keep ") == 2


def test_backup_adopt_rebuilds_the_catalogue_from_the_manifests(
        backup_env: BackupEnv, made: dict[str, object]) -> None:
    # given a database restored from a backup: its backups table is empty (no dump holds
    # the rows) and its id sequence is behind the files on disk
    backup_env.sql("DELETE FROM backups")
    backup_env.sql("SELECT setval(pg_get_serial_sequence('backups', 'id'), 1, false)")
    # when the catalogue is adopted, twice
    first = warden(backup_env, "backup", "adopt")
    second = warden(backup_env, "backup", "adopt")
    # then the archive is listed again, once, as the manifest describes it
    assert first.returncode == 0 and "1 backups added" in first.stdout, first.stderr
    assert "0 backups added" in second.stdout
    assert backup_env.sql("SELECT id, status, sha256, bytes, verdict FROM backups") == [
        (made["backup_id"], "succeeded", made["sha256"], made["bytes"], None)]
    # and the next backup takes a new id, not one of an archive on disk
    from tasks.backups import service

    assert service.create_backup()["backup_id"] > int(str(made["backup_id"]))
