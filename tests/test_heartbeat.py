"""worker/heartbeat.py: a worker stays registered while alive, busy or not, and leaves cleanly."""

from __future__ import annotations

import time

import pytest
from redis import Redis

from diffq.app.contract import keys
from diffq.app.contract.records import ModelRecord, WorkerRecord, utcnow
from diffq.app.contract.registry import Registry
from diffq.worker import heartbeat as heartbeat_module
from diffq.worker.heartbeat import Heartbeat


def _heartbeat(redis: Redis, served: ModelRecord) -> Heartbeat:
    now = utcnow()
    worker = WorkerRecord(id="hb", model=served.name, device="cpu", dtype="float32", host="h", pid=1,
                          queue=f"diffq:{served.name}", started_at=now, heartbeat_at=now)
    return Heartbeat(Registry(redis, ttl=1), worker, served, interval=0.2)


def test_registration_outlives_its_ttl_while_beating_and_goes_on_stop(redis: Redis, served: ModelRecord) -> None:
    redis.flushall()
    heartbeat = _heartbeat(redis, served)
    registry = Registry(redis, ttl=1)

    heartbeat.start()
    try:
        time.sleep(1.5)  # longer than the TTL: only renewals keep it
        assert [w.id for w in registry.live_workers()] == ["hb"]
        assert registry.model(served.name) == served
    finally:
        heartbeat.stop()

    assert registry.live_workers() == []
    assert not redis.exists(keys.worker("hb"), keys.model(served.name))


def test_busy_shows_the_current_job_at_once_and_its_end_with_the_next_beat(redis: Redis, served: ModelRecord) -> None:
    heartbeat = _heartbeat(redis, served)
    registry = Registry(redis, ttl=1)
    heartbeat.start()
    try:
        with heartbeat.busy("job-1"):
            assert {w.id: w.current_job for w in registry.live_workers()}["hb"] == "job-1"
        with heartbeat.busy("job-2"):  # the next job: its start is written at once
            assert {w.id: w.current_job for w in registry.live_workers()}["hb"] == "job-2"
        deadline = time.monotonic() + 5 * heartbeat.interval + 2
        while {w.id: w.current_job for w in registry.live_workers()}["hb"] is not None:
            assert time.monotonic() < deadline, "the end of the job was never written"
            time.sleep(0.02)
    finally:
        heartbeat.stop()


def test_a_heartbeat_lists_its_models_queues_in_rq_s_set_now_and_then(
    redis: Redis, served: ModelRecord, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RQ's set of queues (rq info, queue depths) gets the models' queues from the first beat and
    then every QUEUES_EVERY-th: a submit no longer writes it, and nothing else removes them."""
    monkeypatch.setattr(heartbeat_module, "QUEUES_EVERY", 3)
    heartbeat = _heartbeat(redis, served)
    listed = f"rq:queue:diffq:{served.name}".encode()
    redis.delete("rq:queues")
    heartbeat.beat()
    assert redis.smembers("rq:queues") == {listed}
    redis.delete("rq:queues")  # as if Redis had lost it
    heartbeat.beat()
    heartbeat.beat()
    assert redis.smembers("rq:queues") == set()
    heartbeat.beat()
    assert redis.smembers("rq:queues") == {listed}
