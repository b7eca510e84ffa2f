"""`warden up` supervises: a worker, beat or Flower that dies is restarted with backoff; an
embedded server that dies stops everything; Ctrl-C stops everything it started. One
`warden up` per data dir: a second one refuses and touches nothing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from cli.up import AlreadyRunning, lock_data_dir, unlock_data_dir
from tests.conftest import ROOT, TEST_SETTINGS, Proc, Services
from workers.embedded import free_port

pytestmark = pytest.mark.slow


def _child(up: Proc, role: str) -> psutil.Process | None:
    """The `warden <role>` process started by `warden up`."""
    for proc in psutil.Process(up.pid).children():
        try:
            if proc.cmdline()[3:4] == [role]:  # python -m cli.main <role> ...
                return proc
        except psutil.NoSuchProcess:
            continue
    return None


def _wait_for(up: Proc, text: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while text not in up.tail(200_000):
        assert up.alive(), up.tail()
        assert time.monotonic() < deadline, up.tail()
        time.sleep(0.2)


def test_up_restarts_a_dead_worker_and_beat_and_stops_cleanly(
    services: Services, tmp_path: Path
) -> None:
    # given the platform run by `warden up` on the test servers
    env = services.env(WARDEN_DATA_DIR=str(tmp_path / "data"),
                       WARDEN_API_PORT=str(free_port()), WARDEN_FLOWER_PORT=str(free_port()))
    up = Proc(["up", "--no-demo", "--concurrency", "1"], env, tmp_path / "up.log")
    try:
        _wait_for(up, "Warden is up.")
        # when its worker is killed, and then its beat
        for role in ("worker", "beat"):
            victim = _child(up, role)
            assert victim is not None, (role, up.tail())
            victim.kill()
            # then `warden up` says so and starts a new one, and keeps running
            _wait_for(up, f"{role} exited with -9; restarting it (restart 1", timeout=30)
            deadline = time.monotonic() + 30
            while (fresh := _child(up, role)) is None or fresh.pid == victim.pid:
                assert time.monotonic() < deadline, up.tail()
                time.sleep(0.2)
        assert up.alive()
        # when Ctrl-C reaches it; then it stops every process it started and exits 0
        children = psutil.Process(up.pid).children(recursive=True)
        up.popen.send_signal(signal.SIGINT)
        assert up.popen.wait(60) == 0, up.tail()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], alive
    finally:
        up.stop()


# --- One `warden up` per data dir, and the embedded servers are watched -----------------
# One stack with embedded PostgreSQL and Redis for the tests below (it takes ~30 s to come
# up: initdb, migrations, four processes). The last test kills its PostgreSQL.


@dataclass
class Stack:
    up: Proc
    env: dict[str, str]
    data_dir: Path
    api_url: str


def _embedded_env(data_dir: Path) -> dict[str, str]:
    """The suite's settings with no database or Redis URL: `warden up` starts its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_")}
    env.update(TEST_SETTINGS)
    env.update(WARDEN_DATA_DIR=str(data_dir), WARDEN_API_PORT=str(free_port()),
               WARDEN_FLOWER_PORT=str(free_port()))
    return env


