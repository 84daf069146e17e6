"""The one way the API waits for a job's change (``diffq.app.api.waiting``), against a real Redis: events
in order, a recheck cue when quiet, the deadline, a hang-up, admission, and the dependency that
routes reach it through. The routes built on it are tested in test_watch, test_client, test_waits,
test_openai_* and test_sdapi."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from redis import Redis

from diffq.app.api import waiting
from diffq.app.api.waiting import Wait, Waiter, WaitTimedOut
from diffq.app.api.waits import WaitCount
from diffq.app.auth.caller import Caller
from diffq.app.contract import connection, events, keys
from diffq.app.contract.records import ModelRecord
from diffq.app.core.errors import ServerBusyError
from diffq.app.core.jobs import JobService
from diffq.app.deps import get_waiter
from diffq.app.main import create_app
from diffq.app.schemas.jobs import job_create_model
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short intervals, so quiet stretches and deadlines pass in a fraction of a second."""
    monkeypatch.setattr(waiting, "POLL_SECONDS", 0.1)
    monkeypatch.setattr(waiting, "RECHECK_SECONDS", 0.3)


@asynccontextmanager
async def admitted(settings: Settings, redis: Redis, most: int = 4) -> AsyncIterator[Wait]:
    quick, blocking = connection.async_client(settings), connection.async_client(settings)
    waiter = Waiter(redis, quick, blocking, WaitCount(most))
    try:
        async with waiter.admit(Caller(None, settings)) as wait:
            yield wait
    finally:
        await quick.aclose()
        await blocking.aclose()


def never() -> Callable[[], Awaitable[bool]]:
    async def disconnected() -> bool:
        return False
    return disconnected


def gone() -> Callable[[], Awaitable[bool]]:
    async def disconnected() -> bool:
        return True
    return disconnected


def test_follow_gives_the_events_in_order_then_a_recheck_cue_once_quiet(settings: Settings, redis: Redis,
                                                                         quick: None) -> None:
    for step in (1, 2, 3):
        events.publish(redis, "j1", "progress", {"step": step}, ttl=60)

    async def scenario() -> tuple[list[list[Any]], float]:
        async with admitted(settings, redis) as wait:
            batches = wait.follow("j1", "0", disconnected=never())
            first = await asyncio.wait_for(anext(batches), 5)
            started = time.monotonic()
            quiet = await asyncio.wait_for(anext(batches), 5)
            await batches.aclose()
            return [first, quiet], time.monotonic() - started

    (first, quiet), waited = asyncio.run(scenario())
    assert [event.data["step"] for event in first] == [1, 2, 3]
    assert quiet == [] and 0.25 <= waited < 2


def test_follow_ends_at_its_deadline_and_when_the_client_hangs_up(settings: Settings, redis: Redis,
                                                                  quick: None) -> None:
    async def scenario() -> tuple[list[Any], float, bool, list[Any], bool]:
        async with admitted(settings, redis) as wait:
            started = time.monotonic()
            timed = [batch async for batch in wait.follow("j2", "0", deadline=started + 0.5)]
            elapsed, after_deadline = time.monotonic() - started, wait.hung_up
            left = [batch async for batch in wait.follow("j2", "0", disconnected=gone())]
            return timed, elapsed, after_deadline, left, wait.hung_up

    timed, elapsed, hung_up_at_deadline, left, hung_up = asyncio.run(scenario())
    assert timed == [[]] and 0.45 <= elapsed < 2  # one recheck cue (0.3 s), then the deadline
    assert not hung_up_at_deadline
    assert left == [] and hung_up


def test_admission_is_refused_beyond_the_process_limit_and_freed_on_exit(settings: Settings, redis: Redis) -> None:
    async def scenario() -> tuple[type[Exception] | None, int]:
        refused = None
        async with admitted(settings, redis, most=1) as wait:
            try:
                async with wait.waiter.admit(Caller(None, settings)):
                    pass
            except ServerBusyError as error:
                refused = type(error)
        return refused, wait.waiter.count.open

    refused, still_open = asyncio.run(scenario())
    assert refused is ServerBusyError and still_open == 0


def _end_silently(redis: Redis, job_id: str, after: float) -> None:
    """End the job in its record alone, publishing no event (as a lost write of RQ's would)."""
    time.sleep(after)
    redis.hset(keys.job(job_id), mapping={"status": json.dumps("failed")})


def test_until_ended_sees_a_job_that_ended_without_an_event(settings: Settings, redis: Redis,
                                                            served: ModelRecord, quick: None) -> None:
    jobs = JobService(redis, settings)
    job_id = jobs.submit(job_create_model(settings).model_validate(TINY_JOB)).record.id

    async def scenario() -> tuple[str, float]:
        async with admitted(settings, redis) as wait:
            started = time.monotonic()
            ender = asyncio.create_task(asyncio.to_thread(_end_silently, redis, job_id, 0.2))
            view = await wait.until_ended(jobs, job_id, 5, disconnected=never())
            await ender
            assert view is not None
            return view.status.value, time.monotonic() - started

    status, elapsed = asyncio.run(scenario())
    assert status == "failed" and elapsed < 3  # at the recheck after 0.3 s of quiet, not at the 5 s timeout


def test_until_ended_times_out_with_the_job_as_it_is_and_result_cancels_for_a_client_gone(
        settings: Settings, redis: Redis, served: ModelRecord, quick: None) -> None:
    jobs = JobService(redis, settings)
    job_id = jobs.submit(job_create_model(settings).model_validate(TINY_JOB)).record.id

    class GoneClient:
        is_disconnected = staticmethod(gone())

    async def scenario() -> tuple[str, float, Any]:
        async with admitted(settings, redis) as wait:
            started = time.monotonic()
            try:
                await wait.until_ended(jobs, job_id, 0.5, disconnected=never())
                raise AssertionError("the wait should have timed out")
            except WaitTimedOut as late:
                status, elapsed = late.view.status.value, time.monotonic() - started
            answer = await wait.result(GoneClient(), jobs, job_id, 10)  # type: ignore[arg-type]
            return status, elapsed, answer

    status, elapsed, answer = asyncio.run(scenario())
    assert status == "queued" and 0.45 <= elapsed < 3
    assert answer is None and jobs.get(job_id).status.value == "canceled"


def test_routes_wait_through_the_dependency(settings: Settings, served: ModelRecord) -> None:
    """A waiter swapped in with ``dependency_overrides`` is the one every waiting route uses: with
    no room for a wait, each of them answers its busy error (503)."""

    async def full(request: Request) -> Waiter:
        return dataclasses.replace(request.app.state.waiter, count=WaitCount(0))

    app = create_app(settings)
    with TestClient(app) as client:
        job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
        assert client.get(f"/v1/jobs/{job_id}", params={"wait": 0.2}).status_code == 200
        app.dependency_overrides[get_waiter] = full
        poll = client.get(f"/v1/jobs/{job_id}", params={"wait": 1})
        stream = client.get(f"/v1/jobs/{job_id}/events")
        openai = client.post("/v1/images/generations", json={"prompt": "a red circle", "size": "16x16"})
        a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "width": 16, "height": 16})
        plain = client.get(f"/v1/jobs/{job_id}")
    assert poll.status_code == 503 and poll.json()["code"] == "server_busy"
    assert stream.status_code == 503 and stream.json()["code"] == "server_busy"
    assert openai.status_code == 503 and openai.json()["error"]["code"] == "server_busy"
    assert a1111.status_code == 503, a1111.text
    assert plain.status_code == 200  # a read that does not wait needs no room
