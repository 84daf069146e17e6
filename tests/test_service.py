"""worker/service.py: a worker registers, runs its queue, and leaves no trace when it stops."""

from __future__ import annotations

import signal
import threading

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from diffq.app.contract import keys
from diffq.app.contract.registry import Registry
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB, wait_for, work
from diffq.worker import context


def test_worker_is_listed_as_busy_while_it_runs_a_job_and_gone_after(
    client: TestClient, redis: Redis, settings: Settings, engine, served
) -> None:
    job_id = client.post("/v1/jobs", json={**TINY_JOB, "steps": 60, "scheduler": "ddim"}).json()["id"]
    redis.delete(keys.worker("test-worker"))  # from now on only the real worker below is live
    busy: list[dict] = []

    def watch() -> None:
        def running_worker() -> list[dict]:
            return [w for m in client.get("/v1/models").json()["models"] for w in m["workers"] if w["busy"]]

        busy.extend(wait_for(running_worker, interval=0.01))

    watcher = threading.Thread(target=watch)
    watcher.start()
    work(settings, engine)
    watcher.join()

    [worker] = busy
    assert worker["device"] == "cpu"
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    assert Registry(redis, settings.heartbeat_ttl).live_workers() == []
    assert client.get("/readyz").status_code == 503


def test_jobs_record_which_worker_ran_them(
    client: TestClient, redis: Redis, settings: Settings, engine, served
) -> None:
    job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
    work(settings, engine)
    record = client.get(f"/v1/jobs/{job_id}").json()
    assert record["attempt"] == 1
    assert redis.hget(keys.job(job_id), "worker").decode().count(".") >= 2  # host.pid.suffix


def test_worker_gives_back_signal_handlers_and_its_context(settings: Settings, engine, served) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    work(settings, engine)
    assert {sig: signal.getsignal(sig) for sig in before} == before
    with pytest.raises(RuntimeError, match="only inside a diffq worker"):
        context.current()
