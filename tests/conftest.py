"""Real services for the whole suite.

WARDEN_TEST_DATABASE_URL / WARDEN_TEST_REDIS_URL point the suite at existing servers (a
fresh database is created on that server, and the Redis DB is flushed); without them the
suite starts embedded PostgreSQL and Redis on free ports in a temp dir.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import redis

from workers.children import Child
from workers.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
# Fast knobs for tests: short backoff and leases, an eager relay. Each is a real setting.
TEST_SETTINGS = {
    "WARDEN_RETRY_BACKOFF_BASE": "0.2",
    "WARDEN_RETRY_BACKOFF_MAX": "1",
    "WARDEN_LEASE_TTL": "3",
    "WARDEN_RELAY_INTERVAL": "0.5",
    "WARDEN_RELAY_GRACE": "1",
    "WARDEN_RELAY_LOST_AFTER": "3",
    "WARDEN_TOKEN_CACHE_SECONDS": "0",
    "WARDEN_EXTRA_TASK_MODULES": '["tests.support.tasks"]',
    "WARDEN_LOG_LEVEL": "INFO",
    # A worker that does not know a type fails it at once (tests of a rolling deploy set
    # their own grace).
    "WARDEN_UNKNOWN_TYPE_GRACE": "0",
}


@dataclass
class Services:
    database_url: str
    redis_url: str
    data_dir: Path
    cleanups: list[object] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_")}
        env.update(TEST_SETTINGS)
        env.update(WARDEN_DATABASE_URL=self.database_url, WARDEN_REDIS_URL=self.redis_url,
                   WARDEN_DATA_DIR=str(self.data_dir))
        env.update(extra)
        return env


@contextlib.contextmanager
def fresh_database(services: Services) -> Iterator[str]:
    """A migrated database of its own, for tests whose relay must not meet other tests' jobs."""
    from workers.migrate import upgrade

    url, admin = _fresh_database(services.database_url)
    try:
        upgrade(url=url)
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


@dataclass
class Isolated:
    """A deployment of its own: a fresh database and a Redis server nobody else uses, for
    tests that restart, pause or cut that Redis, or whose relay must meet only their jobs."""

    database_url: str
    redis_url: str
    redis: EmbeddedRedis
    env: dict[str, str]

    def insert_job(self, job_type: str, params: dict[str, object], **cols: object) -> str:
        """A job row as the API would commit it, left for the relay to publish."""
        import json

        job_id = str(uuid.uuid4())
        names = ["id", "type", "params", *cols]
        values = [job_id, job_type, json.dumps(params), *cols.values()]
        marks = ", ".join(["%s", "%s", "%s::jsonb"] + ["%s"] * len(cols))
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(f"INSERT INTO job_runs ({', '.join(names)}) VALUES ({marks})", values)
        return job_id

    def job(self, job_id: str) -> dict[str, object]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            cur = conn.execute("SELECT * FROM job_runs WHERE id = %s", (job_id,))
            row = cur.fetchone()
            assert row is not None, job_id
            return dict(zip([d.name for d in cur.description or []], row, strict=True))

    def wait(self, job_id: str, statuses: set[str], timeout: float = 60) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        row = self.job(job_id)
        while row["status"] not in statuses and time.monotonic() < deadline:
            time.sleep(0.1)
            row = self.job(job_id)
        assert row["status"] in statuses, row
        return row

    def count(self, sql: str, *args: object) -> int:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            row = conn.execute(sql, args).fetchone()
        assert row is not None
        return int(row[0])


@contextlib.contextmanager
def isolated(services: Services, tmp: Path) -> Iterator[Isolated]:
    """A fresh database and a Redis of its own, and the env that points processes at them."""
    with fresh_database(services) as db_url:
        from tests.support.tasks import EFFECTS_DDL

        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(EFFECTS_DDL)
        rd = EmbeddedRedis(tmp)
        redis_url = rd.start()
        try:
            yield Isolated(db_url, redis_url, rd,
                           {"WARDEN_DATABASE_URL": db_url, "WARDEN_REDIS_URL": redis_url})
        finally:
            rd.stop()


def _fresh_database(server_url: str) -> tuple[str, str]:
    """Create warden_test_<random> on the server; return (its URL, admin URL)."""
    parts = urlsplit(server_url.replace("postgresql+psycopg://", "postgresql://"))
    admin = urlunsplit(parts._replace(path="/postgres"))
    name = f"warden_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(parts._replace(path=f"/{name}")), admin