def _stop_up(up: Proc) -> None:
    """Ctrl-C's path (SIGTERM), long enough for the worker's 10 s soft shutdown; then kill
    whatever it started and left, so a failed test leaves no servers behind."""
    try:
        left = psutil.Process(up.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        left = []
    up.stop(60)
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # Not under pytest's basetemp: the embedded PostgreSQL runs as an unprivileged user that
    # must traverse every parent directory, and each pytest-xdist process that starts sets
    # pytest's own temp root back to 0700 (as the suite's services fixture, a mkdtemp).
    root = Path(tempfile.mkdtemp(prefix="warden-up-test-"))
    env = _embedded_env(root / "data")
    up = Proc(["up", "--no-demo", "--concurrency", "1"], env, root / "up.log")
    try:
        _wait_for(up, "Warden is up.", timeout=180)
        yield Stack(up, env, root / "data", f"http://127.0.0.1:{env['WARDEN_API_PORT']}")
    finally:
        _stop_up(up)
        shutil.rmtree(root, ignore_errors=True)


def _postmaster(stack: Stack) -> psutil.Process:
    """The embedded PostgreSQL of the stack (its pid file), checked to be up's child."""
    pid = int((stack.data_dir / "pg" / "postmaster.pid").read_text().splitlines()[0])
    proc = psutil.Process(pid)
    assert proc.ppid() == stack.up.pid, (pid, proc.ppid(), stack.up.pid)
    return proc


def _cli_seconds(env: dict[str, str]) -> float:
    """How long the CLI takes to start and exit on this machine right now (its imports)."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "cli.main", "up", "--help"], env=env, cwd=ROOT,
                   capture_output=True, check=True, timeout=60)
    return time.monotonic() - started


def test_a_second_up_on_the_same_data_dir_refuses_and_changes_nothing(stack: Stack) -> None:
    # given a running `warden up` with its embedded servers
    postmaster = _postmaster(stack)
    state = stack.data_dir / "services.json"
    state_before = (state.read_bytes(), state.stat().st_mtime_ns)
    # when a second `warden up` starts with the same settings (a second `make up`)
    started = time.monotonic()
    second = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "up", "--no-demo"], env=stack.env, cwd=ROOT,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = second.communicate(timeout=90)
    finally:
        if second.poll() is None:  # the old behaviour: it went on to start a stack
            second.send_signal(signal.SIGTERM)
            second.communicate(timeout=60)
    elapsed = time.monotonic() - started
    # then it exits non-zero at once, naming the running one and its URLs. At once: under
    # 5 s, or on a machine too busy for that, no slower than the CLI's own start-up (~2 s of
    # imports idle, 4 s seen on a loaded 2-CPU box) plus a margin
    assert second.returncode == 1, (second.returncode, out, err)
    if elapsed >= 5.0:
        startup = _cli_seconds(stack.env)
        assert elapsed < startup + 2.0, (elapsed, startup, err)
    line = err.decode().strip()
    assert line == (
        f"error: warden up is already running in {stack.data_dir.resolve()} "
        f"(pid {stack.up.pid}): API {stack.api_url}  "
        f"Flower http://127.0.0.1:{stack.env['WARDEN_FLOWER_PORT']}"
    ), line
    assert out == b"", out
    # and the first stack is untouched: same PostgreSQL, same state file, still ready
    assert _postmaster(stack).pid == postmaster.pid
    assert postmaster.is_running()
    assert (state.read_bytes(), state.stat().st_mtime_ns) == state_before
    assert httpx.get(f"{stack.api_url}/readyz", timeout=10).status_code == 200
    assert stack.up.alive(), stack.up.tail()


def test_the_lock_dies_with_its_holder_even_by_sigkill(tmp_path: Path) -> None:
    # given a process holding a data dir's lock
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from cli.up import lock_data_dir;"
         "lock_data_dir(Path(sys.argv[1]), 'http://api', 'http://flower');"
         "print('locked', flush=True); time.sleep(600)", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        # then nobody else gets it, and the refusal names the holder
        with pytest.raises(AlreadyRunning, match=rf"\(pid {holder.pid}\): API http://api"):
            lock_data_dir(tmp_path, "x", "y")
        # when the holder is killed without a chance to clean up
        holder.kill()
        holder.wait(10)
    finally:
        holder.kill()
        holder.wait(10)
    # then the lock file left behind blocks nothing: the next one takes it
    assert (tmp_path / "up.lock").exists()
    fd = lock_data_dir(tmp_path, "http://a", "http://f")
    try:
        assert json.loads((tmp_path / "up.lock").read_text())["pid"] == os.getpid()
    finally:
        unlock_data_dir(fd)


def test_up_stops_everything_when_its_embedded_postgres_dies(stack: Stack) -> None:
    # given a running `warden up` and every process it started (PostgreSQL's backends too)
    postmaster = _postmaster(stack)
    started = psutil.Process(stack.up.pid).children(recursive=True)
    # when its PostgreSQL dies (the OOM killer's way)
    postmaster.kill()
    # then it says which server exited, how, and where its log is, stops everything, exit 1
    assert stack.up.popen.wait(120) == 1, stack.up.tail()
    log = stack.data_dir.resolve() / "postgres.log"
    assert (f"error: embedded PostgreSQL (pid {postmaster.pid}) exited with -9 (SIGKILL); "
            f"see {log}; every process stands on it: stopping everything") in stack.up.tail()
    assert "restarting" not in stack.up.tail()
    _, alive = psutil.wait_procs(started, timeout=10)
    assert alive == [], alive
    # and the data dir is free for the next `warden up`
    fd = lock_data_dir(stack.data_dir, "x", "y")
    unlock_data_dir(fd)
