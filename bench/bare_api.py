"""The enqueue baseline: a FastAPI app whose one route only calls `.delay()` on the no-op.

Same Celery app and broker settings as the real API, and served by uvicorn with the same
arguments as `warden api`, so the difference to POST /v1/jobs is what the real endpoint
adds: auth, validation, the job_runs row, metrics and middleware.
"""

from __future__ import annotations

import argparse

from fastapi import FastAPI

from bench.tasks import noop

app = FastAPI()


@app.post("/noop", status_code=202)
def enqueue() -> dict[str, str]:
    """Sync like the real endpoint: .delay() is a blocking Redis call, run in the pool."""
    return {"id": noop.delay(params={"echo": "bare"}).id}


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.bare_api")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # The arguments `warden api` passes (cli/main.py), so the servers differ only in the app.
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
