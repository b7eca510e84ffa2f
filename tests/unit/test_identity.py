"""Owner tokens: a holder is dead only when provably so on this very kernel."""

from __future__ import annotations

import os
import subprocess
import sys

from workers import identity


def test_a_live_process_is_not_dead_and_a_finished_one_is() -> None:
    # given a token from a child process that then exited
    code = "from workers import identity; print(identity.new_token())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    gone = out.stdout.strip()
    # then it is dead; this process's own token is not
    assert identity.holder_is_dead(gone)
    assert not identity.holder_is_dead(identity.new_token())


def test_another_boot_or_namespace_is_never_called_dead() -> None:
    host, boot, pidns, _pid, _start, nonce = identity.new_token().split(":")
    # a clone of this machine (same hostname, a pid that does not exist here): another boot id
    assert not identity.holder_is_dead(f"{host}:deadbeefdeadbeef:{pidns}:999999:1:{nonce}")
    # a container on this kernel: another pid namespace
    assert not identity.holder_is_dead(f"{host}:{boot}:1:999999:1:{nonce}")
    assert not identity.holder_is_dead("garbage")
    assert not identity.holder_is_dead(None)


def test_a_reused_pid_is_told_apart_by_its_start_time() -> None:
    host, boot, pidns, _, _start, nonce = identity.new_token().split(":")
    # the parent's pid is alive, but with another start time it is another process
    assert not identity.holder_is_dead(
        f"{host}:{boot}:{pidns}:{os.getppid()}:{identity.start_time(os.getppid())}:{nonce}")
    assert identity.holder_is_dead(f"{host}:{boot}:{pidns}:{os.getppid()}:1:{nonce}")
