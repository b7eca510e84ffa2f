"""CPU seconds by role (worker, Postgres, Redis, ...) and by everything else on the host.

Why: on a small shared host a rate alone cannot say whether the platform got slower or a
neighbour got busy. CPU per job is steadier than jobs/s, and the foreign share tells how
much of the machine something outside the bench took while it measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil


def _tree(pid: int, children: bool) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)] if children else [root]
    except psutil.Error:
        return []


def _cpu_by_pid(pids: list[int], children: bool) -> dict[int, float]:
    out = {}
    for pid in pids:
        for p in _tree(pid, children):
            try:
                t = p.cpu_times()
            except psutil.Error:  # exited meanwhile
                continue
            # Reaped children count too: a Postgres backend that exited inside the window
            # lives on in the postmaster's children_* times.
            out[p.pid] = t.user + t.system + t.children_user + t.children_system
    return out


def _host_busy() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


@dataclass(frozen=True)
class Usage:
    """CPU seconds per role over a window, and the rest of the host's busy time."""

    roles: dict[str, float]
    foreign: float
    wall: float

    def per(self, count: int) -> str:
        """'role=ms ...' per unit of work (job, request)."""
        return " ".join(f"{k}={1000 * v / count:.2f}" for k, v in self.roles.items())

    def total_per(self, count: int) -> float:
        return 1000 * sum(self.roles.values()) / count

    @property
    def foreign_share(self) -> float:
        """Other processes' CPU as a share of the whole host over the window."""
        cores = psutil.cpu_count() or 1
        return self.foreign / (self.wall * cores) if self.wall > 0 else 0.0


class CpuMeter:
    """Snapshot now, `stop()` later: CPU used per role. A role is a list of process trees;
    roles named in `flat` count only the listed processes (a worker's main process)."""

    def __init__(self, roles: dict[str, list[int]], flat: frozenset[str] = frozenset()) -> None:
        self.roles, self.flat = roles, flat
        self.before = {k: _cpu_by_pid(v, k not in flat) for k, v in roles.items()}
        self.host0 = _host_busy()
        self.t0 = time.monotonic()

    def stop(self) -> Usage:
        # Per pid, so a process born during the window (a new backend) counts from zero.
        after = {k: _cpu_by_pid(v, k not in self.flat) for k, v in self.roles.items()}
        roles = {k: sum(t - self.before[k].get(pid, 0.0) for pid, t in pids.items())
                 for k, pids in after.items()}
        busy = _host_busy() - self.host0
        return Usage(roles, max(0.0, busy - sum(roles.values())), time.monotonic() - self.t0)