def _redis_db_of_this_worker(url: str) -> str:
    """Under pytest-xdist each test process gets a Redis database of its own on a given
    server (the URL's, then the ones below it: gw0 15, gw1 14, ...), so one process's flush
    or queue never meets another's."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker.removeprefix("gw") or 0)
    parts = urlsplit(url)
    base = int(parts.path.lstrip("/") or 0)
    if base - index < 0:
        raise RuntimeError(f"{url}: too few Redis databases below it for xdist {worker}")
    return urlunsplit(parts._replace(path=f"/{base - index}"))


def _apply_env(services: Services) -> None:
    from workers.db import reset_engine
    from workers.redis_client import reset_redis
    from workers.settings import get_settings

    for key in [k for k in os.environ if k.startswith("WARDEN_")]:
        del os.environ[key]
    os.environ.update(services.env())
    get_settings.cache_clear()
    reset_engine()
    reset_redis()


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    """Postgres (migrated) and Redis for the session, embedded unless given by env."""
    tmp = Path(tempfile.mkdtemp(prefix="warden-test-"))
    pg: EmbeddedPostgres | None = None
    rd: EmbeddedRedis | None = None
    drop: tuple[str, str] | None = None
    db_env, redis_env = os.environ.get("WARDEN_TEST_DATABASE_URL"), os.environ.get(
        "WARDEN_TEST_REDIS_URL")
    if db_env:
        db_url, admin = _fresh_database(db_env)
        drop = (admin, db_url.rsplit("/", 1)[1])
    else:
        pg = EmbeddedPostgres(tmp)
        db_url = pg.start()
    if redis_env:
        redis_url = _redis_db_of_this_worker(redis_env)
        redis.Redis.from_url(redis_url).flushdb()
    else:
        rd = EmbeddedRedis(tmp)
        redis_url = rd.start()
    svc = Services(db_url, redis_url, tmp)
    _apply_env(svc)
    from workers.migrate import upgrade

    upgrade()
    from tests.support.tasks import EFFECTS_DDL

    with psycopg.connect(db_url) as conn:
        conn.execute(EFFECTS_DDL)
    try:
        yield svc
    finally:
        from workers.db import reset_engine

        reset_engine()
        if pg is not None:
            pg.stop()
        if rd is not None:
            rd.stop()
        if drop is not None:
            with psycopg.connect(drop[0], autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{drop[1]}" WITH (FORCE)')


@pytest.fixture
def db(services: Services) -> Iterator[psycopg.Connection]:
    """A plain autocommit connection for given/then SQL in tests."""
    with psycopg.connect(services.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def rds(services: Services) -> redis.Redis:
    return redis.Redis.from_url(services.redis_url, decode_responses=True)


class Proc(Child):
    """A `warden` child of the tests (see workers.children)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        super().__init__(["-m", "cli.main", *args], env, log, cwd=ROOT)


def start_worker(services: Services, name: str, *, concurrency: int = 2,
                 env: dict[str, str] | None = None) -> Proc:
    """A real Celery worker process; returns once it consumes."""
    extra = dict(env or {})
    log = services.data_dir / f"worker-{name}-{uuid.uuid4().hex[:6]}.log"
    proc = Proc(["worker", "-c", str(concurrency), "-n", f"{name}-{uuid.uuid4().hex[:6]}@%h"],
                services.env(**extra), log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "ready" in proc.tail(100_000):
            return proc
        if proc.popen.poll() is not None:
            raise RuntimeError(f"worker exited: {proc.tail()}")
        time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"worker not ready: {proc.tail()}")


def start_api(services: Services, *, env: dict[str, str] | None = None) -> tuple[Proc, str]:
    """The real API (uvicorn, with the relay) on a free port; returns (proc, base URL)."""
    port = free_port()
    extra = dict(env or {})
    proc = Proc(["api", "--port", str(port)], services.env(**extra),
                services.data_dir / f"api-{port}.log")
    try:
        wait_for_port(port, 60, proc.popen)  # type: ignore[arg-type]
    except Exception as exc:
        proc.stop()
        raise RuntimeError(f"api did not start: {proc.tail()}") from exc
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def worker(services: Services) -> Iterator[Proc]:
    """One shared worker for tests that only need jobs to run (it adopts bare `celery call`
    messages, as a deployment that allows them does)."""
    proc = start_worker(services, "shared", env={"WARDEN_ADOPT_BARE_MESSAGES": "true"})
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def api(services: Services) -> Iterator[str]:
    proc, url = start_api(services)
    yield url
    proc.stop()


@pytest.fixture(scope="session")
def tokens(services: Services) -> dict[str, str]:
    """One token per scope set, created the way `warden token create` does."""
    from workers.tokens import create_token

    tag = uuid.uuid4().hex[:6]
    return {
        "admin": create_token(f"t-admin-{tag}", ["admin"]),
        "enqueue": create_token(f"t-enqueue-{tag}", ["enqueue", "read"]),
        "read": create_token(f"t-read-{tag}", ["read"]),
    }


@pytest.fixture
def client(api: str, tokens: dict[str, str]) -> Iterator[httpx.Client]:
    """HTTP client with the enqueue+read token."""
    with httpx.Client(base_url=api, timeout=10,
                      headers={"Authorization": f"Bearer {tokens['enqueue']}"}) as c:
        yield c


def wait_for_status(job_id: str, statuses: set[str], timeout: float = 30) -> dict[str, object]:
    """Poll job_runs until the job reaches one of the statuses."""
    from workers import jobstore

    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        row = jobstore.get(job_id)
        if row is not None and row["status"] in statuses:
            return dict(row)
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not in {statuses} after {timeout}s: {row and dict(row)}")
