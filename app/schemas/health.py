"""Bodies of the liveness and readiness probes."""

from __future__ import annotations

from pydantic import BaseModel


class Health(BaseModel):
    """The process is up."""

    status: str = "ok"
    version: str


class Readiness(BaseModel):
    """What readiness depends on: Redis answering and at least one live worker."""

    ready: bool
    redis: bool
    workers: int
    models: list[str]
