"""app/contract/store.py: guarded writes never resurrect, never let a stale run win, never reopen."""

from __future__ import annotations

import pytest
from redis import Redis

from app.contract import keys
from app.contract.records import JobParams, JobRecord
from app.contract.status import JobStatus
from app.contract.store import JobStore, StoredImage, WriteResult

PARAMS = JobParams(prompt="p", width=16, height=16, steps=2, guidance_scale=7.5, scheduler="ddim", seed=1, num_images=2)


@pytest.fixture
def store(redis: Redis) -> JobStore:
    return JobStore(redis)


@pytest.fixture
def record(store: JobStore) -> JobRecord:
    record = JobRecord(id="j1", model="tiny", request=PARAMS)
    store.create(record, ttl=100)
    return record


def test_record_round_trips_through_the_hash(store: JobStore, record: JobRecord, redis: Redis) -> None:
    assert store.get("j1") == record
    assert 0 < redis.ttl(keys.job("j1")) <= 100
    assert redis.hget(keys.job("j1"), "status") == b'"queued"'


def test_claim_starts_a_new_attempt_each_time(store: JobStore, record: JobRecord) -> None:
    first = store.claim("j1", "w1", "token-1")
    assert (first.status, first.attempt, first.attempt_token, first.worker) == (JobStatus.RUNNING, 1, "token-1", "w1")
    assert first.started_at is not None

    second = store.claim("j1", "w2", "token-2")
    assert (second.attempt, second.attempt_token) == (2, "token-2")


def test_stale_attempts_cannot_write(store: JobStore, record: JobRecord) -> None:
    store.claim("j1", "w1", "old")
    store.claim("j1", "w2", "new")

    assert store.update("j1", "old", {"progress": {"step": 1, "total": 2}}) is WriteResult.STALE
    assert store.finish("j1", "old", {"status": "succeeded"}, [StoredImage(0, b"png")], 100, 100) is WriteResult.STALE
    assert store.get("j1").progress is None
    assert store.image("j1", 0) is None
    assert store.update("j1", "new", {"progress": {"step": 1, "total": 2}}) is WriteResult.WRITTEN


def test_writes_to_a_deleted_job_do_not_recreate_it(store: JobStore, record: JobRecord, redis: Redis) -> None:
    store.claim("j1", "w1", "t")
    assert store.delete("j1")

    assert store.update("j1", "t", {"progress": {"step": 1, "total": 2}}) is WriteResult.MISSING
    assert store.finish("j1", "t", {"status": "succeeded"}, [StoredImage(0, b"png")], 100, 100) is WriteResult.MISSING
    assert store.claim("j1", "w1", "t2") is None
    assert redis.keys("*") == []


def test_ended_jobs_never_change_again(store: JobStore, record: JobRecord) -> None:
    store.claim("j1", "w1", "t")
    assert store.finish("j1", "t", {"status": "canceled"}, [], 100, 100) is WriteResult.WRITTEN

    assert store.update("j1", "t", {"status": "running"}) is WriteResult.ENDED
    assert store.finish("j1", "t", {"status": "succeeded"}, [StoredImage(0, b"png")], 100, 100) is WriteResult.ENDED
    assert store.claim("j1", "w2", "t2") is None
    assert store.get("j1").status is JobStatus.CANCELED


def test_finish_stores_images_and_fields_together_with_their_ttls(
    store: JobStore, record: JobRecord, redis: Redis
) -> None:
    store.claim("j1", "w1", "t")
    images = [StoredImage(0, b"first"), StoredImage(1, b"second")]

    assert store.finish("j1", "t", {"status": "succeeded", "seeds": [1, 2]}, images, job_ttl=500, result_ttl=50) is (
        WriteResult.WRITTEN
    )

    assert (store.image("j1", 0), store.image("j1", 1)) == (b"first", b"second")
    assert 0 < redis.ttl(keys.image("j1", 1)) <= 50
    assert 100 < redis.ttl(keys.job("j1")) <= 500
    assert store.get("j1").seeds == [1, 2]


def test_delete_removes_every_image(store: JobStore, record: JobRecord, redis: Redis) -> None:
    store.claim("j1", "w1", "t")
    store.finish("j1", "t", {"status": "succeeded"}, [StoredImage(0, b"a"), StoredImage(1, b"b")], 100, 100)

    assert store.delete("j1")
    assert redis.keys("*") == []
    assert not store.delete("j1")
