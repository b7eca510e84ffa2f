"""enqueue_api: accepted POST /v1/jobs per second vs a bare FastAPI route calling .delay().

One server process at a time, loaded by 16 keep-alive clients from a separate generator
process. No worker runs: jobs just queue. The generator's own ceiling (against a canned
response server) is measured first, so the baseline is shown to be the server's limit.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from bench.services import Services, new_port, start_http

BODY = '{"type": "platform.ping", "params": {"echo": "bench-{n}"}}'


@dataclass(frozen=True)
class Load:
    """One generator run's summary (see bench.loadgen)."""

    rps: float
    p50_ms: float
    p99_ms: float
    ok: int
    requests: int
    statuses: dict[str, int]
    errors: int
    cpu_fraction: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Load:
        return cls(data["rps"], data["p50_ms"], data["p99_ms"], data["ok"], data["requests"],
                   data["statuses"], data["errors"], data["cpu_fraction"])

    def line(self, label: str) -> str:
        bad = {k: v for k, v in self.statuses.items() if k != "202"}
        extra = f"  non-202={bad} conn_errors={self.errors}" if bad or self.errors else ""
        return (f"  {label:<9} {self.rps:8.1f} req/s  p50 {self.p50_ms:6.2f} ms  "
                f"p99 {self.p99_ms:6.2f} ms  (generator CPU {100 * self.cpu_fraction:.0f}% "
                f"of a core){extra}")


def load(svc: Services, port: int, path: str, token: str, clients: int,
         duration: float) -> Load:
    """Run the generator process against the port; wait for its summary."""
    out = svc.data_dir / f"load-{uuid.uuid4().hex[:6]}.json"
    gen = svc.spawn(["-m", "bench.loadgen", "run", "--port", str(port), "--path", path,
                     "--token", token, "--body", BODY, "--clients", str(clients),
                     "--duration", str(duration), "--warmup", "1", "--out", str(out)],
                    "loadgen")
    try:
        gen.popen.wait(duration + 60)  # a guard against a hang; the run ends itself
    finally:
        gen.stop()
    if not out.exists():
        raise RuntimeError(f"load generator wrote no summary:\n{gen.tail()}")
    return Load.from_json(json.loads(out.read_text()))


def create_bench_token() -> str:
    from workers.tokens import create_token

    return create_token(f"bench-{uuid.uuid4().hex[:8]}", ["enqueue", "read"])


def run(svc: Services, clients: int, duration: float) -> list[str]:
    """Ceiling, bare, real (each its own server process); returns the report lines."""
    token = create_bench_token()

    port = new_port()
    canned = start_http(svc, ["-m", "bench.loadgen", "serve", "--port", str(port)],
                        "canned", port)
    ceiling = load(svc, port, "/", token, clients, duration)
    canned.stop()

    svc.reset_queues()
    port = new_port()
    bare_server = start_http(svc, ["-m", "bench.bare_api", "--port", str(port)], "bare", port)
    bare = load(svc, port, "/noop", token, clients, duration)
    bare_server.stop()

    svc.reset_queues()
    port = new_port()
    api = start_http(svc, ["-m", "cli.main", "api", "--port", str(port)], "api", port)
    real = load(svc, port, "/v1/jobs", token, clients, duration)
    api.stop()
    created = _jobs_created()

    ratio = real.rps / bare.rps
    return [
        f"enqueue_api ratio={ratio:.2f} (accepted POST /v1/jobs/s over bare FastAPI "
        ".delay() route/s)",
        real.line("real API"),
        bare.line("bare"),
        ceiling.line("ceiling"),
        f"  ({clients} keep-alive clients for {duration:g} s after 1 s warm-up, one uvicorn "
        f"process each; 'ceiling' = the generator against a canned-response asyncio server; "
        f"generator and server share the machine's cores; job_runs rows created: {created})",
    ]


def _jobs_created() -> int:
    from sqlalchemy import text

    from workers.db import session_scope

    with session_scope() as s:
        return int(s.execute(text("SELECT count(*) FROM job_runs")).scalar_one())
