"""backup.create under faults, against a real PostgreSQL: a process SIGKILLed at each step of
sealing the file, a full disk (a real tmpfs), client tools of the wrong major version (real
binaries), and what the fsyncs and renames are applied to."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.integration.test_backup_create import BackupEnv, backup_env, point_settings, seed_small

__all__ = ["backup_env"]

# Run create_backup in a child process that SIGKILLs itself when it reaches `point` (a
# function of tasks.backups.service); `_write_private` first writes the manifest's partial.
_KILL_AT = """
import os, signal, sys
from tasks.backups import service
point = sys.argv[1]
original = getattr(service, point)
def killed(*args, **kwargs):
    if point == "_write_private":
        original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(service, point, killed)
service.create_backup()
"""


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _final(directory: Path) -> list[str]:
    """Names that look like a finished backup (not hidden .partial ones)."""
    return [n for n in _files(directory) if not n.startswith(".")]


@pytest.mark.parametrize(("point", "left"), [
    # hashing and fsyncing the finished dump, before its rename: only the hidden partial
    ("sha256_file", ["partial"]),
    # the dump renamed, the manifest's partial written but not renamed
    ("_write_private", ["dump", "manifest partial"]),
    # both renamed, the directory not yet fsynced, the row not yet succeeded
    ("_fsync_dir", ["dump", "manifest"]),
])
def test_sigkill_while_sealing_leaves_no_succeeded_row_and_the_next_run_cleans_up(
        backup_env: BackupEnv, point: str, left: list[str]) -> None:
    from tasks.backups import restore, service
    from tasks.backups.pgtools import find_tools

    # given seeded data
    seed_small(60)
    # when the process making a backup is SIGKILLed at `point`
    done = subprocess.run([sys.executable, "-c", _KILL_AT, point], env=backup_env.env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr
    # then no row says succeeded: the backup is `running`, and a restore refuses it
    [(orphan_id, status)] = backup_env.sql("SELECT id, status FROM backups")
    assert status == "running"
    with pytest.raises(restore.RestoreRefused, match="running"):
        restore.locate(int(str(orphan_id)))
    # and a file under a final name is only ever a whole archive (renamed after pg_dump
    # succeeded and after its fsync)
    names = _files(backup_env.backup_dir)
    kinds = sorted("manifest partial" if n.endswith(".manifest.json.partial")
                   else "partial" if n.endswith(".partial")
                   else "manifest" if n.endswith(".manifest.json") else "dump" for n in names)
    assert kinds == sorted(left), names
    major = int(str(backup_env.sql("SHOW server_version_num")[0][0])) // 10000
    pg_restore = find_tools(major).path("pg_restore")
    for name in _final(backup_env.backup_dir):
        if name.endswith(".dump"):
            listed = subprocess.run([pg_restore, "--list", str(backup_env.backup_dir / name)],
                                    capture_output=True, text=True, check=False)
            assert listed.returncode == 0, listed.stderr
    # when the next backup runs
    made = service.create_backup()
    # then the orphan is failed as interrupted, every file of it gone (hidden ones too), and
    # the new backup is the only thing in the directory
    rows = backup_env.sql("SELECT id, status, error FROM backups ORDER BY id")
    assert rows[0][:2] == (orphan_id, "failed") and "interrupted" in str(rows[0][2])
    assert [r[1] for r in rows[1:]] == ["succeeded"]
    path = Path(made["path"])
    assert _files(backup_env.backup_dir) == sorted(
        [path.name, service.manifest_path(path).name])


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real filesystem of `size` (a tmpfs) at `path`; skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                              str(path)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_during_pg_dump_fails_clearly_and_leaves_nothing(
        backup_env: BackupEnv) -> None:
    from tasks.backups import service

    # given a backup directory on a 16 KiB filesystem, and more data than fits
    seed_small(400)
    with _tmpfs(backup_env.backup_dir, "16k"):
        # when a backup is made
        with pytest.raises(service.DumpFailed, match="No space left on device") as caught:
            service.create_backup()
        # then it is a clear, permanent failure, recorded on the row, and no file is left
        assert caught.value.code == "dump_failed"
        [(status, error)] = backup_env.sql("SELECT status, error FROM backups")
        assert status == "failed" and "No space left on device" in str(error)
        assert _files(backup_env.backup_dir) == []
        # and once there is room, the next backup succeeds
        subprocess.run(["mount", "-o", "remount,size=64m", str(backup_env.backup_dir)],
                       check=True)
        made = service.create_backup()
        assert len(_final(backup_env.backup_dir)) == 2
        assert service.verify_backup(made["backup_id"])["verdict"] == "passed"


def test_a_full_disk_while_writing_the_manifest_fails_clearly_and_leaves_nothing(
        backup_env: BackupEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.backups import service

    seed_small(60)
    with _tmpfs(backup_env.backup_dir, "8m"):
        # given the filesystem fills up (another writer) the moment the dump is sealed
        filler = backup_env.backup_dir / "filler"
        original = service._write_private

        def fill_then_write(path: Path, data: bytes) -> None:
            with open(filler, "wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            original(path, data)

        monkeypatch.setattr(service, "_write_private", fill_then_write)
        # when a backup is made, then it fails as a dump failure naming the full disk
        with pytest.raises(service.DumpFailed, match="No space left on device"):
            service.create_backup()
        # and the row is failed, and nothing of the backup is left, no hidden partial either
        [(status, error)] = backup_env.sql("SELECT status, error FROM backups")
        assert status == "failed" and "No space left on device" in str(error)
        assert _files(backup_env.backup_dir) == ["filler"]


def _other_tools(server_major: int) -> tuple[Path, str] | None:
    """Real client tools that must be refused for this server, and why: the Debian 15 tools
    for a server of 16+ (too old), the embedded wheel's 17+ tools for a server before 17
    (their restore sets transaction_timeout, which it rejects)."""
    from tasks.backups.pgtools import tool_version
    from workers.embedded import pg_bin_dir

    if server_major >= 16:
        old = Path("/usr/lib/postgresql/15/bin")
        return (old, "older than PostgreSQL") if (old / "pg_dump").exists() else None
    wheel = pg_bin_dir()
    if tool_version(wheel / "pg_dump")[0] < 17:
        return None
    return wheel, "transaction_timeout"


def test_real_client_tools_of_the_wrong_major_are_refused_before_anything_is_written(
        backup_env: BackupEnv) -> None:
    from tasks.backups import restore, service
    from tasks.backups.pgtools import PgToolsError

    # given a good, verified backup made with the tools found for this server
    seed_small(40)
    made = service.create_backup()
    service.verify_backup(made["backup_id"])
    before = _files(backup_env.backup_dir)
    major = int(str(backup_env.sql("SHOW server_version_num")[0][0])) // 10000
    other = _other_tools(major)
    if other is None:
        pytest.skip("no client tools of a refused major version installed")
    bin_dir, why = other
    # when WARDEN_PG_BIN_DIR names real tools of a major that cannot serve this server
    point_settings({"WARDEN_PG_BIN_DIR": str(bin_dir)})
    try:
        # then a backup is a clear error naming the setting, before any row or file
        with pytest.raises(PgToolsError, match=why) as caught:
            service.create_backup()
        assert "WARDEN_PG_BIN_DIR" in str(caught.value)
        assert backup_env.sql("SELECT count(*) FROM backups") == [(1,)]
        assert _files(backup_env.backup_dir) == before
        # and a verification is refused without blaming the backup (its verdict stands)
        with pytest.raises(PgToolsError):
            service.verify_backup(made["backup_id"])
        assert backup_env.sql("SELECT verdict FROM backups") == [("passed",)]
        # and a restore is refused before its target database is created
        copy = f"{backup_env.dbname}_wrongtools"
        with pytest.raises(PgToolsError):
            restore.restore(made["backup_id"], copy)
        assert backup_env.sql("SELECT count(*) FROM pg_database WHERE datname = %s",
                              copy) == [(0,)]
    finally:
        del os.environ["WARDEN_PG_BIN_DIR"]
        point_settings({})


def test_the_dump_is_fsynced_before_its_rename_and_the_directory_after(
        backup_env: BackupEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.backups import service

    # given every fsync and rename is recorded (by the path it applies to)
    seed_small(20)
    events: list[tuple[str, Any]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("rename", (Path(src).name, Path(dst).name)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    # when a backup is made
    made = service.create_backup()
    monkeypatch.undo()
    # then the dump is fsynced under its partial name, then renamed; the manifest likewise;
    # then the directory is fsynced, so both renames are durable before the row says so
    dump = Path(made["path"])
    manifest = service.manifest_path(dump)
    directory = str(backup_env.backup_dir)
    mine = [e for e in events if e[0] == "rename" or str(e[1]).startswith(directory)]
    assert mine == [
        ("fsync", f"{directory}/.{dump.name}.partial"),
        ("rename", (f".{dump.name}.partial", dump.name)),
        ("fsync", f"{directory}/.{manifest.name}.partial"),
        ("rename", (f".{manifest.name}.partial", manifest.name)),
        ("fsync", directory),
    ]


def test_a_server_out_of_disk_during_the_verify_restore_is_no_verdict_on_the_backup(
        backup_env: BackupEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.backups import service

    # given a good backup, and a tablespace on a filesystem that holds an empty database's
    # files but not the restored rows (the server's disk filling up during a verification)
    seed_small(1500)
    made = service.create_backup()
    [(data_dir, live_size, empty_size)] = backup_env.sql(
        "SELECT current_setting('data_directory'), pg_database_size(current_database()), "
        "pg_database_size('template0')")
    owner = os.stat(str(data_dir))
    size = int(str(empty_size)) + (int(str(live_size)) - int(str(empty_size))) // 3
    space = f"bk_tiny_{backup_env.dbname[-10:]}"
    # (outside pytest's 0700 tmp dir: the server's own user must reach it)
    where = Path(tempfile.mkdtemp(prefix="warden-tiny-"))
    where.chmod(0o755)
    request_cleanup = contextlib.ExitStack()
    request_cleanup.callback(shutil.rmtree, where, ignore_errors=True)
    with request_cleanup, _tmpfs(where / "space", f"{size // 4096 * 4096},uid={owner.st_uid},"
                f"gid={owner.st_gid}") as tiny:
        backup_env.sql(f"CREATE TABLESPACE {space} LOCATION '{tiny}'")
        original = service.run_tool

        def on_tiny_disk(argv: list[str], *args: Any, **kwargs: Any) -> Any:
            # the scratch database, made a moment ago, is moved onto the small filesystem
            for (name,) in backup_env.sql("SELECT datname FROM pg_database WHERE "
                                          "left(datname, %s) = %s", len(prefix), prefix):
                backup_env.sql(f'ALTER DATABASE "{name}" SET TABLESPACE {space}')
            return original(argv, *args, **kwargs)

        prefix = service.scratch_prefix(backup_env.dbname)
        monkeypatch.setattr(service, "run_tool", on_tiny_disk)
        try:
            # when it is verified, then the restore fails on the server's full disk
            with pytest.raises(service.ScratchUnavailable, match="No space left") as caught:
                service.verify_backup(made["backup_id"])
            assert caught.value.code == "scratch_database_unavailable"
            # and the backup is not blamed: no verdict (a failed one would take it out of
            # retention), and the scratch database is gone
            assert backup_env.sql("SELECT verdict, verify_error FROM backups") == [
                (None, None)]
            assert backup_env.sql("SELECT count(*) FROM pg_database WHERE left(datname, %s) "
                                  "= %s", len(prefix), prefix) == [(0,)]
        finally:
            monkeypatch.undo()
            backup_env.sql(f"DROP TABLESPACE IF EXISTS {space}")
    # and with room again, the same backup passes
    assert service.verify_backup(made["backup_id"])["verdict"] == "passed"
