"""PostgreSQL client tools for backups: which pg_dump/pg_restore to run, and how to run them
without the password ever showing in a process list or a log.

Why a major version at least the server's: an older pg_dump refuses a newer server (or, for
pg_restore, a newer archive), and a newer one may emit statements an older server rejects
(pg_dump 17 writes `SET transaction_timeout`), so the same major is preferred, then the
nearest newer one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from workers.embedded import EmbeddedError, pg_bin_dir
from workers.errors import JobError
from workers.settings import get_settings

TOOLS = ("pg_dump", "pg_restore")
DEBIAN_ROOT = Path("/usr/lib/postgresql")  # Debian/Ubuntu: /usr/lib/postgresql/<major>/bin
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
# What the tools inherit: nothing else (the worker's environment holds WARDEN_DATABASE_URL,
# password included; libpq's PG* variables would redirect the tools behind our back).
_KEPT_ENV = re.compile(r"^(PATH|HOME|USER|LOGNAME|LANG|LANGUAGE|LC_[A-Z]+|TZ|TMPDIR)$")


class PgToolsError(JobError):
    """No usable pg_dump/pg_restore: named, with what was found and how to fix it."""

    code = "pg_tools_unusable"


class PgToolsTooOld(PgToolsError):
    """The client tools are older than the server (or than the archive)."""

    code = "pg_dump_too_old"


@dataclass(frozen=True)
class PgTools:
    """pg_dump and pg_restore from one directory, and their major version."""

    bin_dir: Path
    major: int
    version: str

    def path(self, tool: str) -> str:
        return str(self.bin_dir / tool)


def tool_version(binary: Path) -> tuple[int, str]:
    """(major, "15.20") from `<binary> --version`; PgToolsError if it does not run."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise PgToolsError(f"{binary} --version failed: {exc}") from exc
    match = _VERSION.search(out)
    if not match:
        raise PgToolsError(f"{binary} --version printed no PostgreSQL version: {out.strip()!r}")
    major, minor = int(match[1]), match[2]
    return major, f"{major}.{minor}" if minor is not None else str(major)


def _candidate_dirs() -> list[Path]:
    """Where client tools may be: the embedded wheel's, Debian's per-major dirs, PATH's."""
    dirs: list[Path] = []
    with contextlib.suppress(EmbeddedError):
        dirs.append(pg_bin_dir())
    if DEBIAN_ROOT.is_dir():
        dirs += sorted((p / "bin" for p in DEBIAN_ROOT.iterdir() if p.name.isdigit()),
                       key=lambda p: -int(p.parent.name))
    on_path = shutil.which("pg_dump")
    if on_path:
        dirs.append(Path(on_path).resolve().parent)
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _usable(bin_dir: Path) -> PgTools | None:
    if not all(os.access(bin_dir / tool, os.X_OK) for tool in TOOLS):
        return None
    try:
        major, version = tool_version(bin_dir / "pg_dump")
        restore_major, _ = tool_version(bin_dir / "pg_restore")
    except PgToolsError:
        return None
    return PgTools(bin_dir, major, version) if restore_major == major else None


# pg_restore 17+ writes `SET transaction_timeout = 0` into every restore, which servers
# before 17 reject ("unrecognized configuration parameter", seen with pg_restore 18.6 into
# PostgreSQL 15); and an archive of pg_dump 17+ needs pg_restore 17+ to be read. So tools of
# 17 or newer can neither back up nor restore a server older than 17.
TRANSACTION_TIMEOUT_MAJOR = 17


def compatible(tools_major: int, server_major: int, archive_major: int = 0) -> bool:
    """Whether tools of `tools_major` can dump `server_major` and restore what they dump
    (and read an archive of `archive_major`) into it."""
    if tools_major < max(server_major, archive_major):
        return False
    return server_major >= TRANSACTION_TIMEOUT_MAJOR or tools_major < TRANSACTION_TIMEOUT_MAJOR


def _explain(tools: PgTools, server_major: int, archive_major: int, where: str) -> PgToolsError:
    need = max(server_major, archive_major)
    if tools.major < need:
        return PgToolsTooOld(
            f"pg_dump {tools.version} {where} is older than PostgreSQL {need} (the "
            f"{'server' if need == server_major else 'archive'}); point WARDEN_PG_BIN_DIR at "
            f"client tools of version {need} or newer")
    return PgToolsError(
        f"pg_dump/pg_restore {tools.version} {where} cannot restore into PostgreSQL "
        f"{server_major} (tools {TRANSACTION_TIMEOUT_MAJOR}+ write SET transaction_timeout, "
        f"which it rejects); install the client tools of version {server_major} or point "
        "WARDEN_PG_BIN_DIR at them")


