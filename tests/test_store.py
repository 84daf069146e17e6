"""app/contract/store.py: guarded writes never resurrect, never let a stale run win, never reopen."""

from __future__ import annotations

import pytest
from redis import Redis

from diffq.app.contract import events, keys, tasks
from diffq.app.contract.records import JobParams, JobRecord, Webhook
from diffq.app.contract.status import JobStatus
from diffq.app.contract.store import JobStore, StoredImage, WriteResult
from diffq.app.contract.webhook_outbox import OUTBOX

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


def hooked(store: JobStore, events_wanted: list[str]) -> JobRecord:
    request = PARAMS.model_copy(update={"webhook": Webhook(url="https://example.com/hook", events=events_wanted)})
    record = JobRecord(id="h1", model="tiny", request=request)
    store.create(record, ttl=100)
    return record


def outbox_types(redis: Redis) -> list[str]:
    return [fields[b"type"].decode() for _, fields in redis.xrange(OUTBOX)]


def test_each_status_change_writes_its_event_in_the_same_script(store: JobStore, redis: Redis) -> None:
    hooked(store, ["running", "succeeded", "queued"])
    store.claim("h1", "w", "t1")
    store.requeue("h1", "t1", "rq:queue:test", lost=True, reason="worker_lost")
    store.claim("h1", "w", "t2")
    assert store.finish("h1", "t2", {"status": "succeeded", "seeds": [7]}, [StoredImage(0, b"png")], 100, 100) is (
        WriteResult.WRITTEN
    )
    assert store.finish("h1", "t2", {"status": "failed"}, [], 100, 100) is WriteResult.ENDED  # no second event

    stream = [(e.type, e.data) for e in events.read(redis, "h1")]
    assert stream == [
        ("running", {"attempt": 1}),
        ("queued", {"status": "queued", "reason": "worker_lost", "attempt": 1, "lost_attempts": 1}),
        ("running", {"attempt": 2}),
        ("succeeded", {"status": "succeeded", "seeds": [7], "images": 1}),
    ]
    assert outbox_types(redis) == ["running", "queued", "running", "succeeded"]  # the webhook's events only
    assert redis.lrange("rq:queue:test", 0, -1) == [b"h1"]  # requeued onto RQ's list in that step
    assert 0 < redis.ttl(keys.events("h1")) <= 100


def test_a_job_without_a_webhook_writes_nothing_to_the_outbox(store: JobStore, record: JobRecord,
                                                               redis: Redis) -> None:
    store.claim("j1", "w", "t")
    store.finish("j1", "t", {"status": "succeeded"}, [], 100, 100)
    assert [e.type for e in events.read(redis, "j1")] == ["running", "succeeded"] and outbox_types(redis) == []


def test_the_attempt_that_reaches_max_attempts_fails_worker_lost_with_its_event(store: JobStore,
                                                                                 redis: Redis) -> None:
    hooked(store, ["failed"])
    for attempt in (1, 2):
        store.claim("h1", "w", f"t{attempt}")
        result, lost, failed = store.requeue("h1", f"t{attempt}", "rq:queue:test", lost=True, reason="worker_lost",
                                             max_attempts=2, lost_message="lost twice")
    assert (result, lost, failed) == (WriteResult.WRITTEN, 2, True)
    record = store.get("h1")
    assert record.status is JobStatus.FAILED and record.error.code == "worker_lost" and record.error.message == (
        "lost twice")
    assert redis.lrange("rq:queue:test", 0, -1) == [b"h1"]  # only the first loss queued it again
    assert outbox_types(redis) == ["failed"] and redis.zscore(keys.RUNNING, "h1") is None


def test_a_queued_cancel_and_a_passed_deadline_write_their_events(store: JobStore, redis: Redis) -> None:
    hooked(store, ["canceled", "failed"])
    store.cancel("h1", "2030-01-01T00:00:00+00:00")
    record = JobRecord(id="h2", model="tiny", request=store.get("h1").request)
    store.create(record, ttl=100)
    assert store.expire_if_queued("h2")
    assert [e.type for e in events.read(redis, "h1")] + [e.type for e in events.read(redis, "h2")] == [
        "canceled", "failed"]
    assert outbox_types(redis) == ["canceled", "failed"]


def _commands(redis: Redis) -> int:
    return sum(stats["calls"] for stats in redis.info("commandstats").values())


def test_a_run_s_claim_and_finish_read_the_record_once_each_and_keep_the_stream_s_life(
    store: JobStore, redis: Redis
) -> None:
    """The claim reads the record once (HGETALL) and the finish with its guard; their events go
    into the stream the job's queued event made (its TTL kept), or make it with the record's TTL;
    the finish sets the stream's and the preview's end of life (``events_ttl``)."""
    hook = Webhook(url="https://example.com/h", events=["running", "succeeded"])
    store.create(JobRecord(id="j0", model="tiny", request=PARAMS), ttl=100)
    store.claim("j0", "w1", "t0")  # the scripts loaded: what follows is their cost alone
    store.finish("j0", "t0", {"status": "succeeded"}, [], 100, 100)
    record = JobRecord(id="j2", model="tiny", request=PARAMS.model_copy(update={"webhook": hook}))
    store.create(record, ttl=100)
    redis.xadd(keys.events("j2"), {"type": "queued", "data": "{}"})  # as a submit makes it
    redis.expire(keys.events("j2"), 100)
    fair = keys.fair(tasks.queue_name("tiny"))
    redis.zadd(fair, {"j2": 1, "other": 2})  # its place in the fair order, as a submit gives it
    before = _commands(redis)
    claimed = store.claim("j2", "w1", "t")
    claim_cost = _commands(redis) - before - 1
    assert claimed is not None and (claimed.attempt, claimed.attempt_token, claimed.worker) == (1, "t", "w1")
    assert claim_cost <= 7  # EVALSHA, HGETALL, HSET, ZADD, ZREM (its fair place), XADD, XADD (webhook)
    assert redis.zrange(fair, 0, -1) == [b"other"]  # taken: the next submit has no stale place to drop
    assert 0 < redis.ttl(keys.events("j2")) <= 100
    assert 0 < redis.ttl(keys.events("j0")) <= 100  # a record without its stream: made with the record's TTL

    redis.set(keys.preview("j2"), b"png")
    before = _commands(redis)
    ended = store.finish("j2", "t", {"status": "succeeded"}, [], 100, 100, events_ttl=30)
    finish_cost = _commands(redis) - before - 1
    assert ended is WriteResult.WRITTEN
    assert finish_cost <= 9  # EVALSHA, HMGET, HSET, EXPIRE, ZREM, XADD, XADD (webhook), EXPIRE x2
    assert 0 < redis.ttl(keys.events("j2")) <= 30 and 0 < redis.ttl(keys.preview("j2")) <= 30
    assert 0 < redis.ttl(keys.job("j2")) <= 100
    assert [e[1][b"type"] for e in redis.xrange(keys.events("j2"))] == [b"queued", b"running", b"succeeded"]
    assert [e[1][b"type"] for e in redis.xrange(OUTBOX)] == [b"running", b"succeeded"]

