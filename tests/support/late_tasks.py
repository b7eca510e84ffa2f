"""A job type only a newer deploy knows (the unknown-type test starts a worker with it)."""

from __future__ import annotations

from pydantic import BaseModel

from workers.app import app
from workers.jobs import JobTask


class AddedLaterParams(BaseModel):
    n: int = 0


@app.task(name="testing.added_later", base=JobTask, params=AddedLaterParams, bind=True)
def added_later(self: JobTask, params: AddedLaterParams) -> dict[str, int]:
    """Echo n back.

    Idempotency: no effect besides its result.
    """
    return {"n": params.n}
