"""Bodies of the liveness and readiness probes."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Health(BaseModel):
    """The process is up."""

    status: str = "ok"
    version: str


class Readiness(BaseModel):
    """What readiness depends on: Redis and the result store answering, and at least one live worker."""

    ready: bool
    redis: bool
    store: bool = True  # the result store answers (``store_backend``: redis, file or s3)
    store_backend: str = "redis"
    workers: int
    models: list[str]
    queues_full: list[str] = Field(
        default_factory=list, description="Models whose queue is at DIFFQ_MAX_QUEUE_DEPTH (new jobs get 429)."
    )
