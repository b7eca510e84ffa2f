"""`warden up` supervises: a worker, beat or Flower that dies is restarted with backoff;
Ctrl-C stops everything it started."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import Proc, Services
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
