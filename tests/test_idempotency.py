"""app/core/idempotency.py: one key, one job; a reused key with another body is refused."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from redis import Redis

from diffq.app.api.errors import STATUS
from diffq.app.core.errors import IdempotencyConflictError, InvalidRequestError
from diffq.app.core.idempotency import (
    IdempotencyStore,
    Reservation,
    fingerprint,
    fingerprint_multipart,
    redis_key,
    validate_key,
)
from diffq.app.embedded_redis import EmbeddedRedis

BODY = {"prompt": "a small red circle", "steps": 4, "options": {"seed": 7, "size": [16, 16]}}


@pytest.fixture
def store(redis: Redis) -> IdempotencyStore:
    return IdempotencyStore(redis, ttl_seconds=100)


def test_first_use_reserves_the_key_for_the_new_job(store: IdempotencyStore, redis: Redis) -> None:
    reservation = store.reserve("key-1", fingerprint(BODY), "job-a")

    assert (reservation.job_id, reservation.created) == ("job-a", True)
    assert store.get("key-1") == {
        "body_sha256": fingerprint(BODY),
        "job_id": "job-a",
        "created_at": reservation.created_at.isoformat(),
    }
    name = redis_key("key-1")
    assert name.startswith("diffq:idempotency:") and len(name) == len("diffq:idempotency:") + 64
    assert 0 < redis.ttl(name) <= 100


def test_a_retry_with_the_same_body_gets_the_same_job(store: IdempotencyStore) -> None:
    first = store.reserve("key-1", fingerprint(BODY), "job-a")
    again = store.reserve("key-1", fingerprint(BODY), "job-b")

    assert again == Reservation(job_id="job-a", created=False, created_at=first.created_at)


def test_the_same_key_with_another_body_is_a_conflict(store: IdempotencyStore) -> None:
    first = store.reserve("key-1", fingerprint(BODY), "job-a")

    with pytest.raises(IdempotencyConflictError) as raised:
        store.reserve("key-1", fingerprint({**BODY, "steps": 5}), "job-b")

    error = raised.value
    assert error.code == "idempotency_key_reused" and STATUS[IdempotencyConflictError] == 409
    assert "different request body" in error.message and first.created_at.isoformat() in error.message
    assert "job-a" not in error.message  # a job id is the right to read the job: never handed out on a mismatch
    assert store.get("key-1")["job_id"] == "job-a"


def test_keys_are_separate_per_key_and_per_scope(store: IdempotencyStore) -> None:
    assert store.reserve("key-1", fingerprint(BODY), "job-a").created
    assert store.reserve("key-2", fingerprint(BODY), "job-b").created
    assert store.reserve("key-1", fingerprint({"other": 1}), "job-c", scope="tenant-2").created
    assert redis_key("ab", scope="c") != redis_key("b", scope="ca")


def test_release_lets_a_retry_create_the_job(store: IdempotencyStore) -> None:
    store.reserve("key-1", fingerprint(BODY), "job-a")

    assert not store.release("key-1", "job-other")  # not that job's reservation: kept
    assert store.release("key-1", "job-a")
    assert store.get("key-1") is None
    retry = store.reserve("key-1", fingerprint({"changed": True}), "job-b")
    assert (retry.job_id, retry.created) == ("job-b", True)
    assert store.release("key-1")  # without a job id: whatever it holds
    assert store.get("key-1") is None


def test_the_key_expires_with_the_window(redis: Redis) -> None:
    store = IdempotencyStore(redis, ttl_seconds=1)
    store.reserve("key-1", fingerprint(BODY), "job-a")
    redis.pexpire(redis_key("key-1"), 1)  # as if the window had passed
    time.sleep(0.05)

    assert store.reserve("key-1", fingerprint({"new": "body"}), "job-b").created


def test_fingerprint_ignores_key_order_and_whitespace() -> None:
    spaced = b'{ "steps" : 4,\n "options": {"size": [16, 16], "seed": 7}, "prompt": "a small red circle" }'

    assert fingerprint(spaced) == fingerprint(BODY) == fingerprint({k: BODY[k] for k in reversed(list(BODY))})
    assert fingerprint({**BODY, "steps": 5}) != fingerprint(BODY)
    assert fingerprint({"prompt": "caf\u00e9"}) == fingerprint('{"prompt":"caf\\u00e9"}'.encode())
    assert fingerprint(b"\xff not json") == fingerprint(b"\xff not json") != fingerprint(b"\xff not json!")


def test_multipart_fingerprint_covers_fields_and_file_contents() -> None:
    fields = {"prompt": "p", "strength": "0.6"}
    base = fingerprint_multipart(fields, {"image": b"png-1"})

    assert fingerprint_multipart(dict(reversed(fields.items())), {"image": b"png-1"}) == base
    assert fingerprint_multipart(fields, {"image": b"png-2"}) != base
    assert fingerprint_multipart(fields, {"mask": b"png-1"}) != base
    assert fingerprint_multipart({**fields, "prompt": "q"}, {"image": b"png-1"}) != base


@pytest.mark.parametrize("key", ["", "   ", "x" * 256, "caf\u00e9", "tab\there", "new\nline"])
def test_invalid_keys_are_refused_on_the_header_field(store: IdempotencyStore, key: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        store.reserve(key, fingerprint(BODY), "job-a")
    assert raised.value.problems[0].field == "Idempotency-Key"


def test_valid_keys() -> None:
    assert validate_key(None) is None
    for key in ["a", "x" * 255, "8e0f6b8e-4a1c-4c55-9b8e-2f7b0f1f3c6d", "order 42/retry~!"]:
        assert validate_key(key) == key


def test_concurrent_reservations_agree_on_one_job(redis: Redis, redis_server: EmbeddedRedis) -> None:
    """20 threads, each with its own connection, race for one key: one creates, all share its job."""
    start = threading.Barrier(20)

    def reserve(n: int) -> Reservation:
        client = Redis.from_url(redis_server.url)
        try:
            store = IdempotencyStore(client, ttl_seconds=100)
            start.wait(timeout=10)
            return store.reserve("race", fingerprint(BODY), f"job-{n}")
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(reserve, range(20)))

    assert sum(result.created for result in results) == 1
    winner = next(result.job_id for result in results if result.created)
    assert {result.job_id for result in results} == {winner}
    assert IdempotencyStore(redis, 100).get("race")["job_id"] == winner
