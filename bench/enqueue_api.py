"""enqueue_api: accepted POST /v1/jobs per second vs a bare FastAPI route calling .delay().

One server process at a time, loaded by 16 keep-alive clients from a separate generator
process. No worker runs: jobs just queue. The generator's own ceiling (against a canned
response server) is measured first, so the baseline is shown to be the server's limit.
"""

from __future__ import annotations

import json
import os
import statistics
import uuid
from dataclasses import dataclass
from typing import Any

from bench.cpu import CpuMeter, Usage
from bench.services import Proc, Services, new_port, start_http

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
    total: int
    generator_cpu: float  # seconds, the generator's whole life
    usage: Usage  # servers' CPU over the generator's life

    @classmethod
    def from_json(cls, data: dict[str, Any], usage: Usage) -> Load:
        return cls(data["rps"], data["p50_ms"], data["p99_ms"], data["ok"], data["requests"],
                   data["statuses"], data["errors"], data["cpu_fraction"], data["total"],
                   data["cpu_total_s"], usage)

    @property
    def foreign_share(self) -> float:
        """Host CPU used by neither the servers nor the generator, as a share of the host."""
        cores = os.cpu_count() or 1
        foreign = max(0.0, self.usage.foreign - self.generator_cpu)
        return foreign / (self.usage.wall * cores) if self.usage.wall > 0 else 0.0


def summary(label: str, loads: list[Load]) -> str:
    """One line per kind: rates and latencies pooled over its runs."""
    rps = sum(x.rps for x in loads) / len(loads)
    p50 = statistics.median(x.p50_ms for x in loads)
    p99 = max(x.p99_ms for x in loads)
    gen_cpu = max(x.cpu_fraction for x in loads)
    bad: dict[str, int] = {}
    for x in loads:
        for k, v in x.statuses.items():
            if k != "202":
                bad[k] = bad.get(k, 0) + v
    errors = sum(x.errors for x in loads)
    extra = f"  non-202={bad} conn_errors={errors}" if bad or errors else ""
    return (f"  {label:<8} {rps:8.1f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
            f"(generator at most {100 * gen_cpu:.0f}% of a core){extra}")


def cpu_line(label: str, loads: list[Load]) -> str:
    total = sum(x.total for x in loads)
    roles: dict[str, float] = {}
    for x in loads:
        for k, v in x.usage.roles.items():
            roles[k] = roles.get(k, 0.0) + v
    per = " ".join(f"{k}={1000 * v / total:.3f}" for k, v in roles.items())
    foreign = max(x.foreign_share for x in loads)
    return (f"  CPU ms per request, {label}: {per} total={1000 * sum(roles.values()) / total:.3f}"
            f"  (other processes took up to {100 * foreign:.0f}% of the host meanwhile)")


def load(svc: Services, server: Proc, port: int, path: str, token: str, clients: int,
         duration: float) -> Load:
    """Run the generator process against the port; wait for its summary."""
    out = svc.data_dir / f"load-{uuid.uuid4().hex[:6]}.json"
    roles = {"server": [server.pid], **{k: [v] for k, v in svc.server_pids.items()}}
    meter = CpuMeter(roles)
    gen = svc.spawn(["-m", "bench.loadgen", "run", "--port", str(port), "--path", path,
                     "--token", token, "--body", BODY, "--clients", str(clients),
                     "--duration", str(duration), "--warmup", "1", "--out", str(out)],
                    "loadgen")
    try:
        gen.popen.wait(duration + 60)  # a guard against a hang; the run ends itself
    finally:
        gen.stop()
    usage = meter.stop()
    if not out.exists():
        raise RuntimeError(f"load generator wrote no summary:\n{gen.tail()}")
    return Load.from_json(json.loads(out.read_text()), usage)


def create_bench_token() -> str:
    from workers.tokens import create_token

    return create_token(f"bench-{uuid.uuid4().hex[:8]}", ["enqueue", "read"])


def _serve_and_load(svc: Services, kind: str, token: str, clients: int,
                    duration: float) -> Load:
    """A fresh server of that kind, loaded once, then stopped (the job table is checked)."""
    port = new_port()
    argv, path = {
        "canned": (["-m", "bench.loadgen", "serve", "--port", str(port)], "/"),
        "bare": (["-m", "bench.bare_api", "--port", str(port)], "/noop"),
        "bare-sync": (["-m", "bench.bare_api", "--sync", "--port", str(port)], "/noop"),
        "real": (["-m", "cli.main", "api", "--port", str(port)], "/v1/jobs"),
    }[kind]
    svc.reset_queues()  # every server starts with an empty broker and job table
    server = start_http(svc, argv, kind, port)
    try:
        result = load(svc, server, port, path, token, clients, duration)
    finally:
        server.stop()
    rows = _jobs_created()
    if kind == "real" and rows != result.total:
        # Every 202 must be a job row: anything else means the bench measured something else.
        raise RuntimeError(f"{result.total} requests answered 202 but job_runs has {rows} rows")
    return result


def run(svc: Services, clients: int, duration: float, rounds: int) -> list[str]:
    """The generator's ceiling, `rounds` bare/real pairs in ABBA order, then the sync bare
    route once (a detail: what the thread pool alone costs)."""
    token = create_bench_token()
    # A few seconds tell the ceiling well enough: it only has to be far above the rest.
    ceiling = _serve_and_load(svc, "canned", token, clients, min(duration, 3.0))
    bare: list[Load] = []
    real: list[Load] = []
    for r in range(rounds):
        for kind in (("bare", "real") if r % 2 == 0 else ("real", "bare")):
            (bare if kind == "bare" else real).append(
                _serve_and_load(svc, kind, token, clients, duration))
    bare_sync = _serve_and_load(svc, "bare-sync", token, clients, duration)
    real_rps = sum(x.rps for x in real) / len(real)
    bare_rps = sum(x.rps for x in bare) / len(bare)
    per_round = ", ".join(f"{r.rps / b.rps:.2f}" for r, b in zip(real, bare, strict=True))
    return [
        f"enqueue_api ratio={real_rps / bare_rps:.2f} (accepted POST /v1/jobs/s over bare "
        "FastAPI .delay() route/s)",
        summary("real API", real),
        summary("bare", bare),
        summary("bare def", [bare_sync]) + "  <- same route as a sync `def` (thread pool)",
        summary("ceiling", [ceiling]),
        f"  per round: {per_round}; {clients} keep-alive clients, {duration:g} s per run after "
        f"a 1 s warm-up, {rounds} round(s) in ABBA order, a fresh uvicorn process per run; "
        "p99 = worst run's",
        "  'bare' is an `async def` route calling .delay() on the loop; 'ceiling' = the "
        "generator against a canned-response asyncio server; generator and server share this "
        f"host's {os.cpu_count()} cores",
        cpu_line("real API", real),
        cpu_line("bare", bare),
        cpu_line("bare def", [bare_sync]),
        f"  every 202 of the real API made a job_runs row ({sum(x.total for x in real)} "
        "jobs, warm-up included, no idempotency key)",
    ]


def _jobs_created() -> int:
    from sqlalchemy import text

    from workers.db import session_scope

    with session_scope() as s:
        return int(s.execute(text("SELECT count(*) FROM job_runs")).scalar_one())
