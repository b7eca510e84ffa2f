"""Params of the platform jobs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Ping(BaseModel):
    """Echo a short string back: proves the path API -> Postgres -> Redis -> worker -> result."""

    model_config = ConfigDict(extra="forbid")

    echo: str = Field("pong", max_length=1000, description="returned as the result's echo")
