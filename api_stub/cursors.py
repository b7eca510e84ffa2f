"""Page cursors whose documented pattern is their whole contract.

Why not opaque base64: OpenAPI cannot say "a value this server issued", so an opaque cursor
is a string the document allows and the server rejects. These formats are plain positions
(the last row seen): every string matching the pattern is a valid cursor, and anything else
fails the pattern with the same 422 as every other parameter.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

# 18 digits: below 2**63, so any value fits the bigint ids it is compared with.
ID_PATTERN = r"^[0-9]{1,18}$"
# (check, id) of the last finding; check names are varchar(40) identifiers.
FINDING_PATTERN = r"^[a-z0-9_]{1,40}:[0-9]{1,18}$"
# (created_at in microseconds since 1970, id as 32 hex digits); 16 digits reach year 2286.
JOB_PATTERN = r"^[0-9]{1,16}_[0-9a-f]{32}$"
DESCRIPTION = "the previous page's next_cursor"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def encode_id(last_id: int) -> str:
    """The cursor after (or before, for newest-first lists) the row with this id."""
    return str(last_id)


def decode_id(cursor: str) -> int:
    """The id a cursor matching ID_PATTERN stands for."""
    return int(cursor)


def encode_finding(check: str, last_id: int) -> str:
    """The cursor after a finding: its (check, id), the order of the table's primary key."""
    return f"{check}:{last_id}"


def decode_finding(cursor: str) -> tuple[str, int]:
    """The (check, id) a cursor matching FINDING_PATTERN stands for."""
    check, last_id = cursor.split(":")
    return check, int(last_id)


def encode_job(created_at: datetime, job_id: uuid.UUID) -> str:
    """The cursor before a job in the newest-first list: its (created_at, id), exact to the
    microsecond as Postgres stores it."""
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    return f"{micros}_{job_id.hex}"


def decode_job(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The (created_at, id) a cursor matching JOB_PATTERN stands for."""
    micros, hex_id = cursor.split("_")
    return _EPOCH + timedelta(microseconds=int(micros)), uuid.UUID(hex=hex_id)
