"""Client-tool choice, the password's path, and the small parsers of the backup family."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schedules import cron_period
from tasks.backups.pgtools import (
    PgToolsError,
    PgToolsTooOld,
    Target,
    _passfile_line,
    compatible,
    find_tools,
    tool_env,
)
from tasks.backups.service import table_data_entries


def test_tools_must_be_at_least_the_server_and_the_archive_and_not_cross_17() -> None:
    assert compatible(15, 15) and compatible(16, 15) and compatible(18, 17)
    assert not compatible(14, 15)  # too old for the server
    assert not compatible(15, 15, archive_major=16)  # cannot read a newer archive
    # 17+ restores begin with SET transaction_timeout, which a server before 17 rejects
    assert not compatible(17, 16) and not compatible(18, 15)


@pytest.fixture
def fake_bin(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """WARDEN_PG_BIN_DIR pointed at scripts that claim a version."""
    from workers.settings import get_settings

    def make(version: str) -> Path:
        d = tmp_path / f"pg{version}"
        d.mkdir()
        for tool in ("pg_dump", "pg_restore"):
            (d / tool).write_text(f"#!/bin/sh\necho '{tool} (PostgreSQL) {version}'\n")
            (d / tool).chmod(0o755)
        os.environ["WARDEN_PG_BIN_DIR"] = str(d)
        get_settings.cache_clear()
        return d

    saved = os.environ.get("WARDEN_PG_BIN_DIR")
    yield make
    if saved is None:
        os.environ.pop("WARDEN_PG_BIN_DIR", None)
    else:
        os.environ["WARDEN_PG_BIN_DIR"] = saved
    get_settings.cache_clear()


def test_an_explicit_bin_dir_is_used_and_judged(fake_bin: Callable[[str], Path]) -> None:
    # given WARDEN_PG_BIN_DIR with tools of 15.4, they serve a 15 server
    d = fake_bin("15.4")
    tools = find_tools(15)
    assert (tools.bin_dir, tools.major, tools.version) == (d, 15, "15.4")
    # and are too old for a 16 server: a clear error naming the setting
    with pytest.raises(PgToolsTooOld, match=r"15\.4 in WARDEN_PG_BIN_DIR=.* older than "
                                            r"PostgreSQL 16"):
        find_tools(16)


def test_tools_of_18_for_a_15_server_are_refused_with_the_reason(
        fake_bin: Callable[[str], Path]) -> None:
    fake_bin("18.1")
    with pytest.raises(PgToolsError, match="transaction_timeout") as caught:
        find_tools(15)
    assert caught.value.code == "pg_tools_unusable"


def test_the_password_goes_to_a_private_passfile_never_the_command_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    target = Target.from_url("postgresql+psycopg://app:p%3Ass%5Cw0rd@db.example:6543/warden"
                             "?sslmode=require")
    # the tools' --dbname carries everything but the password
    conninfo = target.conninfo()
    assert "p:ss" not in conninfo and "password" not in conninfo
    assert "host=db.example" in conninfo and "port=6543" in conninfo
    assert "sslmode=require" in conninfo and "dbname=warden" in conninfo
    # the password sits in a 0600 file, escaped as libpq reads it, gone afterwards
    # (monkeypatch: the session's own WARDEN_DATABASE_URL comes back afterwards, whatever
    # test runs next in this process)
    monkeypatch.setenv("WARDEN_DATABASE_URL", "postgresql://app:p%3Ass%5Cw0rd@db.example/warden")
    with tool_env(target) as env:
        path = Path(env["PGPASSFILE"])
        assert path.read_text() == "*:*:*:*:p\\:ss\\\\w0rd\n"
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert "PGPASSWORD" not in env
        assert not any("p:ss" in v for v in env.values())  # WARDEN_* not inherited
    assert not path.exists()
    assert _passfile_line("a:b") == "*:*:*:*:a\\:b\n"


def test_table_data_entries_of_a_restore_listing() -> None:
    listing = (";\n; Archive created at 2026-12-01\n;\n"
               "215; 1259 16390 TABLE public characters postgres\n"
               "3371; 0 16390 TABLE DATA public characters postgres\n"
               "3372; 0 16400 TABLE DATA public scene_participants postgres\n"
               "3373; 0 0 SEQUENCE SET public characters_id_seq postgres\n")
    assert table_data_entries(listing) == ["public.characters", "public.scene_participants"]


def test_schedule_periods_from_crontab() -> None:
    assert cron_period(minute="30", hour="2") == 86400
    assert cron_period(minute="*/5") == 300
    assert cron_period(minute="0", hour="3", day_of_week="sun") == 7 * 86400
