"""A closed-loop HTTP/1.1 keep-alive load generator on raw asyncio streams.

Why not httpx or wrk: wrk needs a system package, and an httpx client costs more CPU per
request than the server under test on a 2-core box; a hand-rolled request/response loop is
a few microseconds. It runs as its own process (`python -m bench.loadgen run ...`) and
writes a JSON summary to --out. `serve` is a canned-response server used to measure the
generator's own ceiling, so a result can be shown not to be the tool's limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANNED = (b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\n"
          b"content-length: 11\r\n\r\n{\"ok\":true}")


@dataclass
class Stats:
    """What the clients saw inside the measured window."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    total: int = 0  # expected responses, warm-up included (CPU per request is over all)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one response (Content-Length or chunked body); return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def _client(cid: int, args: argparse.Namespace, start: float, end: float,
                  stats: Stats) -> None:
    """One keep-alive connection sending requests back to back until `end`."""
    head = (f"POST {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
            f"Content-Type: application/json\r\n")
    if args.token:
        head += f"Authorization: Bearer {args.token}\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    n = 0
    try:
        while True:
            now = time.perf_counter()
            if now >= end:
                return
            # A distinct body per request: the API must create a job for each one.
            body = args.body.replace("{n}", f"{cid}-{n}").encode()
            n += 1
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            try:
                status = await _read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                stats.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
                continue
            done = time.perf_counter()
            stats.total += status == args.expect
            if start <= now and done <= end:  # only requests wholly inside the window
                stats.latencies.append(done - now)
                stats.statuses[status] = stats.statuses.get(status, 0) + 1
    finally:
        writer.close()


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    stats = Stats()
    t0 = time.perf_counter()
    start, end = t0 + args.warmup, t0 + args.warmup + args.duration
    cpu_at_start: list[float] = []

    async def mark_start() -> None:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        cpu_at_start.append(_cpu_seconds())

    marker = asyncio.create_task(mark_start())
    await asyncio.gather(*(_client(i, args, start, end, stats) for i in range(args.clients)))
    await marker
    cpu = _cpu_seconds() - cpu_at_start[0]
    lat = sorted(stats.latencies)
    ok = sum(v for k, v in stats.statuses.items() if k == args.expect)
    return {
        "requests": len(lat), "ok": ok, "total": stats.total, "statuses": stats.statuses,
        "errors": stats.errors,
        "duration": args.duration, "rps": ok / args.duration,
        "p50_ms": 1000 * _percentile(lat, 0.50), "p99_ms": 1000 * _percentile(lat, 0.99),
        "cpu_fraction": cpu / args.duration,
        "cpu_total_s": _cpu_seconds(),  # imports included: the bench's host-load figure
    }


async def _serve(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        await reader.readexactly(int(line[15:]))
                writer.write(CANNED)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def _event_loop_policy() -> None:
    """uvloop when present (uvicorn[standard] brings it): the generator stays cheap."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="load a server, write a JSON summary")
    run.add_argument("--port", type=int, required=True)
    run.add_argument("--path", default="/")
    run.add_argument("--token", default="")
    run.add_argument("--body", default="{}", help="'{n}' becomes a per-request counter")
    run.add_argument("--clients", type=int, default=16)
    run.add_argument("--duration", type=float, default=10.0)
    run.add_argument("--warmup", type=float, default=1.0)
    run.add_argument("--expect", type=int, default=202, help="the status that counts")
    run.add_argument("--out", type=Path, required=True)
    serve = sub.add_parser("serve", help="canned-response server (the generator's ceiling)")
    serve.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    _event_loop_policy()
    if args.cmd == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args.port))
        return
    result = asyncio.run(_run(args))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
