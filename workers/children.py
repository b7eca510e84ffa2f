"""Child processes in their own sessions: `warden up`, the tests and the benches start the
platform's processes this way, so Ctrl-C reaches only the supervisor and a stop can take
a child's whole process group (prefork pool children, a hung process) with it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path


class Child:
    """`python <argv>` with output appended to `log`, in a new session."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path,
                 cwd: Path | None = None) -> None:
        self.argv, self.log = argv, log
        with open(log, "ab") as logf:  # the child keeps its own copy of the descriptor
            self.popen = subprocess.Popen(
                [sys.executable, *argv], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a graceful stop), then SIGKILL to whatever is left of the group."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def tail(self, n: int = 4000) -> str:
        """The end of the child's log (for error messages)."""
        if not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-n:]


def warden(args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> Child:
    """A `warden <args>` child (python -m cli.main, so the venv's interpreter runs it)."""
    return Child(["-m", "cli.main", *args], env, log, cwd)
