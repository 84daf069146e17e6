"""Waits (long polls, OpenAI-endpoint waits, event streams) against a real `diffq api` process with
API keys on: one key's flood of waits is capped per key with `429 too_many_waits`, and never costs
another key's reads their answers (issue 19, finding 2)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from redis import Redis

from diffq.app.auth.apikeys import KeyLimits, KeyStore
from diffq.app.embedded_redis import EmbeddedRedis
from tests.helpers import TINY_JOB
from tests.services import services

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("served")]

FLOOD = 120  # as in the report: 120 long polls from one key
OPENAI_FLOOD = 10
MAX_WAITS = 20


def key(redis: Redis, name: str) -> dict[str, str]:
    _, token = KeyStore(redis).create(name, KeyLimits(rate_limit="100000/second"))
    return {"Authorization": f"Bearer {token}"}


async def first_event(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> str:
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                return line.removeprefix("event:").strip()
    return ""


async def flood_and_read(url: str, flooder: dict[str, str], other: dict[str, str]) -> dict[str, list]:
    limits = httpx.Limits(max_connections=FLOOD + OPENAI_FLOOD + 20, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        a_job = (await client.post("/v1/jobs", json=TINY_JOB, headers=flooder)).json()["id"]
        b_job = (await client.post("/v1/jobs", json=TINY_JOB, headers=other)).json()["id"]
        flood = [asyncio.create_task(client.get(f"/v1/jobs/{a_job}", params={"wait": 6}, headers=flooder))
                 for _ in range(FLOOD)]
        flood += [asyncio.create_task(client.post("/v1/images/generations", headers=flooder,
                                                  json={"prompt": "a red circle", "size": "16x16", "steps": 2}))
                  for _ in range(OPENAI_FLOOD)]
        await asyncio.sleep(1.5)  # the flood is in, its admitted waits are blocking
        reads = []
        for _ in range(10):
            started = time.monotonic()
            response = await client.get(f"/v1/jobs/{b_job}", headers=other)
            reads.append((response.status_code, time.monotonic() - started, response.text))
        started = time.monotonic()
        poll = await client.get(f"/v1/jobs/{b_job}", params={"wait": 1}, headers=other)
        reads.append((poll.status_code, time.monotonic() - started - 1, poll.text))
        event = await first_event(client, f"/v1/jobs/{b_job}/events", other)
        flooded = await asyncio.gather(*flood)
    return {"reads": reads, "event": [event], "flood": [(r.status_code, r.text) for r in flooded]}


def test_a_flood_of_waits_from_one_key_gets_429_and_leaves_other_keys_answering(
    redis_server: EmbeddedRedis, redis: Redis, tmp_path: Path
) -> None:
    flooder, other = key(redis, "flooder"), key(redis, "bystander")
    with services(redis_server.url, tmp_path, DIFFQ_AUTH="keys", DIFFQ_MAX_WAITS=str(MAX_WAITS),
                  DIFFQ_OPENAI_TIMEOUT="6") as api:
        result = asyncio.run(flood_and_read(api.url, flooder, other))

    statuses = [status for status, _ in result["flood"]]
    print(f"\nwaits flood: {FLOOD} long polls + {OPENAI_FLOOD} OpenAI waits from one key -> "
          f"{ {s: statuses.count(s) for s in sorted(set(statuses))} }; the other key's reads: "
          f"{[status for status, _, _ in result['reads']]}, slowest {max(t for _, t, _ in result['reads']):.2f} s")
    for status, seconds, text in result["reads"]:
        assert status == 200, text  # never 503 "Redis is unreachable"
        assert seconds < 2.0, (seconds, text)
    assert result["event"] == ["queued"]  # the bystander's stream is served
    refused = [text for status, text in result["flood"] if status == 429]
    assert set(statuses) <= {200, 429, 504}, statuses
    assert len(refused) >= FLOOD + OPENAI_FLOOD - MAX_WAITS, statuses
    assert all("too_many_waits" in text and "DIFFQ_MAX_WAITS" in text for text in refused)
    assert not redis.zcard(f"diffq:owner:{flooder['Authorization'].split('_')[1]}:waits")  # all released


async def concurrent_polls(url: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        job = (await client.post("/v1/jobs", json=TINY_JOB)).json()["id"]
        return list(await asyncio.gather(*[client.get(f"/v1/jobs/{job}", params={"wait": 3}) for _ in range(count)]))


def test_waits_beyond_the_process_blocking_pool_get_503_server_busy(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    """With auth off there is no key to cap; the process still serves no more waits than its pool holds."""
    with services(redis_server.url, tmp_path, DIFFQ_REDIS_WAIT_CONNECTIONS="3") as api:
        answers = asyncio.run(concurrent_polls(api.url, 8))
        assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200
    statuses = sorted(response.status_code for response in answers)
    assert statuses == [200] * 3 + [503] * 5, statuses
    busy = [response.json() for response in answers if response.status_code == 503]
    assert all(body["code"] == "server_busy" and "DIFFQ_REDIS_WAIT_CONNECTIONS" in body["message"] for body in busy)
