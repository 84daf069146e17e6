"""Tenants against real processes: `diffq api` with API keys on (the deployment default), and a
real worker for fair share: event-stream limits need a server that streams, and "B's job starts
after at most 2 more of A's" is about when a worker really starts jobs."""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from redis import Redis

from diffq.app.auth.apikeys import KeyLimits, KeyStore
from diffq.app.embedded_redis import EmbeddedRedis
from tests.helpers import TINY_JOB, wait_for
from tests.services import services

pytestmark = pytest.mark.slow


def bearer(redis: Redis, name: str, **limits: object) -> dict[str, str]:
    _, token = KeyStore(redis).create(name, KeyLimits(**{"rate_limit": "10000/second", **limits}))
    return {"Authorization": f"Bearer {token}"}


def test_a_key_holds_at_most_its_number_of_event_streams(
    redis_server: EmbeddedRedis, redis: Redis, served, tmp_path: Path
) -> None:
    key = bearer(redis, "streamer", max_event_streams=2)
    other = bearer(redis, "other")
    with services(redis_server.url, tmp_path, DIFFQ_AUTH="keys") as api:  # no worker: jobs stay queued
        with httpx.Client(base_url=api.url, timeout=30) as http:
            job = http.post("/v1/jobs", json=TINY_JOB, headers=key).json()["id"]
            theirs = http.post("/v1/jobs", json=TINY_JOB, headers=other).json()["id"]
            opened, release = [], threading.Event()

            def hold() -> None:
                with http.stream("GET", f"/v1/jobs/{job}/events", headers=key) as stream:
                    opened.append(stream.status_code)
                    release.wait(60)

            holders = [threading.Thread(target=hold) for _ in range(2)]
            for holder in holders:
                holder.start()
            wait_for(lambda: len(opened) == 2, timeout=30)
            assert opened == [200, 200]

            third = http.get(f"/v1/jobs/{job}/events", headers=key)
            assert third.status_code == 429 and third.json()["code"] == "too_many_streams"
            assert "Retry-After" in third.headers
            with http.stream("GET", f"/v1/jobs/{theirs}/events", headers=other) as stream:
                assert stream.status_code == 200  # another key's streams are its own

            release.set()
            for holder in holders:
                holder.join()

            def reopens() -> bool:  # the server notices the closed streams at its next check
                with http.stream("GET", f"/v1/jobs/{job}/events", headers=key) as stream:
                    return stream.status_code == 200

            wait_for(reopens, timeout=30, interval=0.5)


def test_b_starts_after_at_most_two_more_of_a_with_a_real_worker(
    redis_server: EmbeddedRedis, redis: Redis, tiny_model: Path, tmp_path: Path
) -> None:
    a, b = bearer(redis, "shop-a"), bearer(redis, "shop-b")
    # One job at a time (no batching), so "starts" is a strict order.
    with services(redis_server.url, tmp_path, worker=tiny_model, ready="/readyz", DIFFQ_AUTH="keys",
                  DIFFQ_BATCH_MAX="1") as api, httpx.Client(base_url=api.url, timeout=30) as http:
        a_jobs = [http.post("/v1/jobs", json={**TINY_JOB, "seed": n}, headers=a).json()["id"] for n in range(40)]
        b_job = http.post("/v1/jobs", json=TINY_JOB, headers=b).json()
        submitted_at = datetime.fromisoformat(b_job["timings"]["created_at"])

        def ended(job_id: str, headers: dict[str, str]) -> dict | None:
            job = http.get(f"/v1/jobs/{job_id}", params={"wait": 10}, headers=headers).json()
            return job if job["status"] == "succeeded" else None

        b_started = datetime.fromisoformat(wait_for(lambda: ended(b_job["id"], b), timeout=240)["timings"]["started_at"])
        a_started = [datetime.fromisoformat(wait_for(lambda j=j: ended(j, a), timeout=240)["timings"]["started_at"])
                     for j in a_jobs]
    in_between = [t for t in a_started if submitted_at < t < b_started]
    assert len(in_between) <= 2, (len(in_between), sum(t < submitted_at for t in a_started))
    assert sum(t > b_started for t in a_started) > 0, "A's jobs were all done before B's: the test proved nothing"
