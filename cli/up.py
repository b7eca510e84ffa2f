"""`warden up`: the whole platform in one terminal, stopped cleanly by Ctrl-C.

Children run in their own sessions so Ctrl-C reaches only this supervisor, which stops them
in order (producers first, servers last) and kills any straggler's whole process group.
One `warden up` per data dir: it holds `<data dir>/up.lock` while it runs (see lock_data_dir).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from workers.children import Child, warden
from workers.settings import Settings, SettingsError, get_settings

if TYPE_CHECKING:
    from workers.embedded import EmbeddedPostgres, EmbeddedRedis

LOCK_FILE = "up.lock"


class AlreadyRunning(RuntimeError):
    """Another `warden up` holds the data dir; the message says where it runs and its URLs."""


def lock_data_dir(data_dir: Path, api_url: str, flower_url: str) -> int:
    """Take `<data dir>/up.lock` for the life of this process; return its descriptor.

    Why: a second `warden up` on the same data dir used to stop the first one's PostgreSQL,
    start its own on the same files and rewrite services.json. It must find out before it
    touches anything. Why flock: the kernel drops the lock when the holder dies, SIGKILL
    included, so a lock file left behind never blocks a restart and no recorded pid has to
    be trusted. The holder's pid and URLs are written into the file, for the refusal message.
    Raises AlreadyRunning, having changed nothing, when another process holds the lock.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    # No O_TRUNC: until we hold the lock, the file is the holder's record. Not inherited by
    # children (O_CLOEXEC): a child outliving us must not keep the data dir locked.
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise AlreadyRunning(
            f"warden up is already running in {data_dir} (pid {holder.get('pid', 'unknown')}): "
            f"API {holder.get('api', '?')}  Flower {holder.get('flower', '?')}"
        ) from None
    record = json.dumps({"pid": os.getpid(), "api": api_url, "flower": flower_url})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (record + "\n").encode(), 0)
    return fd


def _lock_holder(fd: int) -> dict[str, Any]:
    """The holder's record; it writes it just after taking the lock, so wait a moment for it."""
    deadline = time.monotonic() + 1.0
    while True:
        with contextlib.suppress(ValueError):
            data = json.loads(os.pread(fd, 4096, 0) or b"null")
            if isinstance(data, dict):
                return data
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.05)


def unlock_data_dir(fd: int) -> None:
    """Clear the record (nobody runs here any more) and drop the lock.

    The file itself stays: removing it would let two `warden up`s run at once, one locking
    the removed file it had just opened, the other a new file of the same name.
    """
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)


