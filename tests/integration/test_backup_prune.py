"""backup.prune in the database: the crafted 60 days as backup rows with real files."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from tests.integration.test_backup_create import BackupEnv, backup_env
from tests.unit.test_backup_retention import crafted

__all__ = ["backup_env"]

# By hand in tests/unit/test_backup_retention.py: the crafted list keeps these 16.
EXPECTED_KEPT = {20, 30, 45, 52, 53, 54, 55, 56, 58, 59, 60, 61, 62, 63, 64, 65}


def _insert_crafted(env: BackupEnv) -> dict[int, Path]:
    """One backups row and one small archive + manifest per crafted backup; a backup.verify
    job left running on backup 20 (the crafted list's verification in progress)."""
    env.backup_dir.mkdir(mode=0o700, exist_ok=True)
    paths = {}
    for b in crafted():
        path = env.backup_dir / f"crafted-{b.id:06d}.dump"
        path.write_bytes(b"archive %d" % b.id)
        path.with_name(f"crafted-{b.id:06d}.manifest.json").write_text("{}")
        env.sql(
            "INSERT INTO backups (id, status, database, path, partial_path, started_at, "
            "snapshot_at, finished_at, bytes, sha256, table_counts, verdict) VALUES "
            "(%s, 'succeeded', 'crafted', %s, %s, %s, %s, %s, 9, %s, '{}', %s)",
            b.id, str(path), str(path) + ".partial", b.taken_at, b.taken_at, b.taken_at,
            "0" * 64, b.verdict)
        paths[b.id] = path
    env.sql("SELECT setval(pg_get_serial_sequence('backups', 'id'), 100)")
    env.sql("INSERT INTO job_runs (id, type, params, status) VALUES "
            "(%s, 'backup.verify', %s::jsonb, 'running')",
            str(uuid.uuid4()), json.dumps({"backup_id": 20}))
    return paths


def test_prune_deletes_exactly_what_retention_drops_and_nothing_twice(
        backup_env: BackupEnv) -> None:
    from tasks.backups import service
    from tasks.backups.retention import Policy
    from workers.db import session_scope

    # given the crafted 60 days of backups in the table, each with its files
    paths = _insert_crafted(backup_env)
    # when a dry run looks first
    with session_scope() as s:
        dry = service.prune_backups(s, Policy(7, 4, 6), dry_run=True)
    # then it lists what would go and changes nothing
    assert {d["backup_id"] for d in dry["deleted"]} == set(paths) - EXPECTED_KEPT
    assert backup_env.sql("SELECT count(*) FROM backups WHERE status = 'succeeded'") == [(68,)]
    assert all(p.exists() for p in paths.values())
    # when the prune runs for real
    with session_scope() as s:
        done = service.prune_backups(s, Policy(7, 4, 6), actor="test")
    removed = service.remove_pruned_files()
    # then exactly the expected 16 keep their row and files; the other 52 are pruned, files gone
    kept = {int(r[0]) for r in backup_env.sql("SELECT id FROM backups WHERE status = 'succeeded'")}
    pruned = {int(r[0]) for r in backup_env.sql("SELECT id FROM backups WHERE status = 'pruned' "
                                                "AND pruned_at IS NOT NULL")}
    assert kept == EXPECTED_KEPT
    assert pruned == set(paths) - EXPECTED_KEPT
    assert {d["backup_id"] for d in done["deleted"]} == pruned
    assert removed == 2 * len(pruned)  # archive and manifest each
    for backup_id, path in paths.items():
        assert path.exists() == (backup_id in EXPECTED_KEPT)
        assert path.with_name(path.name.replace(".dump", ".manifest.json")).exists() == (
            backup_id in EXPECTED_KEPT)
    # and the newest verified one (60) and the one being verified (20) are among the kept
    assert {20, 60} <= kept
    # and the operator log says who pruned what, and why
    log = backup_env.sql("SELECT actor, action, count, details FROM operator_log")
    assert log == [("test", "backup.prune", 52, {"backup_ids": sorted(pruned)})]
    # when it runs again
    with session_scope() as s:
        again = service.prune_backups(s, Policy(7, 4, 6), actor="test")
    # then nothing more goes
    assert again["deleted"] == []
    assert service.remove_pruned_files() == 0
    assert backup_env.sql("SELECT count(*) FROM operator_log") == [(1,)]


def test_once_the_verification_ends_its_backup_is_no_longer_protected(
        backup_env: BackupEnv) -> None:
    from tasks.backups import service
    from tasks.backups.retention import Policy
    from workers.db import session_scope

    # given the crafted backups, and the verification of backup 20 has since failed
    _insert_crafted(backup_env)
    backup_env.sql("UPDATE job_runs SET status = 'failed' WHERE type = 'backup.verify'")
    # when pruned
    with session_scope() as s:
        service.prune_backups(s, Policy(7, 4, 6), actor="test")
    # then 20 went with the others
    kept = {int(r[0]) for r in backup_env.sql("SELECT id FROM backups WHERE status = 'succeeded'")}
    assert kept == EXPECTED_KEPT - {20}


def test_the_newest_unverified_backup_is_found_for_the_backstop(backup_env: BackupEnv) -> None:
    from tasks.backups import service
    from workers.db import session_scope

    # given the crafted backups: the newest (61) was never verified and nothing verifies it
    _insert_crafted(backup_env)
    with session_scope() as s:
        assert service.newest_unverified(s) == 61
    # when a verification of 61 is queued, the backstop has nothing to do
    backup_env.sql("INSERT INTO job_runs (id, type, params, status) VALUES "
                   "(%s, 'backup.verify', '{\"backup_id\": 61}', 'queued')", str(uuid.uuid4()))
    with session_scope() as s:
        assert service.newest_unverified(s) is None
