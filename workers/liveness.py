"""Which workers are alive and which queues they consume, as seen in Redis.

Every worker's main process writes `<prefix>warden:worker:<node name>` (its queues, host,
pid, deployment, when) every WORKER_BEAT seconds with a TTL of three beats; a worker that
dies drops out within WORKER_TTL. Beside it, `...:held` lists the jobs whose messages the
worker holds but has not started (a countdown waiting for its time, a message waiting for a
free process): the relay does not count those as lost while the worker lives (review N12).
Read by the API ("no worker consumes its queue") and the metrics, without a Celery
broadcast (which waits for replies and sees only one deployment's prefix anyway).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from workers.redis_client import get_redis, key

log = structlog.get_logger("warden.liveness")

WORKER_BEAT = 10.0
WORKER_TTL = 3 * WORKER_BEAT


class WorkerBeat:
    """The daemon thread in a worker's main process."""

    MAX_HELD = 10_000  # past this, the rest count as lost: a duplicate is only wasted work

    def __init__(self, node: str, queues: list[str], deployment: str | None = None,
                 held: Callable[[], Iterable[str]] | None = None) -> None:
        self.node, self.queues, self.deployment = node, queues, deployment
        self._held = held
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat_once(self) -> None:
        client = get_redis()
        held = sorted(self._held())[: self.MAX_HELD] if self._held else []
        with client.pipeline() as pipe:
            pipe.set(key(f"worker:{self.node}"), json.dumps({
                "node": self.node, "queues": self.queues, "host": socket.gethostname(),
                "pid": os.getpid(), "deployment": self.deployment, "at": time.time()}),
                ex=int(WORKER_TTL))
            pipe.delete(key(f"held:{self.node}"))
            if held:
                pipe.sadd(key(f"held:{self.node}"), *held)
                pipe.expire(key(f"held:{self.node}"), int(WORKER_TTL))
            pipe.execute()

    def _loop(self) -> None:
        while True:
            try:
                self.beat_once()
            except Exception as exc:  # Redis away: the key lapses, which is the truth
                log.warning("worker.beat_failed", error=f"{type(exc).__name__}: {exc}")
            if self._stop.wait(WORKER_BEAT):
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="worker-beat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """On a clean shutdown the key goes at once (a warm stop is not a dead worker)."""
        self._stop.set()
        try:
            get_redis().delete(key(f"worker:{self.node}"), key(f"held:{self.node}"))
        except Exception as exc:
            log.warning("worker.beat_clear_failed", error=f"{type(exc).__name__}: {exc}")


def live_workers() -> list[dict[str, Any]]:
    """Every worker whose beat is fresh: node, queues, host, pid, at."""
    client = get_redis()
    found = []
    for name in client.scan_iter(match=key("worker:*"), count=500):
        raw = client.get(name)
        if raw:
            try:
                found.append(json.loads(raw))
            except ValueError:
                continue
    return sorted(found, key=lambda w: str(w.get("node")))


def consumers(queue: str) -> list[str]:
    """Node names of the live workers consuming `queue`."""
    return [str(w["node"]) for w in live_workers() if queue in (w.get("queues") or [])]


def held_by_live_workers() -> set[str]:
    """Job ids whose messages a live worker holds, not yet started (see the module doc)."""
    client = get_redis()
    held: set[str] = set()
    for w in live_workers():
        held.update(str(i) for i in client.smembers(key(f"held:{w['node']}")))
    return held