def _exit_text(code: int | None) -> str:
    """`-9 (SIGKILL)` for a signal, the plain code otherwise."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)


def dead_server(
    servers: list[tuple[str, EmbeddedPostgres | EmbeddedRedis | None]],
) -> str | None:
    """A line for the first embedded server whose process has exited, else None."""
    for name, server in servers:
        if server is None or server.proc is None:
            continue
        code = server.proc.poll()
        if code is not None:
            return (f"embedded {name} (pid {server.proc.pid}) exited with {_exit_text(code)}; "
                    f"see {server.log}")
    return None


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def flower_credentials(settings: Settings) -> tuple[str, str]:
    """Configured credentials, or dev ones generated once into the data dir."""
    if settings.flower_password is not None:
        return settings.flower_user, settings.flower_password.get_secret_value()
    if settings.env == "prod":
        raise SettingsError("WARDEN_FLOWER_PASSWORD must be set in prod (Flower's API needs auth)")
    path = settings.data_dir / "flower-password"
    if path.exists():
        return settings.flower_user, path.read_text().strip()
    password = secrets.token_urlsafe(18)
    _write_secret(path, password)
    return settings.flower_user, password


def admin_token(settings: Settings) -> str:
    """The dev admin token in .warden/admin-token, created if missing or no longer valid."""
    from workers.tokens import create_token, token_is_valid

    path = settings.data_dir / "admin-token"
    if path.exists():
        current = path.read_text().strip()
        if current and token_is_valid(current):
            return current
    token = create_token(f"admin-{int(time.time())}", ["admin", "enqueue", "read"])
    _write_secret(path, token)
    return token


# A worker, beat or Flower that dies is restarted (jobs it held come back by the relay or the
# visibility timeout; beat's lock and Flower hold no state we need). The API and the
# embedded servers are what the other processes stand on: their exit stops everything.
RESTARTABLE = frozenset({"worker", "beat", "flower"})


class Restarts:
    """Backoff per child: 1 s, doubling to 60 s; reset after 60 s of staying up."""

    FIRST, CAP, STABLE = 1.0, 60.0, 60.0

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.backoff: dict[str, float] = {}
        self.not_before: dict[str, float] = {}
        self.started: dict[str, float] = {}

    def healthy(self, name: str) -> None:
        """A child seen alive: after STABLE seconds up, its backoff starts over."""
        if time.monotonic() - self.started.get(name, 0.0) > self.STABLE:
            self.backoff.pop(name, None)

    def due(self, name: str) -> float | None:
        """None while the child's backoff runs; else the delay the next exit will wait."""
        now = time.monotonic()
        if name not in self.not_before:
            self.not_before[name] = now + self.backoff.get(name, self.FIRST)
            return None
        if now < self.not_before[name]:
            return None
        del self.not_before[name]
        self.count[name] = self.count.get(name, 0) + 1
        self.backoff[name] = min(self.CAP, self.backoff.get(name, self.FIRST) * 2)
        self.started[name] = now
        return self.backoff[name]


