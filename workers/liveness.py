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

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from workers import deployment
from workers.redis_client import get_redis, key
from workers.settings import get_settings

log = structlog.get_logger("warden.liveness")

WORKER_BEAT = 10.0
WORKER_TTL = 3 * WORKER_BEAT
# "Which workers consume this queue?" for the jobs an operator reads (review N9): while Redis
# hung, each ask waited out the shared client's 5 s socket timeout, once per queued job (25
# on a /ui page), holding an API thread. Asked with this timeout instead, and an unanswered
# ask remembered this long per process, a stall costs one 0.5 s wait every few seconds.
PROBE_TIMEOUT = 0.5
UNREACHABLE_SECONDS = 3.0


class WorkerBeat:
    """The daemon thread in a worker's main process."""

    MAX_HELD = 10_000  # past this, the rest count as lost: a duplicate is only wasted work

    def __init__(self, node: str, queues: list[str],
                 deployment: Callable[[], str] | None = None,
                 held: Callable[[], Iterable[str]] | None = None) -> None:
        self.node, self.queues = node, queues
        self.deployment: str | None = None
        self._identity = deployment
        self._held = held
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat_once(self) -> None:
        if self.deployment is None and self._identity is not None:
            try:  # asked again at each beat until the database answers
                self.deployment = self._identity()
            except Exception as exc:
                log.warning("worker.deployment_unknown", error=f"{type(exc).__name__}: {exc}")
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


def _this_deployment() -> str | None:
    try:
        return deployment.identity()
    except Exception:  # the database is away: every worker counts, as before stamping
        return None


def serves_here(worker: dict[str, Any], mine: str | None) -> bool:
    """Whether a live worker runs this deployment's messages: it announced this
    deployment, or has not been able to tell yet (its database was away), or we cannot."""
    theirs = worker.get("deployment")
    return mine is None or theirs is None or theirs == mine


def consumers(queue: str) -> list[str]:
    """Node names of the live workers of this deployment consuming `queue` (a worker of
    another deployment on the same Redis refuses this one's messages)."""
    mine = _this_deployment()
    return [str(w["node"]) for w in live_workers()
            if queue in (w.get("queues") or []) and serves_here(w, mine)]


_probe: tuple[int, str, redis.Redis] | None = None
_unreachable_until: dict[str, float] = {}
_probe_lock = threading.Lock()


def _probe_client() -> redis.Redis:
    """A client of its own with PROBE_TIMEOUT and no retries (per process and URL)."""
    global _probe
    url = get_settings().redis_dsn()
    if _probe is None or _probe[:2] != (os.getpid(), url):
        client = redis.Redis.from_url(url, socket_connect_timeout=PROBE_TIMEOUT,
                                      socket_timeout=PROBE_TIMEOUT, decode_responses=True,
                                      retry=Retry(NoBackoff(), 0))
        _probe = (os.getpid(), url, client)
    return _probe[2]


def queue_consumers(queue: str) -> list[str] | None:
    """Node names of the live workers of this deployment consuming `queue`, or None when
    Redis does not answer
    within PROBE_TIMEOUT; None is then the answer for UNREACHABLE_SECONDS without asking.
    An answer is never cached: a worker that just started must show at once. One caller
    asks at a time, so threads arriving during a stall share one wait."""
    url = get_settings().redis_dsn()
    mine = _this_deployment()
    with _probe_lock:
        if _unreachable_until.get(url, 0.0) > time.monotonic():
            return None
        client = _probe_client()
        try:
            nodes = []
            for name in client.scan_iter(match=key("worker:*"), count=500):
                raw = client.get(name)
                worker = _parse(raw)
                if worker is not None and queue in (worker.get("queues") or []) \
                        and serves_here(worker, mine):
                    nodes.append(str(worker["node"]))
        except Exception as exc:  # hung, refused, unresolvable: say so, do not wait again
            _unreachable_until[url] = time.monotonic() + UNREACHABLE_SECONDS
            log.warning("liveness.redis_unreachable", error=f"{type(exc).__name__}: {exc}")
            return None
        _unreachable_until.pop(url, None)
        return sorted(nodes)


def _parse(raw: Any) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        found = json.loads(raw)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def held_by_live_workers() -> set[str]:
    """Job ids whose messages a live worker holds, not yet started (see the module doc)."""
    client = get_redis()
    held: set[str] = set()
    for w in live_workers():
        held.update(str(i) for i in client.smembers(key(f"held:{w['node']}")))
    return held
