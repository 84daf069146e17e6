"""Queue-depth backpressure and the load figures autoscalers read.

A model's queue may hold at most ``max_queue_depth`` jobs that no worker has
taken yet; a submit past that is refused (``QueueFullError``, 429 with the
current estimated wait) instead of queueing hours of work whose clients will
have given up. A single job's submit checks the queue's length in the script
that queues it (``JobStore.submit``), so the bound is exact; a batch checks it
before its chunks are written (``diffq.app.core.batches``), exact to within the API's
concurrent requests, which is what a bound on hours of work needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from redis import Redis

from diffq.app.contract import keys
from diffq.app.contract.rq_adapter import queue_key
from diffq.app.core.errors import QueueFullError
from diffq.app.settings import Settings


def parse_depths(text: str) -> dict[str | None, int]:
    """``"100"`` (every model) or ``"shapes=100,sdxl=20"`` (per model, ``*=`` for the rest);
    ValueError names a malformed entry."""
    depths: dict[str | None, int] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        model, _, number = entry.rpartition("=")
        if not number.strip().isdigit() or int(number) < 1:
            raise ValueError(f"queue depth {entry!r} is not a positive number, e.g. 100 or shapes=100")
        depths[model.strip() if model.strip() not in ("", "*") else None] = int(number)
    return depths


def max_depth(settings: Settings, model: str) -> int | None:
    """Most queued jobs ``model`` may have; None: no limit."""
    depths = parse_depths(settings.max_queue_depth)
    return depths.get(model, depths.get(None))


def queued(redis: Redis, model: str) -> int:
    """Jobs in the model's queue that no worker has taken yet."""
    return int(redis.llen(queue_key(model)))


def estimated_wait(redis: Redis, model: str, ahead: int, workers: int) -> float | None:
    """Seconds until a job submitted now would end, from the model's recent job times; None before any ran."""
    durations = redis.lrange(keys.model_durations(model), 0, -1)
    if not durations:
        return None
    mean = sum(float(d) for d in durations) / len(durations)
    return round((ahead / max(1, workers) + 1) * mean, 2)


def check_room(redis: Redis, settings: Settings, model: str, workers: int) -> None:
    """Raise ``QueueFullError`` if the model's queue is at its maximum depth."""
    limit = max_depth(settings, model)
    if limit is None:
        return
    depth = queued(redis, model)
    if depth >= limit:
        raise QueueFullError(model, depth, estimated_wait(redis, model, depth, workers))


@dataclass(frozen=True)
class ModelLoad:
    """One model's load: the autoscaling signal is ``per_worker``."""

    queued: int
    running: int
    workers: int

    @property
    def per_worker(self) -> float:
        """(queued + running) / workers; with no worker, as if there were one (scale from zero)."""
        return (self.queued + self.running) / max(1, self.workers)


def running_by_model(redis: Redis) -> dict[str, int]:
    """Claimed, unended jobs per model (from the running set and each job's ``model`` field)."""
    ids = [raw.decode() for raw in redis.zrange(keys.RUNNING, 0, -1)]
    if not ids:
        return {}
    with redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(keys.job(job_id), "model")
        models = pipe.execute()
    counts: dict[str, int] = {}
    for raw in models:
        if raw is not None:
            name = json.loads(raw)
            counts[name] = counts.get(name, 0) + 1
    return counts