def run_up(*, demo: bool, concurrency: int) -> int:
    """Start everything and supervise until Ctrl-C or a child dies; returns the exit code."""
    settings = get_settings()
    data_dir = settings.data_dir.resolve()
    api_url = f"http://{settings.api_host}:{settings.api_port}"
    flower_url = f"http://127.0.0.1:{settings.flower_port}"
    # First of all, before the slow imports and before any server or state file is touched.
    try:
        lock = lock_data_dir(data_dir, api_url, flower_url)
    except (AlreadyRunning, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    try:
        return _run_locked(settings, data_dir, api_url, flower_url, demo, concurrency)
    finally:
        unlock_data_dir(lock)


def _run_locked(settings: Settings, data_dir: Path, api_url: str, flower_url: str,
                demo: bool, concurrency: int) -> int:
    from workers import embedded
    from workers import logging as wlogging
    from workers.db import reset_engine
    from workers.migrate import upgrade

    wlogging.configure(settings.log_level, json=False)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line says it, below
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stop = {"sig": None}

    def on_signal(signum: int, _: Any) -> None:
        stop["sig"] = signum  # type: ignore[assignment]

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    env = dict(os.environ)
    pg: embedded.EmbeddedPostgres | None = None
    rd: embedded.EmbeddedRedis | None = None
    children: list[tuple[str, Child]] = []
    try:
        pg_port, rd_port = embedded.read_ports(data_dir)
        if settings.database_url is None:
            click.echo("starting embedded PostgreSQL ...")
            pg = embedded.EmbeddedPostgres(data_dir, pg_port)
            env["WARDEN_DATABASE_URL"] = pg.start()
        if settings.redis_url is None:
            click.echo("starting embedded Redis ...")
            rd = embedded.EmbeddedRedis(data_dir, rd_port)
            env["WARDEN_REDIS_URL"] = rd.start()
        db_url = env.get("WARDEN_DATABASE_URL") or settings.database_dsn()
        redis_url = env.get("WARDEN_REDIS_URL") or settings.redis_dsn()
        if pg is not None or rd is not None:
            # Only the embedded servers' URLs (no password in them) for other shells' commands.
            embedded.write_state(data_dir, pg.url if pg else "", rd.url if rd else "")
        get_settings.cache_clear()
        os.environ["WARDEN_DATABASE_URL"], os.environ["WARDEN_REDIS_URL"] = db_url, redis_url
        settings = get_settings()

        click.echo("applying migrations ...")
        upgrade(url=db_url)
        if demo:
            from domain.demo import seed_demo_if_empty

            loaded = seed_demo_if_empty()
            if loaded:
                click.echo(f"loaded demo data: {loaded}")
        token = admin_token(settings)
        fuser, fpass = flower_credentials(settings)
        reset_engine()

        specs: dict[str, tuple[list[str], dict[str, str]]] = {}
        for name, args in (
            ("worker", ["worker", "-c", str(concurrency), "-n", f"warden-up-{os.getpid()}@%h"]),
            ("api", ["api"]),
            ("beat", ["beat"]),
            ("flower", ["flower"]),
        ):
            child_env = dict(env)
            if name == "worker":
                # Ctrl-C stops the worker cold after a 10 s soft shutdown: running jobs go
                # back to the queue now, not after the visibility timeout.
                child_env["REMAP_SIGTERM"] = "SIGQUIT"
            specs[name] = (args, child_env)
            children.append((name, warden(args, child_env, logs / f"{name}.log")))
        restarts = Restarts()

        from workers.embedded import wait_for_port

        wait_for_port(settings.api_port, 60, children[1][1].popen)
        click.echo(
            "\nWarden is up.\n"
            f"  API        {api_url}   (docs {api_url}/docs)\n"
            f"  Flower     {flower_url}   "
            f"user {fuser}  password {fpass}\n"
            f"  Admin token (also in {data_dir / 'admin-token'}):\n    {token}\n"
            f"  Logs       {logs}/\n"
            "  Try:\n"
            f"    curl -s -X POST {api_url}/v1/jobs -H \"Authorization: Bearer $(cat "
            f"{data_dir / 'admin-token'})\" -H 'Content-Type: application/json' "
            "-d '{\"type\": \"platform.ping\", \"params\": {\"echo\": \"hello\"}}'\n"
            "Press Ctrl-C to stop.",
        )
        servers: list[tuple[str, embedded.EmbeddedPostgres | embedded.EmbeddedRedis | None]] = [
            ("PostgreSQL", pg), ("Redis", rd)]
        while stop["sig"] is None:
            # The servers first: when one dies, the API dying of it next is not the news.
            # No restart: a database restarted under running workers and open transactions
            # is not something to do behind the operator's back.
            dead = dead_server(servers)
            if dead is not None:
                click.echo(f"\nerror: {dead}; every process stands on it: stopping everything",
                           err=True)
                return 1
            for i, (name, proc) in enumerate(children):
                if proc.alive():
                    restarts.healthy(name)
                    continue
                code = proc.popen.returncode
                if name not in RESTARTABLE:
                    click.echo(f"{name} exited with {code}; see {logs / name}.log; "
                               "stopping everything", err=True)
                    return 1
                delay = restarts.due(name)
                if delay is None:
                    continue  # still backing off
                click.echo(f"{name} exited with {code}; restarting it (restart "
                           f"{restarts.count[name]}, next backoff {delay:.0f} s); see "
                           f"{logs / name}.log", err=True)
                args, child_env = specs[name]
                children[i] = (name, warden(args, child_env, logs / f"{name}.log"))
            time.sleep(0.3)
        with contextlib.suppress(OSError):
            click.echo("\nstopping ...")
        return 0
    except Exception as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    finally:
        for _, proc in reversed(children):  # flower, beat, api, then the worker
            proc.stop(20)
        if rd is not None:
            rd.stop()
        if pg is not None:
            pg.stop()
        if pg is not None or rd is not None:
            embedded.clear_state(data_dir)
        with contextlib.suppress(OSError):  # the terminal or a pipe may be gone by now
            click.echo("stopped.")
