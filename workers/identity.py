"""Who runs a job: an owner token that can be proven dead without trusting a hostname.

Why not `hostname:pid`: cloned machines and containers share hostnames, and pids are reused.
The token carries the kernel's boot id (new at every boot, different on every clone that
booted on its own), the pid namespace (containers on one kernel differ) and the process's
start time (a reused pid has another), so "the holder is gone" is decided only for a
process on this very kernel that provably no longer exists. Any other holder is waited out
(its lease expires).
"""

from __future__ import annotations

import os
import socket
import uuid
from functools import lru_cache


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@lru_cache(maxsize=1)
def boot_id() -> str:
    """This kernel's boot id (short); 'noboot' where /proc does not say (never 'dead')."""
    return (_read("/proc/sys/kernel/random/boot_id") or "noboot").replace("-", "")[:16]


@lru_cache(maxsize=1)
def pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat),
    or None when no such process exists."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _state(pid: int) -> str | None:
    stat = _read(f"/proc/{pid}/stat")
    fields = stat.rsplit(")", 1)[-1].split() if stat else []
    return fields[0] if fields else None


_process: dict[int, str] = {}


def process_token() -> str:
    """`host:boot:pidns:pid:start` of this process (re-read after fork)."""
    pid = os.getpid()
    if pid not in _process:
        _process.clear()
        host = socket.gethostname().replace(":", "_")[:60]
        _process[pid] = f"{host}:{boot_id()}:{pid_namespace()}:{pid}:{start_time(pid) or 0}"
    return _process[pid]


def new_token() -> str:
    """An owner token for one claim or lease: this process plus a random nonce."""
    return f"{process_token()}:{uuid.uuid4().hex[:12]}"


def holder_is_dead(token: str | None) -> bool:
    """True only when the token's process ran on this kernel, in this pid namespace, and
    no process with its pid and start time exists any more."""
    if not token:
        return False
    parts = token.split(":")
    if len(parts) < 5:
        return False
    _, boot, pidns, pid_s, start = parts[:5]
    if boot != boot_id() or boot == "noboot" or pidns != pid_namespace():
        return False
    try:
        pid = int(pid_s)
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    current = start_time(pid)
    # A zombie (killed, not yet reaped) still has its /proc entry and start time.
    return current is None or current != start or _state(pid) == "Z"
