"""The enqueue baseline: a FastAPI app whose one route only calls `.delay()` on the no-op.

Same Celery app and broker settings as the real API, and served by uvicorn with the same
arguments as `warden api`, so the difference to POST /v1/jobs is what the real endpoint
adds: auth, validation, the job_runs row, metrics, middleware and thread-pool hops.

The baseline route is `async def` and calls .delay() on the event loop: that is the
thinnest FastAPI can do (no thread-pool hop). `--sync` serves the same route as a plain
`def`, as the real endpoint is, to show what FastAPI's thread pool alone costs.
"""

from __future__ import annotations

import argparse

from fastapi import FastAPI

from bench.tasks import noop

app = FastAPI()
sync_app = FastAPI()


@app.post("/noop", status_code=202)
async def enqueue() -> dict[str, str]:
    """Blocks the loop for one Redis round trip: cheaper than a thread hop at this size."""
    return {"id": noop.delay(params={"echo": "bare"}).id}


@sync_app.post("/noop", status_code=202)
def enqueue_in_thread() -> dict[str, str]:
    """Run by FastAPI in its thread pool, like every sync endpoint."""
    return {"id": noop.delay(params={"echo": "bare"}).id}


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.bare_api")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sync", action="store_true", help="serve the `def` route instead")
    args = parser.parse_args()
    # The arguments `warden api` passes (cli/main.py), so the servers differ only in the app.
    uvicorn.run(sync_app if args.sync else app, host="127.0.0.1", port=args.port,
                log_config=None, access_log=False, timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
