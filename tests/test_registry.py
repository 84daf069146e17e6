"""app/contract/registry.py: live workers and their models, decided by Redis key expiry."""

from __future__ import annotations

import time

from redis import Redis

from diffq.app.contract import keys
from diffq.app.contract.records import ModelRecord, WorkerRecord, utcnow
from diffq.app.contract.registry import Registry


def _worker(worker_id: str, model: str) -> WorkerRecord:
    now = utcnow()
    return WorkerRecord(id=worker_id, model=model, device="cpu", dtype="float32", host="h", pid=1,
                        queue=f"diffq:{model}", started_at=now, heartbeat_at=now)


def test_expired_workers_are_not_live_and_are_pruned(redis: Redis, served: ModelRecord) -> None:
    Registry(redis, ttl=1).announce(_worker("brief", served.name), served)
    registry = Registry(redis, ttl=60)
    assert {w.id for w in registry.live_workers()} == {"test-worker", "brief"}

    time.sleep(1.2)

    assert {w.id for w in registry.live_workers()} == {"test-worker"}
    assert redis.smembers(keys.WORKERS) == {b"test-worker"}


def test_withdraw_keeps_a_model_that_another_worker_still_serves(redis: Redis, served: ModelRecord) -> None:
    registry = Registry(redis, ttl=60)
    registry.announce(_worker("second", served.name), served)

    registry.withdraw("second", served.name)
    assert registry.model(served.name) == served

    registry.withdraw("test-worker", served.name)
    assert registry.model(served.name) is None
    assert registry.served_models() == []


def test_served_models_group_workers_by_model(redis: Redis, served: ModelRecord) -> None:
    other: ModelRecord = served.model_copy(update={"name": "other"})
    registry = Registry(redis, ttl=60)
    registry.announce(_worker("w-other", "other"), other)
    registry.announce(_worker("w-tiny-2", served.name), served)

    served_models = {s.model.name: sorted(w.id for w in s.workers) for s in registry.served_models()}
    assert served_models == {"other": ["w-other"], served.name: ["test-worker", "w-tiny-2"]}
