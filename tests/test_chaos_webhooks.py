"""Chaos: a webhook receiver that is down while jobs finish, then comes back on the same port.

1. Real processes: `diffq api`, `diffq worker` (tiny model) and `diffq webhooks`
   on the test Redis. The receiver's port is closed while 5 jobs run and every
   terminal delivery fails its first attempt; then a receiver starts on that
   port. The deliverer's own retry schedule (first retry after 5 s ± 20 %) brings
   every delivery exactly once, signed; the test measures how long after the
   receiver's return the last one arrived.
2. Hours of outage, in-process: the same kind of real jobs, a real Deliverer
   whose clock is injected, the receiver down for 3 simulated hours: every
   delivery is still retried, none is lost or doubled once the receiver is back.

Both print their figures (`capsys.disabled()`, so CI logs show them without -s).
"""

from __future__ import annotations

import json
import random
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import standardwebhooks
from fastapi.testclient import TestClient
from redis import Redis

from diffq.app.contract.records import ModelRecord
from diffq.app.embedded_redis import EmbeddedRedis, free_port
from diffq.app.main import create_app
from diffq.app.settings import Settings
from diffq.app.webhooks.deliver import INFLIGHT, Deliverer, attempts
from diffq.app.contract.webhook_outbox import relay
from diffq.app.contract.webhook_queue import DUE
from diffq.app.webhooks.signing import generate_secret
from tests.helpers import TINY_JOB, wait_for, work
from tests.services import services
from tests.test_webhooks import Receiver

pytestmark = pytest.mark.slow

JOBS = 5


def unique_deliveries(receiver: Receiver) -> dict[str, bytes]:
    """Received bodies by webhook-id (a receiver's deduplication)."""
    return {headers["webhook-id"]: body for _, headers, body in list(receiver.requests)}


def test_a_receiver_down_while_jobs_finish_gets_every_event_once_when_back(
    redis_server: EmbeddedRedis, redis: Redis, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = generate_secret()
    port = free_port()  # nothing listens here yet: connections are refused
    hook = {"url": f"http://127.0.0.1:{port}/hook", "events": ["succeeded", "failed", "canceled"]}
    with services(
        redis_server.url, tmp_path, worker=tiny_model, webhooks=True, ready="/readyz",
        DIFFQ_WEBHOOK_SECRET=secret, DIFFQ_WEBHOOK_ALLOW_LOOPBACK="true", DIFFQ_WEBHOOK_TIMEOUT="2",
    ) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        ids = []
        for n in range(JOBS):
            response = http.post("/v1/jobs", json={**TINY_JOB, "seed": n, "webhook": hook})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])

        def all_failed_once() -> list[dict] | None:
            running.check_alive()
            jobs = [http.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
            done = all(j["status"] == "succeeded" and j["webhook"]["deliveries"] for j in jobs)
            return jobs if done else None

        down_jobs = wait_for(all_failed_once, timeout=60, interval=0.2)
        failed_while_down = sum(len(j["webhook"]["deliveries"]) for j in down_jobs)
        assert all(d["outcome"] == "retrying" and "ConnectError" in d["error"]
                   for j in down_jobs for d in j["webhook"]["deliveries"]), down_jobs

        receiver = Receiver(port)
        back_at = time.monotonic()
        try:
            wait_for(lambda: running.check_alive() or len(unique_deliveries(receiver)) == JOBS, timeout=45,
                     interval=0.05)
            last_arrival = time.monotonic() - back_at
            wait_for(lambda: redis.zcard(DUE) == 0 and redis.zcard(INFLIGHT) == 0, timeout=10)
            time.sleep(1.0)  # a duplicate would arrive now
            received = list(receiver.requests)
        finally:
            receiver.close()
        final = [http.get(f"/v1/jobs/{job_id}").json() for job_id in ids]

    unique = unique_deliveries(receiver)
    lost = JOBS - len(unique)
    duplicates = len(received) - len(unique)
    with capsys.disabled():
        print(f"\nwebhook receiver down, real processes: {JOBS} jobs, {failed_while_down} attempts refused while "
              f"down, delivered {len(unique)}/{JOBS}, lost {lost}, duplicates {duplicates}, "
              f"last delivery {last_arrival:.2f} s after the receiver came back")

    assert lost == 0 and duplicates == 0
    assert set(unique) == {f"msg_{job_id}_succeeded" for job_id in ids}
    for _, headers, body in received:
        payload = standardwebhooks.Webhook(secret).verify(body, headers)
        assert payload["type"] == "job.succeeded" and payload["data"]["images"] == [
            f"/v1/jobs/{payload['data']['id']}/images/0.png"
        ]
    for job in final:
        outcomes = [d["outcome"] for d in job["webhook"]["deliveries"]]
        assert outcomes[-1] == "delivered" and outcomes.count("delivered") == 1, outcomes


def test_hours_of_receiver_outage_lose_no_event(
    settings: Settings, served: ModelRecord, engine: object, redis: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    hook_settings = settings.model_copy(update={"webhook_allow_loopback": True, "webhook_timeout": 2.0})
    port = free_port()
    with TestClient(create_app(hook_settings)) as client:
        ids = [client.post("/v1/jobs", json={**TINY_JOB, "seed": n,
                                             "webhook": {"url": f"http://127.0.0.1:{port}/hook"}}).json()["id"]
               for n in range(JOBS)]
    assert work(hook_settings, engine)

    clock = [time.time()]
    outage = 3 * 3600.0
    down_until = clock[0] + outage
    deliverer = Deliverer(redis, hook_settings, clock=lambda: clock[0], jitter=random.Random(1).random)
    receiver: Receiver | None = None
    relay(redis, clock[0])  # the workers wrote the events to the outbox; now they are deliveries, due now
    try:
        while redis.zcard(DUE):
            [(_, due)] = redis.zrange(DUE, 0, 0, withscores=True)
            clock[0] = max(clock[0], due)
            if receiver is None and clock[0] >= down_until:
                receiver = Receiver(port)
            deliverer.run_once()
            assert clock[0] < down_until + 86400, "deliveries still pending a day later"
    finally:
        deliverer.close()
        if receiver is not None:
            receiver.close()

    assert receiver is not None
    records = {job_id: attempts(redis, job_id) for job_id in ids}
    unique = unique_deliveries(receiver)
    lost, duplicates = JOBS - len(unique), len(receiver.requests) - len(unique)
    tries = [len(r) for r in records.values()]
    delivered_at = [datetime.fromisoformat(r[-1]["at"].replace("Z", "+00:00")).timestamp() for r in records.values()]
    after_return = max(delivered_at) - down_until
    with capsys.disabled():
        print(f"\nwebhook receiver down {outage / 3600:.0f} h (injected clock): {JOBS} jobs, {min(tries) - 1}-"
              f"{max(tries) - 1} failed attempts each, delivered {len(unique)}/{JOBS}, lost {lost}, duplicates "
              f"{duplicates}, last delivery {after_return / 60:.0f} min after the receiver came back "
              f"(next step of the backoff)")

    assert lost == 0 and duplicates == 0
    for job_id, record in records.items():
        assert [a["outcome"] for a in record] == ["retrying"] * (len(record) - 1) + ["delivered"]
        assert len(record) >= 7, record  # 5 s, 30 s, 2 min, 5 min, 30 min, 1 h: all before 3 h
        assert json.loads(unique[f"msg_{job_id}_succeeded"])["data"]["status"] == "succeeded"
