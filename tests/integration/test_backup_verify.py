"""backup.verify against a real PostgreSQL: a real restore proves the backup, and every way a
backup can be broken is caught, with the scratch database dropped each time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_backup_create import BackupEnv, backup_env, seed_small

__all__ = ["backup_env"]


def _scratch_databases(env: BackupEnv) -> list[str]:
    from tasks.backups.service import scratch_prefix

    prefix = scratch_prefix(env.dbname)
    return [str(r[0]) for r in env.sql(
        "SELECT datname FROM pg_database WHERE left(datname, %s) = %s", len(prefix), prefix)]


def _row(env: BackupEnv, backup_id: int) -> dict[str, object]:
    cols = ("verdict", "restore_seconds", "verify_report", "verify_error", "verified_at",
            "verify_job_id")
    row = env.sql(f"SELECT {', '.join(cols)} FROM backups WHERE id = %s", backup_id)[0]
    return dict(zip(cols, row, strict=True))


def test_a_good_backup_passes_with_its_restore_time_and_checks_recorded(
        backup_env: BackupEnv) -> None:
    from tasks.backups import service

    # given a backup of seeded data with rule-breaking legacy rows
    seed_small(300)
    made = service.create_backup()
    # when it is verified, twice (a repeated job)
    first = service.verify_backup(made["backup_id"])
    second = service.verify_backup(made["backup_id"])
    # then it passed both times with the same findings, and the scratch database is gone
    assert first["verdict"] == second["verdict"] == "passed"
    assert _scratch_databases(backup_env) == []
    row = _row(backup_env, made["backup_id"])
    assert row["verdict"] == "passed" and row["verify_error"] is None
    assert isinstance(row["restore_seconds"], float) and row["restore_seconds"] > 0
    assert row["verify_job_id"] is None  # no verification running any more
    assert isinstance(row["verify_report"], dict) and row["verify_report"]["scratch_dropped"]
    report = row["verify_report"]
    assert isinstance(report, dict)
    assert all(step["ok"] for step in report["steps"].values())
    assert set(report["steps"]) == {"checksum", "toc", "restore", "row_counts", "checks"}
    assert report["mismatches"] == []
    # and the integrity counts of the copy sit beside the live database's: equal here,
    # since nothing changed, and non-zero (the seed breaks every rule)
    checks = report["checks"]
    assert checks["restored"] == checks["live"]
    assert checks["restored"]["xp_nonnegative"] > 0
    assert checks["restored"]["st_relationship_unique"] > 0
    assert checks["source"] in ("domain.checks", "domain.rules")


def test_the_audit_counts_agree_with_the_rules_fallback(backup_env: BackupEnv) -> None:
    from tasks.backups import audit
    from workers.db import session_scope

    # given the audit's own count queries are present (domain.checks)
    if audit.source() != "domain.checks":
        pytest.skip("domain.checks (the audit family) is not importable here")
    # when both count the same seeded data, then they agree key by key
    seed_small(200)
    with session_scope() as s:
        assert audit.integrity_counts(s) == audit._from_rules(s)


def test_one_flipped_byte_fails_verification(backup_env: BackupEnv) -> None:
    from tasks.backups import service

    # given a backup whose file then has one byte flipped in the middle
    seed_small(100)
    made = service.create_backup()
    path = Path(made["path"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    # when it is verified
    with pytest.raises(service.VerificationFailed) as caught:
        service.verify_backup(made["backup_id"])
    # then the verdict is failed, on the checksum, and stored on the backup
    assert caught.value.code == "verification_failed"
    row = _row(backup_env, made["backup_id"])
    assert row["verdict"] == "failed"
    assert str(row["verify_error"]).startswith("checksum:")
    report = row["verify_report"]
    assert isinstance(report, dict)
    assert report["mismatches"][0]["step"] == "checksum"
    assert report["mismatches"][0]["expected"] == made["sha256"]
    assert row["restore_seconds"] is None  # nothing was restored
    assert _scratch_databases(backup_env) == []


def test_an_archive_that_cannot_be_restored_fails_and_its_scratch_database_is_dropped(
        backup_env: BackupEnv) -> None:
    from tasks.backups import service

    # given a backup whose last data blocks are gone where the checksum cannot see it (a
    # short write before the hash: the recorded checksum is that of the truncated file;
    # the table of contents, at the start of the archive, is intact)
    seed_small(300)
    made = service.create_backup()
    path = Path(made["path"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 9 // 10])
    digest, size = service.sha256_file(path)
    backup_env.sql("UPDATE backups SET sha256 = %s, bytes = %s WHERE id = %s", digest, size,
                   made["backup_id"])
    # when it is verified
    with pytest.raises(service.VerificationFailed):
        service.verify_backup(made["backup_id"])
    # then the restore step failed, and the scratch database it restored into is gone
    row = _row(backup_env, made["backup_id"])
    assert row["verdict"] == "failed"
    report = row["verify_report"]
    assert isinstance(report, dict)
    failed = [name for name, step in report["steps"].items() if not step["ok"]]
    assert failed == ["restore"], report
    assert report["steps"]["toc"]["ok"] is True
    assert _scratch_databases(backup_env) == []


def test_a_row_count_differing_from_the_manifest_is_a_mismatch(backup_env: BackupEnv) -> None:
    from tasks.backups import service

    # given a backup whose manifest promises one character more than the dump holds
    seed_small(120)
    made = service.create_backup()
    backup_env.sql("UPDATE backups SET table_counts = jsonb_set(table_counts, "
                   "'{public.characters}', to_jsonb(121)) WHERE id = %s", made["backup_id"])
    # when it is verified
    with pytest.raises(service.VerificationFailed):
        service.verify_backup(made["backup_id"])
    # then exactly that table is the mismatch, with both counts
    report = _row(backup_env, made["backup_id"])["verify_report"]
    assert isinstance(report, dict)
    assert report["mismatches"] == [{"step": "row_counts", "table": "public.characters",
                                     "expected": 121, "restored": 120}]
    assert _scratch_databases(backup_env) == []


def test_a_leftover_scratch_database_of_a_killed_verification_is_dropped(
        backup_env: BackupEnv) -> None:
    from tasks.backups import service

    # given a scratch database left behind by a verification that died
    seed_small(20)
    made = service.create_backup()
    leftover = f"{service.scratch_prefix(backup_env.dbname)}{made['backup_id']}_dead0000"
    with __import__("psycopg").connect(backup_env.admin_url(), autocommit=True) as conn:
        service.create_scratch(conn, leftover, backup_env.dbname)  # as verification does
    # when the next verification runs
    assert service.verify_backup(made["backup_id"])["verdict"] == "passed"
    # then it is gone
    assert _scratch_databases(backup_env) == []


def test_a_pruned_or_unknown_backup_is_not_verified(backup_env: BackupEnv) -> None:
    from tasks.backups import service

    seed_small(20)
    made = service.create_backup()
    backup_env.sql("UPDATE backups SET status = 'pruned' WHERE id = %s", made["backup_id"])
    with pytest.raises(service.BackupUnavailable):
        service.verify_backup(made["backup_id"])
    with pytest.raises(service.BackupNotFound):
        service.verify_backup(made["backup_id"] + 1000)


def test_the_manifest_on_disk_matches_the_row(backup_env: BackupEnv) -> None:
    from tasks.backups import service

    seed_small(30)
    made = service.create_backup()
    manifest = json.loads(service.manifest_path(made["path"]).read_text())
    row = backup_env.sql("SELECT sha256, bytes, table_counts FROM backups WHERE id = %s",
                         made["backup_id"])[0]
    assert (manifest["sha256"], manifest["bytes"], manifest["tables"]) == row


def test_a_table_missing_from_the_archive_fails_at_its_table_of_contents(
        backup_env: BackupEnv) -> None:
    from tasks.backups import service

    # given a backup whose manifest counts a table the archive holds no data for
    seed_small(20)
    made = service.create_backup()
    backup_env.sql("UPDATE backups SET table_counts = table_counts || '{\"public.ghost\": 3}' "
                   "WHERE id = %s", made["backup_id"])
    # when it is verified
    with pytest.raises(service.VerificationFailed):
        service.verify_backup(made["backup_id"])
    # then pg_restore --list found the archive readable but without that table, before any
    # scratch database was made
    row = _row(backup_env, made["backup_id"])
    report = row["verify_report"]
    assert isinstance(report, dict)
    assert str(row["verify_error"]).startswith("toc: tables without data in the archive")
    assert report["steps"]["toc"] == {"ok": False, "missing": ["public.ghost"]}
    assert report["mismatches"] == [{"step": "toc", "table": "public.ghost"}]
    assert "restore" not in report["steps"] and row["restore_seconds"] is None
    assert _scratch_databases(backup_env) == []
