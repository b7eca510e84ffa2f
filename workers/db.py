"""Engines and sessions: one engine per process, one transaction per unit of work.

Why per process: a pooled connection inherited across fork() would be shared by two
processes; the pool is rebuilt in the child (see `dispose_after_fork`).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from sqlalchemy import MetaData, create_engine
from sqlalchemy.engine import Connection, Engine
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


class _ProcessEngines:
    """The process's two pools, created on first use and re-created after a fork.

    `main`: sessions and multi-statement transactions, with a pre-ping so a request after a
    database restart gets a fresh connection. `fast`: single statements in autocommit, no
    pre-ping: one round trip per statement instead of four (pre-ping, BEGIN, statement,
    COMMIT). It serves the hot paths (accept, claim, record), whose callers treat a stale
    connection's OperationalError as transient.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid: int | None = None
        self.main: Engine | None = None
        self.fast: Engine | None = None
        self.maker: sessionmaker[Session] | None = None

    def ready(self) -> bool:
        return self.pid == os.getpid() and self.maker is not None

    def build(self) -> None:
        with self.lock:  # the API's first requests arrive on many threads at once
            if self.ready():
                return
            self.forget(close=False)  # inherited from a parent: its sockets, not ours
            dsn = get_settings().database_dsn()
            # TCP keepalives: a half-open socket (a vanished database host, a NAT that
            # dropped the flow) fails in ~40 s instead of hanging a relay or heartbeat.
            connect_args = {"connect_timeout": 5, "application_name": "warden",
                            "keepalives": 1, "keepalives_idle": 10,
                            "keepalives_interval": 5, "keepalives_count": 3}
            # 10 + 30: the API's thread pool has 40 threads; a request waits for a
            # connection (503, not 500, past pool_timeout) rather than failing at once.
            main = create_engine(dsn, pool_pre_ping=True, pool_size=10, max_overflow=30,
                                 pool_timeout=10, connect_args=connect_args)
            fast = create_engine(dsn, isolation_level="AUTOCOMMIT", pool_size=10,
                                 max_overflow=30, pool_timeout=10, connect_args=connect_args)
            # Publish the pid last: the lock-free check trusts the engines once it matches.
            self.main, self.fast = main, fast
            self.maker = sessionmaker(main, expire_on_commit=False)
            self.pid = os.getpid()

    def forget(self, *, close: bool) -> None:
        for engine in (self.main, self.fast):
            if engine is not None:
                engine.dispose(close=close)
        self.main = self.fast = None
        self.maker = None
        self.pid = None


_engines = _ProcessEngines()


def _after_fork_in_child() -> None:
    # A fork while another thread (the relay in a worker's main process) held the lock
    # would leave it locked forever in the child.
    _engines.lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def get_engine() -> Engine:
    """The process's engine for sessions (transactions of several statements)."""
    if not _engines.ready():
        _engines.build()
    assert _engines.main is not None
    return _engines.main


def dispose_after_fork(**_: Any) -> None:
    """Signal handler for worker_process_init: drop the parent's pools in the child."""
    _engines.forget(close=False)


def reset_engine() -> None:
    """Close the pools (tests switch databases; `warden up` stops servers)."""
    _engines.forget(close=True)


@contextmanager
def autocommit() -> Iterator[Connection]:
    """A connection whose every statement commits on its own (single-statement changes)."""
    if not _engines.ready():
        _engines.build()
    assert _engines.fast is not None
    with _engines.fast.connect() as conn:
        yield conn


def get_sessionmaker() -> sessionmaker[Session]:
    """The process's session factory (sessions on the pre-pinged pool)."""
    get_engine()
    assert _engines.maker is not None
    return _engines.maker


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception."""
    get_engine()
    assert _engines.maker is not None
    session = _engines.maker()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


class PoolTimeout(RuntimeError):
    """No database connection became free in time (the API answers 503)."""


class AsyncPool:
    """A few autocommit psycopg connections for the API's event loop.

    Why not the thread pool: every hop to it costs the accept path more CPU than the insert
    itself (measured in bench/). Connections are opened on demand, reused, and dropped
    after any database error (their state is unknown).
    """

    def __init__(self, size: int = 10, wait: float = 10.0) -> None:
        self.size, self.wait = size, wait
        self._idle: list[psycopg.AsyncConnection[dict[str, Any]]] = []
        self._slots: asyncio.Semaphore | None = None

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[dict[str, Any]]]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.wait)
        except TimeoutError as exc:
            raise PoolTimeout(f"no database connection free after {self.wait:.0f}s") from exc
        try:
            conn = self._idle.pop() if self._idle else await psycopg.AsyncConnection.connect(
                get_settings().libpq_dsn(), autocommit=True, row_factory=dict_row,
                connect_timeout=5, application_name="warden-api",
            )
            broken = False
            try:
                yield conn
            except psycopg.Error:
                broken = True
                raise
            finally:
                # Back to the pool whatever the caller raised (a 409 is not the connection's
                # fault); dropped after a database error, whose state is unknown.
                if broken or conn.closed or conn.info.transaction_status != 0:
                    await conn.close()
                else:
                    self._idle.append(conn)
        finally:
            self._slots.release()

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop().close()
