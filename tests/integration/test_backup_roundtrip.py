"""The round trip: seed, back up, restore into a new database, compare every row."""

from __future__ import annotations

import json

import psycopg
from psycopg import sql

from tests.integration.test_backup_create import BackupEnv, backup_env, seed_small

__all__ = ["backup_env"]  # the fixture, imported for pytest


def _rows(url: str, table: str) -> list[tuple[object, ...]]:
    """Every row of a table as text, in a total order (all columns), so two databases
    compare row by row whatever their physical order."""
    schema, name = table.split(".", 1)
    with psycopg.connect(url) as conn:
        query = sql.SQL("SELECT t::text FROM {} AS t ORDER BY 1").format(
            sql.Identifier(schema, name))
        return conn.execute(query).fetchall()


def made_tables(made: dict[str, object]) -> list[str]:
    """The tables the backup's manifest counts."""
    from tasks.backups.service import manifest_path

    return sorted(json.loads(manifest_path(str(made["path"])).read_text())["tables"])


def test_seeded_data_comes_back_equal_row_by_row(backup_env: BackupEnv) -> None:
    from tasks.backups import restore, service

    # given seeded data (every table filled, legacy rows breaking the rules included)
    counts = seed_small(400)
    assert all(counts[t] > 0 for t in ("characters", "scenes", "xp_ledger"))
    # when it is backed up and restored into a new database
    made = service.create_backup()
    # (the rows at backup time: nothing else writes to this database; the restore itself
    # appends an operator-log entry, so they are read before it)
    at_backup = {t: _rows(backup_env.database_url, t) for t in made_tables(made)}
    copy = f"{backup_env.dbname}_rt"
    report = restore.restore(made["backup_id"], copy)
    copy_url = backup_env.admin_url(copy)
    try:
        # then the restore created the database and every table's count matches
        assert report.created and report.ok
        tables = [t for t, (expected, _) in report.counts.items() if expected is not None]
        assert sorted(tables) == sorted(at_backup)
        assert "public.characters" in tables and "public.alembic_version" in tables
        # and every table's rows are equal, compared row by row
        for table in tables:
            assert _rows(copy_url, table) == at_backup[table], f"{table} differs"
            assert len(at_backup[table]) == report.counts[table][0]
        # and the catalogue came back empty: a restored copy inherits no backup rows
        assert report.counts["public.backups"] == (None, 0)
        # and the constraints came back, the NOT VALID rule checks still NOT VALID (their
        # text is re-deparsed on restore, so names, kinds and validity are compared)
        query = ("SELECT conrelid::regclass::text, conname, contype, convalidated "
                 "FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2")
        with psycopg.connect(backup_env.database_url) as a, psycopg.connect(copy_url) as b:
            assert a.execute(query).fetchall() == b.execute(query).fetchall()
    finally:
        with psycopg.connect(backup_env.admin_url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{copy}" WITH (FORCE)')
