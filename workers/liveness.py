"""Which workers are alive and which queues they consume, as seen in Redis.

Every worker's main process writes `<prefix>warden:worker:<node name>` (its queues, host,
pid, when) every WORKER_BEAT seconds with a TTL of three beats; a worker that dies drops out
within WORKER_TTL. Read by the API ("no worker consumes its queue") and the metrics, without
a Celery broadcast (which waits for replies and sees only one deployment's prefix anyway).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import structlog

from workers.redis_client import get_redis, key

log = structlog.get_logger("warden.liveness")

WORKER_BEAT = 10.0
WORKER_TTL = 3 * WORKER_BEAT


class WorkerBeat:
    """The daemon thread in a worker's main process."""

    def __init__(self, node: str, queues: list[str]) -> None:
        self.node, self.queues = node, queues
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat_once(self) -> None:
        get_redis().set(key(f"worker:{self.node}"), json.dumps({
            "node": self.node, "queues": self.queues, "host": socket.gethostname(),
            "pid": os.getpid(), "at": time.time()}), ex=int(WORKER_TTL))

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
            get_redis().delete(key(f"worker:{self.node}"))
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
