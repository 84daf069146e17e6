"""Idempotency-Key on POST /v1/jobs: a retried POST gets the job the first one created.

Counts are read from Redis itself (job records and RQ jobs), never from the
API's answers alone. The race runs 20 POSTs at once against a real `diffq api`
process (uvicorn, its thread pool) and against the in-process TestClient.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.commands.core import Script
from diffq.app.contract import keys
from diffq.app.contract.records import ModelRecord
from diffq.app.contract.tasks import queue_name
from diffq.app.core.idempotency import IdempotencyStore, fingerprint
from diffq.app.core.jobs import JobService
from diffq.app.embedded_redis import EmbeddedRedis
from diffq.app.schemas.jobs import JobCreate
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB
from tests.services import services

RACERS = 20


def job_records(redis: Redis) -> list[str]:
    """Ids of the job records in Redis (``diffq:job:<id>`` hashes, not their sub-keys)."""
    prefix = f"{keys.PREFIX}:job:"
    return sorted(k.decode()[len(prefix):] for k in redis.scan_iter(f"{prefix}*") if b":" not in k[len(prefix):])


def rq_jobs(redis: Redis) -> list[str]:
    return sorted(k.decode().removeprefix("rq:job:") for k in redis.scan_iter("rq:job:*") if k.count(b":") == 2)


def queued(redis: Redis, model: ModelRecord) -> int:
    return redis.llen(f"rq:queue:{queue_name(model.name)}")


def test_same_key_and_body_twice_gives_the_same_job(client: TestClient, served: ModelRecord, redis: Redis) -> None:
    first = client.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "order-17"})
    # The same JSON in another key order and spacing is the same body.
    again = client.post(
        "/v1/jobs", content=b'{ "seed": 7, "steps": 2,\n "prompt": "a red circle" }',
        headers={"Idempotency-Key": "order-17", "content-type": "application/json"},
    )

    assert first.status_code == again.status_code == 202, again.text
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert again.json()["request"] == first.json()["request"]
    assert job_records(redis) == [first.json()["id"]] and rq_jobs(redis) == [first.json()["id"]]
    assert queued(redis, served) == 1


def test_a_replay_shows_the_job_as_it_is_now(client: TestClient, served: ModelRecord) -> None:
    job = client.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "k"}).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")

    again = client.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "k"})
    assert again.status_code == 202 and again.json()["status"] == "canceled"


def test_same_key_with_another_body_is_409(client: TestClient, served: ModelRecord, redis: Redis) -> None:
    client.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "k1"})

    response = client.post("/v1/jobs", json={**TINY_JOB, "seed": 8}, headers={"Idempotency-Key": "k1"})

    assert response.status_code == 409
    error = response.json()
    assert error["code"] == "idempotency_key_reused" and "different request body" in error["message"]
    assert len(job_records(redis)) == 1


def test_without_a_key_every_post_is_a_new_job(client: TestClient, served: ModelRecord, redis: Redis) -> None:
    ids = {client.post("/v1/jobs", json=TINY_JOB).json()["id"] for _ in range(2)}
    assert len(ids) == 2 and len(job_records(redis)) == 2


def test_keys_are_separate(client: TestClient, served: ModelRecord, redis: Redis) -> None:
    a = client.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "a"}).json()["id"]
    b = client.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "b"}).json()["id"]
    assert a != b and len(job_records(redis)) == 2


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9"])
def test_an_unusable_key_is_422_naming_the_header(client: TestClient, served: ModelRecord, key: str) -> None:
    response = client.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": key.encode("utf-8")})
    assert response.status_code == 422
    assert [f["field"] for f in response.json()["fields"]] == ["Idempotency-Key"]


def test_a_request_that_fails_releases_its_key_so_the_retry_creates_the_job(
    client: TestClient, redis: Redis, engine: object, request: pytest.FixtureRequest
) -> None:
    refused = client.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "k"})
    assert refused.status_code == 422 and refused.json()["code"] == "unknown_model"  # no worker yet
    request.getfixturevalue("served")  # now a worker serves the model

    retried = client.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "k"})
    assert retried.status_code == 202 and "idempotent-replayed" not in retried.headers
    assert job_records(redis) == [retried.json()["id"]]


def test_multipart_bodies_match_on_fields_and_file_bytes(
    client: TestClient, served: ModelRecord, redis: Redis
) -> None:
    def png(colour: str) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (served.default_width, served.default_height), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    form = {"prompt": "a red circle", "steps": "2", "seed": "3"}
    headers = {"Idempotency-Key": "upload-1"}
    first = client.post("/v1/jobs", data=form, files={"image": ("a.png", png("red"), "image/png")}, headers=headers)
    again = client.post("/v1/jobs", data=form, files={"image": ("b.png", png("red"), "image/png")}, headers=headers)
    other = client.post("/v1/jobs", data=form, files={"image": ("a.png", png("blue"), "image/png")}, headers=headers)

    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    assert len(job_records(redis)) == 1


def test_a_post_cut_off_before_its_job_was_written_leaves_the_key_free_for_the_retry(
    client: TestClient, served: ModelRecord, settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The API dies (or Redis does) with the key's reservation and the job not yet written: the
    # one script call that writes both never reaches Redis, so neither exists and the retry creates it.
    real_call = Script.__call__

    def cut(script: Script, keys=None, args=None, client=None):
        if any("idempotency" in str(key) for key in keys or []):
            monkeypatch.setattr(Script, "__call__", real_call)
            raise RedisConnectionError("connection cut before the script ran")
        return real_call(script, keys=keys, args=args, client=client)

    monkeypatch.setattr(Script, "__call__", cut)
    first = client.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "cut"})
    assert first.status_code == 503 and job_records(redis) == []
    assert IdempotencyStore(redis, settings.idempotency_ttl).get("cut") is None

    retry = client.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "cut"})
    again = client.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "cut"})
    assert retry.status_code == 202 and "idempotent-replayed" not in retry.headers
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert job_records(redis) == [retry.json()["id"]] == [again.json()["id"]]


def test_the_key_and_its_job_are_written_in_one_transaction(client: TestClient, served: ModelRecord,
                                                             redis: Redis) -> None:
    # One script call (EVALSHA) writes both: Redis runs a script whole, nothing in between.
    seen: list[str] = []
    with redis.monitor() as monitor:
        poster = threading.Thread(target=lambda: client.post("/v1/jobs", json=TINY_JOB,
                                                             headers={"Idempotency-Key": "one-step"}))
        poster.start()
        in_script = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            entry = monitor.next_command()
            command = entry["command"]
            if entry.get("client_type") == "lua":
                if in_script:
                    seen.append(command.split(" ")[0] + " " + (command.split(" ") + [""])[1])
                if command.startswith("ZADD diffq:owner:"):
                    break  # the script's last write
            elif seen:
                break  # the script has ended
            else:  # (a first EVALSHA may be refused NOSCRIPT, then loaded and sent again)
                in_script = command.startswith(("EVALSHA", "EVAL"))
        poster.join(10)
    assert any(c.startswith("SET diffq:idempotency:") for c in seen), seen
    assert any(c.startswith("HSET diffq:job:") for c in seen), seen


def test_a_key_whose_job_was_deleted_is_404(client: TestClient, served: ModelRecord) -> None:
    job = client.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "gone"}).json()
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204

    response = client.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "gone"})
    assert response.status_code == 404 and response.json()["code"] == "job_not_found"


def race(post: Callable[[], httpx.Response], n: int = RACERS) -> list[tuple[int, str | None]]:
    """``n`` threads POST the same keyed request at once (released by a barrier)."""
    barrier = threading.Barrier(n)
    answers: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        response = post()
        with lock:
            answers.append((response.status_code, response.json().get("id")))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


def report(capsys: pytest.CaptureFixture[str], where: str, answers: list, redis: Redis, seconds: float) -> None:
    created = len(job_records(redis))
    with capsys.disabled():
        print(f"\nidempotency race ({where}): {len(answers)} requests, {created} job, {created - 1} duplicates, "
              f"{len({i for _, i in answers})} distinct id(s) answered, "
              f"statuses {sorted({s for s, _ in answers})}, {seconds:.2f} s")


def test_concurrent_posts_with_one_key_create_one_job(
    client: TestClient, served: ModelRecord, redis: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    answers = race(lambda: client.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "race"}))
    report(capsys, "TestClient threads", answers, redis, time.monotonic() - started)

    assert len(answers) == RACERS and {status for status, _ in answers} == {202}
    assert len({job_id for _, job_id in answers}) == 1
    assert job_records(redis) == rq_jobs(redis) == [answers[0][1]] and queued(redis, served) == 1


@pytest.mark.slow
def test_concurrent_posts_to_a_real_api_process_create_one_job(
    redis_server: EmbeddedRedis, served: ModelRecord, redis: Redis, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with services(redis_server.url, tmp_path) as running:
        with httpx.Client(base_url=running.url, timeout=30,
                          limits=httpx.Limits(max_connections=RACERS)) as http:
            http.get("/healthz")
            started = time.monotonic()
            answers = race(lambda: http.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "race"}))
            seconds = time.monotonic() - started
            replay = http.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "race"})
    report(capsys, "real diffq api process", answers, redis, seconds)

    assert len(answers) == RACERS and {status for status, _ in answers} == {202}
    assert len({job_id for _, job_id in answers}) == 1
    assert job_records(redis) == rq_jobs(redis) == [answers[0][1]] and queued(redis, served) == 1
    assert replay.json()["id"] == answers[0][1] and replay.headers["idempotent-replayed"] == "true"
