"""Worker and model registration: how the API learns which models live workers serve.

Each worker writes its ``WorkerRecord`` and its model's ``ModelRecord`` with a
short TTL and renews both from a heartbeat thread. A worker that dies simply
stops renewing, and its keys expire: liveness is decided by Redis' clock, so
hosts with skewed clocks still agree.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from weakref import WeakKeyDictionary

from redis import Redis

from diffq.app.contract import keys
from diffq.app.contract.records import ModelRecord, WorkerRecord
from diffq.app.contract.rq_adapter import RQ_QUEUES, queue_key


@dataclass(frozen=True)
class ServedModel:
    """A model and the live workers serving it (each may have it loaded or load it on demand)."""

    model: ModelRecord
    workers: list[WorkerRecord]
    registration: bytes | None = None  # the model's registration as stored (what a submit checks is unchanged)


#: ``served_models(max_age=...)``'s listings, per client: (monotonic time read, listing).
_listings: WeakKeyDictionary[Redis, tuple[float, list[ServedModel]]] = WeakKeyDictionary()


class Registry:
    """Announce, renew and withdraw workers; list the live ones and what they serve."""

    def __init__(self, redis: Redis, ttl: int) -> None:
        self.redis = redis
        self.ttl = ttl

    def announce(
        self, worker: WorkerRecord, model: ModelRecord | Sequence[ModelRecord], *, queues: bool = True
    ) -> None:
        """Register or renew a worker and its model(s) for another ``ttl`` seconds; ``queues``: also
        list the models' queues in RQ's set of queues (a heartbeat does so now and then, not at
        every beat: the set loses them only if Redis loses its data)."""
        models = [model] if isinstance(model, ModelRecord) else model
        # One round trip, no MULTI/EXEC: each write renews a key on its own, and a reader that
        # sees one renewed before the others sees a live worker either way.
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.worker(worker.id), worker.model_dump_json(), ex=self.ttl)
            pipe.sadd(keys.WORKERS, worker.id)
            for record in models:
                pipe.set(keys.model(record.name), record.model_dump_json(), ex=self.ttl)
            if models and queues:  # known to RQ while it is served (a submit checks the registration)
                pipe.sadd(RQ_QUEUES, *[queue_key(record.name) for record in models])
            pipe.execute()

    def renew_worker(self, worker: WorkerRecord) -> None:
        """Rewrite a worker's record alone (one SET): a change of its current job between two
        ``announce`` calls, which keep its model(s) and its place in the set of workers."""
        self.redis.set(keys.worker(worker.id), worker.model_dump_json(), ex=self.ttl)

    def withdraw(self, worker_id: str, model_name: str | Sequence[str]) -> None:
        """Unregister a worker that stops cleanly; its models go when no one else serves them."""
        names = [model_name] if isinstance(model_name, str) else list(model_name)
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.worker(worker_id))
            pipe.srem(keys.WORKERS, worker_id)
            pipe.execute()
        served = {name for w in self.live_workers() for name in served_by(w)}
        for name in names:
            if name not in served:
                self.redis.delete(keys.model(name))

    def live_workers(self) -> list[WorkerRecord]:
        """Workers whose registration has not expired; drops the ids of the others."""
        ids = sorted(member.decode() for member in self.redis.smembers(keys.WORKERS))
        if not ids:
            return []
        values = self.redis.mget([keys.worker(worker_id) for worker_id in ids])
        dead = [worker_id for worker_id, value in zip(ids, values, strict=True) if value is None]
        if dead:
            self.redis.srem(keys.WORKERS, *dead)
        return [WorkerRecord.model_validate_json(value) for value in values if value is not None]

    def model(self, name: str) -> ModelRecord | None:
        """A model's registered limits, if a live worker serves it."""
        raw = self.redis.get(keys.model(name))
        return ModelRecord.model_validate_json(raw) if raw is not None else None

    def served_models(self, max_age: float = 0) -> list[ServedModel]:
        """Models with at least one live worker, by name. ``max_age`` > 0: a listing this process
        read at most that many seconds ago will do (the API's submits: a job is then queued only
        if the model's registration is still the one it was checked against, ``JobStore.submit``)."""
        cached = self.cached(max_age) if max_age > 0 else None
        if cached is not None:
            return cached
        read_at = time.monotonic()
        by_model: dict[str, list[WorkerRecord]] = defaultdict(list)
        for worker in self.live_workers():
            for name in served_by(worker):
                by_model[name].append(worker)
        names = sorted(by_model)
        served = []
        for name, raw in zip(
            names, self.redis.mget([keys.model(name) for name in names]) if names else [], strict=True
        ):
            if raw is not None:
                served.append(
                    ServedModel(model=ModelRecord.model_validate_json(raw), workers=by_model[name], registration=raw)
                )
        _listings[self.redis] = (read_at, served)
        return served

    def cached(self, max_age: float) -> list[ServedModel] | None:
        """This process's listing of ``served_models`` if it was read at most ``max_age`` seconds ago, else None."""
        cached = _listings.get(self.redis)
        if cached is not None and time.monotonic() - cached[0] < max_age:
            return cached[1]
        return None

    def forget(self) -> None:
        """Drop this process's cached listing: the next ``served_models`` reads Redis."""
        _listings.pop(self.redis, None)


def served_by(worker: WorkerRecord) -> list[str]:
    """The models a worker serves (older, one-model workers name only ``model``)."""
    return worker.models or [worker.model]


def has_loaded(worker: WorkerRecord, model: str) -> bool:
    """Whether the model sits loaded on the worker's device (one-model workers: always)."""
    return model in worker.loaded if worker.models else worker.model == model
