"""Engines and sessions: one engine per process, one transaction per unit of work.

Why per process: a pooled connection inherited across fork() would be shared by two
processes; the pool is rebuilt in the child (see `dispose_after_fork`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import MetaData, create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from workers.settings import get_settings

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base shared by the platform and domain tables (one metadata, one Alembic)."""

    metadata = MetaData(naming_convention=NAMING)


_engine: Engine | None = None
_engine_pid: int | None = None
_sessionmaker: sessionmaker[Session] | None = None
_init_lock = threading.Lock()


def get_engine() -> Engine:
    """The process's engine, created on first use and re-created after a fork."""
    if _engine is not None and _engine_pid == os.getpid() and _sessionmaker is not None:
        return _engine
    with _init_lock:  # the API's first requests arrive on many threads at once
        return _create_engine()


def _create_engine() -> Engine:
    global _engine, _engine_pid, _sessionmaker
    if _engine is None or _engine_pid != os.getpid():
        if _engine is not None:
            # close=False: the parent still owns those sockets; just forget them here.
            _engine.dispose(close=False)
        engine = create_engine(
            get_settings().database_dsn(),
            pool_pre_ping=True,
            # The API's thread pool has 40 threads; a request waits for a connection rather
            # than failing (and a 503, not a 500, if it waits past pool_timeout).
            pool_size=10,
            max_overflow=30,
            pool_timeout=10,
            connect_args={"connect_timeout": 5, "application_name": "warden"},
        )
        # Publish in this order: the lock-free fast path trusts _engine only once the pid
        # matches, and by then the sessionmaker is the new engine's.
        _sessionmaker = sessionmaker(engine, expire_on_commit=False)
        _engine = engine
        _engine_pid = os.getpid()
    return _engine


def dispose_after_fork(**_: Any) -> None:
    """Signal handler for worker_process_init: drop the parent's pool in the child."""
    global _engine
    if _engine is not None:
        _engine.dispose(close=False)
        _engine = None


def reset_engine() -> None:
    """Close the pool (tests switch databases; `warden up` stops servers)."""
    global _engine
    if _engine is not None:
        _engine.dispose()
        _engine = None


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception."""
    get_engine()
    assert _sessionmaker is not None
    session = _sessionmaker()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
