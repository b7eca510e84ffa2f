"""Servers and child processes for one bench run, all torn down on exit, error or Ctrl-C.

Why a module of its own: every phase starts processes (worker, API, load generator) and
each must die with its whole process group even when the run is interrupted, so the
bookkeeping lives in one place (an ExitStack owned by `Services`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis

from workers.children import Child
from workers.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent

# Production defaults everywhere (token cache, leases, relay) except the one extra task
# module: the bench measures the platform as deployed, not the test suite's fast knobs.
BENCH_SETTINGS = {
    "WARDEN_EXTRA_TASK_MODULES": '["bench.tasks"]',
    "WARDEN_LOG_LEVEL": "INFO",
}


class Proc(Child):
    """A bench child (see workers.children), run from the repo root."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        super().__init__(argv, env, log, cwd=ROOT)


@dataclass
class Services:
    """Postgres (migrated) and Redis for the run, plus every process started on them."""

    database_url: str
    redis_url: str
    data_dir: Path
    stack: ExitStack = field(default_factory=ExitStack)
    # Embedded server pids by name, for CPU accounting (empty for external servers).
    server_pids: dict[str, int] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        """Child env built like the test suite's: no inherited WARDEN_* leaks in."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_")}
        env.update(BENCH_SETTINGS)
        env.update(WARDEN_DATABASE_URL=self.database_url, WARDEN_REDIS_URL=self.redis_url,
                   WARDEN_DATA_DIR=str(self.data_dir))
        env.update(extra)
        return env

    def spawn(self, argv: list[str], name: str, **extra: str) -> Proc:
        """Start `python <argv>`; it is stopped when the run ends, whatever happens."""
        log = self.data_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        proc = Proc(argv, self.env(**extra), log)
        self.stack.callback(proc.stop)
        return proc

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def sql(self, statement: str) -> None:
        """One autocommit statement (TRUNCATE between phases)."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(statement)

    def reset_queues(self) -> None:
        """Empty job_runs and the broker so each phase starts from the same state."""
        self.sql("TRUNCATE job_runs")
        self.redis().flushdb()


def start_worker(svc: Services, concurrency: int) -> Proc:
    """A real worker (`warden worker`), returned once it consumes."""
    proc = svc.spawn(["-m", "cli.main", "worker", "-c", str(concurrency),
                      "-n", f"bench-{uuid.uuid4().hex[:6]}@%h"], "worker")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if " ready." in proc.tail(200_000):
            return proc
        if not proc.alive():
            raise RuntimeError(f"worker exited:\n{proc.tail()}")
        time.sleep(0.05)
    raise RuntimeError(f"worker not ready after 60 s:\n{proc.tail()}")


def start_http(svc: Services, argv: list[str], name: str, port: int, **extra: str) -> Proc:
    """An HTTP server child, returned once its port accepts (uvicorn binds after startup)."""
    proc = svc.spawn(argv, name, **extra)
    try:
        wait_for_port(port, 60, proc.popen)
    except Exception as exc:
        raise RuntimeError(f"{name} did not start:\n{proc.tail()}") from exc
    return proc


def _scratch_database(server_url: str) -> tuple[str, str, str]:
    """Create warden_bench_<random>; return (its URL, admin URL, name)."""
    parts = urlsplit(server_url.replace("postgresql+psycopg://", "postgresql://"))
    admin = urlunsplit(parts._replace(path="/postgres"))
    name = f"warden_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(parts._replace(path=f"/{name}")), admin, name


def _drop_database(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def apply_env(svc: Services) -> None:
    """Point this process's settings, engine and Redis client at the bench servers."""
    from workers.db import reset_engine
    from workers.redis_client import reset_redis
    from workers.settings import get_settings

    for key in [k for k in os.environ if k.startswith("WARDEN_") and
                not k.startswith("WARDEN_BENCH_")]:
        del os.environ[key]
    os.environ.update({k: v for k, v in svc.env().items() if k.startswith("WARDEN_")})
    get_settings.cache_clear()
    reset_engine()
    reset_redis()


@contextlib.contextmanager
def services() -> Iterator[Services]:
    """Embedded servers in a temp dir (or the WARDEN_BENCH_* ones), migrated; all cleaned up."""
    tmp = Path(tempfile.mkdtemp(prefix="warden-bench-"))
    with ExitStack() as outer:
        outer.callback(shutil.rmtree, tmp, True)
        db_env = os.environ.get("WARDEN_BENCH_DATABASE_URL")
        redis_env = os.environ.get("WARDEN_BENCH_REDIS_URL")
        pids: dict[str, int] = {}
        if db_env:
            db_url, admin, name = _scratch_database(db_env)
            outer.callback(_drop_database, admin, name)
        else:
            pg = EmbeddedPostgres(tmp)
            outer.callback(pg.stop)
            db_url = pg.start()
            pids["postgres"] = pg.proc.pid if pg.proc else 0
        if redis_env:
            redis_url = redis_env
        else:
            rd = EmbeddedRedis(tmp)
            outer.callback(rd.stop)
            redis_url = rd.start()
            pids["redis"] = rd.proc.pid if rd.proc else 0
        redis.Redis.from_url(redis_url).flushdb()
        svc = Services(db_url, redis_url, tmp, server_pids=pids)
        apply_env(svc)
        from workers.db import reset_engine
        from workers.migrate import upgrade

        outer.callback(reset_engine)  # close our pool before the server (or DB) goes away
        upgrade()
        # Children go first (LIFO): they hold connections to the servers stopped above.
        with svc.stack:
            try:
                yield svc
            finally:
                _shield_cleanup()


def _shield_cleanup() -> None:
    """A second Ctrl-C (or a SIGTERM) must not cut the teardown short and leave strays."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def new_port() -> int:
    """A free loopback port (never 5432/6379)."""
    return free_port()