def find_tools(server_major: int, archive_major: int = 0) -> PgTools:
    """The tools to use against a server of `server_major` (and, for a restore, an archive
    written by pg_dump `archive_major`).

    WARDEN_PG_BIN_DIR, when set, is the only candidate (an explicit choice is never
    replaced by another); otherwise the same major as the server is preferred, then the
    nearest newer compatible one.
    """
    configured = get_settings().pg_bin_dir
    if configured is not None:
        tools = _usable(configured)
        if tools is None:
            raise PgToolsError(f"WARDEN_PG_BIN_DIR={configured} has no runnable pg_dump and "
                               "pg_restore of one version")
        if not compatible(tools.major, server_major, archive_major):
            raise _explain(tools, server_major, archive_major,
                           f"in WARDEN_PG_BIN_DIR={configured}")
        return tools
    found = [t for t in (_usable(d) for d in _candidate_dirs()) if t is not None]
    fitting = sorted((t for t in found if compatible(t.major, server_major, archive_major)),
                     key=lambda t: t.major)
    if fitting:
        return fitting[0]
    need = max(server_major, archive_major)
    seen = ", ".join(f"{t.version} ({t.bin_dir})" for t in found) or "none"
    too_old = not found or all(t.major < need for t in found)
    error = PgToolsTooOld if found and too_old else PgToolsError
    raise error(f"no pg_dump/pg_restore usable with PostgreSQL {server_major}"
                + (f" and an archive of pg_dump {archive_major}" if archive_major > server_major
                   else "")
                + f" (found: {seen}); install the client tools of version {need} or set "
                "WARDEN_PG_BIN_DIR")


@dataclass(frozen=True)
class Target:
    """A database to connect the tools to, kept apart from its password."""

    params: dict[str, Any]

    @classmethod
    def from_url(cls, url: str) -> Target:
        return cls(conninfo_to_dict(url.replace("postgresql+psycopg://", "postgresql://", 1)))

    @property
    def dbname(self) -> str:
        return str(self.params.get("dbname") or self.params.get("user") or "postgres")

    @property
    def password(self) -> str | None:
        value = self.params.get("password")
        return str(value) if value else None

    def with_db(self, dbname: str) -> Target:
        return Target({**self.params, "dbname": dbname})

    def conninfo(self) -> str:
        """For the tools' --dbname: everything but the password (it goes in a passfile)."""
        clean = {k: v for k, v in self.params.items() if k not in ("password", "passfile")}
        clean.setdefault("application_name", "warden-backup")
        return make_conninfo(**clean)

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """A psycopg connection (in-process: the password never leaves this process)."""
        return psycopg.connect(make_conninfo(**self.params), connect_timeout=10, **kwargs)


def _passfile_line(password: str) -> str:
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    return f"*:*:*:*:{escaped}\n"


@contextlib.contextmanager
def tool_env(target: Target) -> Iterator[dict[str, str]]:
    """The tools' environment: locale and paths only, the password in a 0600 PGPASSFILE
    (never on the command line, never in PGPASSWORD), removed afterwards."""
    env = {k: v for k, v in os.environ.items() if _KEPT_ENV.match(k)}
    if target.password is None:
        yield env
        return
    with tempfile.TemporaryDirectory(prefix="warden-pgpass-") as tmp:
        path = Path(tmp) / "pgpass"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(_passfile_line(target.password))
        env["PGPASSFILE"] = str(path)
        yield env


def child_argv(argv: list[str]) -> list[str]:
    """Prefix that kills the tool when the process that started it dies (SIGKILL of a worker
    must not leave a pg_dump running on): util-linux setpriv, where present."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


def server_version(conn: psycopg.Connection[Any]) -> tuple[int, str]:
    """(server_version_num, "15.20") of the connected server."""
    row = conn.execute("SELECT current_setting('server_version_num')::int, "
                       "current_setting('server_version')").fetchone()
    assert row is not None
    return int(row[0]), str(row[1]).split(" ")[0]


def stderr_tail(path: Path, limit: int = 2000) -> str:
    """The end of a tool's stderr (for an error message; the tools never print passwords)."""
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""
