"""Helpers of the audit, validation and report tests (no tests here).

Why a database of their own: an audit scans, and a fix changes, every characters row; in
the suite's shared database it would meet (and fix) other tests' deliberately broken rows,
and their rows would blur the exact findings asserted here. Child processes of these tests
(workers, the API, the CLI) get the same database and a broker key prefix of their own, so
no other test's worker takes their jobs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from domain import checks, rules
from tests.conftest import ROOT, Services, fresh_database

CHARACTER_CONSTRAINTS = [f"ck_characters_{k}" for k in rules.check_sql()]
SCENE_CONSTRAINT = "ck_scenes_xp_given_finished"


@dataclass
class Isolated:
    """A migrated database of the test module's own, and a broker prefix for its children."""

    services: Services
    url: str
    prefix: str

    def overrides(self, **extra: str) -> dict[str, str]:
        """What a child process needs on top of the suite's env (start_worker's `env`)."""
        return {"WARDEN_DATABASE_URL": self.url, "WARDEN_BROKER_KEY_PREFIX": self.prefix,
                **extra}

    def env(self, **extra: str) -> dict[str, str]:
        """A child's whole env (subprocess.run's `env`)."""
        return self.services.env(**self.overrides(**extra))

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True)

    def token(self, *scopes: str) -> str:
        """An API token in this database (the suite's `tokens` live in the shared one)."""
        from workers.tokens import create_token

        return create_token(f"t-{'-'.join(scopes)}-{uuid.uuid4().hex[:6]}", list(scopes))


@contextlib.contextmanager
def isolated(services: Services) -> Iterator[Isolated]:
    """A fresh database; this process's settings, engine and Redis prefix point at it."""
    from workers.db import reset_engine
    from workers.enqueue import job_types
    from workers.settings import get_settings

    job_types()  # the registry, imported while the settings are the suite's
    with fresh_database(services) as url:
        prefix = f"t-{uuid.uuid4().hex[:8]}:"
        saved = {k: os.environ.get(k) for k in ("WARDEN_DATABASE_URL",
                                                "WARDEN_BROKER_KEY_PREFIX")}
        os.environ["WARDEN_DATABASE_URL"] = url
        os.environ["WARDEN_BROKER_KEY_PREFIX"] = prefix
        get_settings.cache_clear()
        reset_engine()
        try:
            yield Isolated(services, url, prefix)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            get_settings.cache_clear()
            reset_engine()


@contextlib.contextmanager
def constraints_off(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Write legacy rows that break the NOT VALID rule constraints (they predate them):
    drop the constraints, write, add them back NOT VALID, in one transaction."""
    with conn.transaction():
        saved = conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
            "FROM pg_constraint WHERE conname = ANY(%s)",
            ([*CHARACTER_CONSTRAINTS, SCENE_CONSTRAINT],)).fetchall()
        for table, name, _ in saved:
            conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        yield
        for table, name, definition in saved:
            conn.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" '
                         f'{definition.removesuffix(" NOT VALID")} NOT VALID')


def add_character(conn: psycopg.Connection[Any], **columns: Any) -> int:
    """A character with valid defaults, overridden by `columns` (use constraints_off for
    values breaking a rule). Its XP ledger gets an opening row equal to its xp."""
    values: dict[str, Any] = {"name": f"c-{uuid.uuid4().hex[:6]}", "owner_id": 1,
                              "chronicle_id": 1, "status": "App", "xp": 0}
    values.update(columns)
    names = ", ".join(values)
    marks = ", ".join(["%s"] * len(values))
    row = conn.execute(f"INSERT INTO characters ({names}) VALUES ({marks}) RETURNING id",
                       list(values.values())).fetchone()
    assert row is not None
    if values["xp"]:
        conn.execute("INSERT INTO xp_ledger (character_id, delta, kind, reason) "
                     "VALUES (%s, %s, 'adjust', 'opening balance')", (row[0], values["xp"]))
    return int(row[0])


def add_scene(conn: psycopg.Connection[Any], *, finished: bool, xp_given: bool,
              days_ago: int = 0) -> int:
    row = conn.execute(
        "INSERT INTO scenes (chronicle_id, name, date_played, finished, xp_given) "
        "VALUES (1, 'scene', current_date - %s, %s, %s) RETURNING id",
        (days_ago, finished, xp_given)).fetchone()
    assert row is not None
    return int(row[0])


def add_st(conn: psycopg.Connection[Any], user_id: int, chronicle_id: int,
           gameline: str) -> int:
    row = conn.execute("INSERT INTO st_relationships (user_id, chronicle_id, gameline) "
                       "VALUES (%s, %s, %s) RETURNING id",
                       (user_id, chronicle_id, gameline)).fetchone()
    assert row is not None
    return int(row[0])


def character_rows(conn: psycopg.Connection[Any]) -> dict[int, dict[str, Any]]:
    """Every character's checked columns, by id (updated_at left out: a fix bumps it)."""
    cols = ", ".join(checks.CHECK_COLUMNS)
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return {r["id"]: r for r in cur.execute(f"SELECT id, {cols} FROM characters ORDER BY id")}


def st_rows(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT id, user_id, chronicle_id, gameline FROM st_relationships "
                        "ORDER BY id").fetchall()


def warden(iso: Isolated, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The `warden` command as an operator runs it, against the isolated database."""
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, text=True,
                          capture_output=True, env=iso.env(**env), timeout=300)


def wipe(conn: psycopg.Connection[Any]) -> None:
    """Empty the character data and this family's tables (between tests of one module)."""
    conn.execute("TRUNCATE characters, scenes, st_relationships, xp_ledger, xp_spend_requests, "
                 "weekly_xp_requests, scene_participants, audit_runs, audit_findings, "
                 "validation_sweeps, health_reports, operator_log RESTART IDENTITY CASCADE")
    # the scene awards a fix queued (scene ids restart: an old one would look pending)
    conn.execute("DELETE FROM job_runs WHERE type = 'xp.award_scene'")
