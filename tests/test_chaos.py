"""Chaos, with real processes: a worker SIGKILLed mid-job, Redis killed and restarted (AOF),
and a worker stopped by SIGTERM mid-job. Each prints its figures (pytest -s, or in CI's log
through `report`), which docs/reliability.md quotes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from diffq.app.contract import events, keys
from diffq.app.embedded_redis import find_redis_server, free_port
from tests.conftest import SHAPES
from tests.helpers import clean_environment, diffq_command, wait_for
from tests.test_webhooks import Receiver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

JOB = {"prompt": "a small red circle on the left, blue background", "steps": 20}
LONG_JOB = {**JOB, "steps": 100, "scheduler": "ddim"}  # a few seconds at one thread: long enough to hit mid-run


def report(capsys: pytest.CaptureFixture, line: str) -> None:
    """Print a figure even under pytest's output capture, so CI logs show it."""
    with capsys.disabled():
        print(f"\n[chaos] {line}")


class Redis_:
    """A redis-server with AOF (appendfsync everysec) that a test can kill and restart in place."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.directory)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = Redis.from_url(self.url)
        wait_for(lambda: _pings(client), timeout=10)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


def _pings(client: Redis) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


class Service:
    """`diffq api` and any number of `diffq worker` processes on one Redis."""

    def __init__(self, redis_url: str, logs: Path, **env: str) -> None:
        self.env = clean_environment(DIFFQ_REDIS_URL=redis_url, DIFFQ_TORCH_THREADS="1", **env)
        self.logs = logs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers: list[subprocess.Popen] = []
        self.others: list[subprocess.Popen] = []
        self.api = self._spawn("api", ["api", "--port", str(self.port)])

    def _spawn(self, name: str, args: list[str], **env: str) -> subprocess.Popen:
        log = (self.logs / f"{name}-{time.monotonic_ns()}.log").open("wb")
        return subprocess.Popen([*diffq_command(), *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**self.env, **env})

    def add_worker(self, **env: str) -> subprocess.Popen:
        """A `diffq worker`; ``env`` on top of the service's (``DIFFQ_FAULT``: worker/faults.py)."""
        worker = self._spawn("worker", ["worker", "--model", str(SHAPES)], **env)
        self.workers.append(worker)
        return worker

    def add_deliverer(self) -> subprocess.Popen:
        deliverer = self._spawn("webhooks", ["webhooks"])
        self.others.append(deliverer)
        return deliverer

    def log_text(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in sorted(self.logs.glob("*.log")))

    def wait_ready(self, workers: int) -> None:
        def ready() -> bool:
            try:
                models = httpx.get(f"{self.url}/v1/models", timeout=2).json()["models"]
            except (httpx.HTTPError, KeyError, ValueError):
                return False
            return bool(models) and len(models[0]["workers"]) >= workers

        wait_for(ready, timeout=120, interval=0.3)

    def post(self, body: dict) -> str:
        response = httpx.post(f"{self.url}/v1/jobs", json=body, timeout=10)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        return httpx.get(f"{self.url}/v1/jobs/{job_id}", timeout=10).json()

    def stop(self) -> None:
        for process in [self.api, *self.workers, *self.others]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [self.api, *self.workers, *self.others]:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def redis_aof(tmp_path: Path) -> Iterator[Redis_]:
    server = Redis_(tmp_path)
    server.start()
    yield server
    if server.process and server.process.poll() is None:
        server.process.terminate()
        server.process.wait()


@pytest.fixture
def service_on(redis_aof: Redis_, tmp_path: Path) -> Iterator:
    services: list[Service] = []

    def start(**env: str) -> Service:
        service = Service(redis_aof.url, tmp_path, **env)
        services.append(service)
        return service

    yield start
    for service in services:
        service.stop()


def test_a_sigkilled_workers_job_runs_again_on_a_live_worker(service_on, redis_aof, capsys) -> None:
    service = service_on()
    service.add_worker(), service.add_worker()
    service.wait_ready(workers=2)
    job_id = service.post(LONG_JOB)
    wait_for(lambda: (service.job(job_id).get("progress") or {}).get("step", 0) >= 10, timeout=60, interval=0.1)

    running_on = Redis.from_url(redis_aof.url).hget(f"diffq:job:{job_id}", "worker").decode().strip('"')
    victim = next(w for w in service.workers if w.pid == int(running_on.split(".")[-2]))
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: service.job(job_id)["attempt"] == 2, timeout=60, interval=0.2)
    recovered = time.monotonic() - killed_at
    job = wait_for(lambda: (j := service.job(job_id))["status"] in ("succeeded", "failed") and j, timeout=120)

    assert job["status"] == "succeeded" and job["attempt"] == 2 and len(job["images"]) == 1, job
    assert recovered < 30
    report(capsys, f"worker SIGKILL mid-job: running again on a live worker {recovered:.1f} s after the kill "
                   f"(heartbeat TTL 10 s + sweep every 2 s); 0 of 1 jobs lost; 1 image set, attempt 2")


def test_jobs_survive_a_redis_kill_and_restart(service_on, redis_aof, capsys) -> None:
    service = service_on()
    service.add_worker()
    service.wait_ready(workers=1)
    ids = [service.post({**JOB, "seed": n}) for n in range(8)]
    time.sleep(1.5)  # appendfsync everysec: what was acknowledged a second ago is on disk

    redis_aof.kill()
    down_at = time.monotonic()
    during = httpx.get(f"{service.url}/v1/jobs/{ids[-1]}", timeout=10)
    time.sleep(2)
    redis_aof.start()
    outage = time.monotonic() - down_at

    def all_done() -> list[dict] | None:
        try:
            jobs = [service.job(job_id) for job_id in ids]
        except (httpx.HTTPError, ValueError):
            return None
        return jobs if all(job.get("status") in ("succeeded", "failed") for job in jobs) else None

    jobs = wait_for(all_done, timeout=180, interval=0.5)
    finished = time.monotonic() - down_at
    succeeded = sum(job["status"] == "succeeded" for job in jobs)
    assert during.status_code == 503 and during.headers["retry-after"] == "1"
    assert succeeded == len(ids), [(job["status"], job.get("error")) for job in jobs]
    report(capsys, f"Redis SIGKILL + restart (AOF everysec, {outage:.1f} s down): {succeeded} of {len(ids)} "
                   f"accepted jobs completed, 0 lost; all done {finished:.1f} s after the kill; API answered "
                   f"{during.status_code} with Retry-After while down")


def test_sigterm_hands_a_long_job_back_after_the_grace_period(service_on, capsys) -> None:
    service = service_on(DIFFQ_SHUTDOWN_GRACE="1")
    first = service.add_worker()
    service.wait_ready(workers=1)
    job_id = service.post(LONG_JOB)
    wait_for(lambda: (service.job(job_id).get("progress") or {}).get("step", 0) >= 5, timeout=60, interval=0.1)

    first.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    assert first.wait(timeout=30) == 0
    handed_back = time.monotonic() - stopped_at
    job = service.job(job_id)
    assert job["status"] == "queued" and job["attempt"] == 1, job

    service.add_worker()
    job = wait_for(lambda: (j := service.job(job_id))["status"] in ("succeeded", "failed") and j, timeout=120)
    assert job["status"] == "succeeded" and job["attempt"] == 2 and len(job["images"]) == 1
    report(capsys, f"SIGTERM mid-job, 1 s grace: worker exited 0 after {handed_back:.1f} s with the job back "
                   f"in the queue; a new worker finished it (attempt 2)")


def test_sigterm_lets_a_short_job_finish_within_the_grace_period(service_on) -> None:
    service = service_on()  # default grace: 30 s
    worker = service.add_worker()
    service.wait_ready(workers=1)
    job_id = service.post(LONG_JOB)
    wait_for(lambda: (service.job(job_id).get("progress") or {}).get("step", 0) >= 5, timeout=60, interval=0.1)

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    job = service.job(job_id)
    assert job["status"] == "succeeded" and job["attempt"] == 1


# Four paths by which a job could be lost (issue 20), each forced at its exact step with a fault
# armed in a real worker process (worker/faults.py), on a real Redis.
FAST = {"DIFFQ_HEARTBEAT_TTL": "3", "DIFFQ_HEARTBEAT_INTERVAL": "0.5", "DIFFQ_SWEEP_INTERVAL": "0.5"}


def event_types(redis: Redis, job_id: str) -> list[str]:
    return [e.type for e in events.read(redis, job_id, count=1000) if e.type in events.STATUS_EVENTS]


def test_a_job_its_dead_worker_left_in_rqs_intermediate_list_runs_on_another(service_on, redis_aof, capsys) -> None:
    service = service_on(**FAST)
    doomed = service.add_worker(DIFFQ_FAULT="kill:taken")  # dies right after RQ's BLMOVE
    service.wait_ready(workers=1)
    job_id = service.post(JOB)
    assert doomed.wait(timeout=60) == -signal.SIGKILL
    redis = Redis.from_url(redis_aof.url)
    intermediate = f"rq:queue:diffq:{service.job(job_id)['model']}:intermediate"
    assert redis.lrange(intermediate, 0, -1) == [job_id.encode()]
    assert service.job(job_id)["status"] == "queued"  # diffq's record, whatever RQ thinks

    service.add_worker()
    died_at = time.monotonic()
    job = wait_for(lambda: (j := service.job(job_id))["status"] in ("succeeded", "failed") and j, timeout=120)
    ran_after = time.monotonic() - died_at

    assert job["status"] == "succeeded" and job["attempt"] == 1, job
    assert event_types(redis, job_id) == ["queued", "running", "succeeded"]
    assert redis.llen(intermediate) == 0
    report(capsys, f"worker SIGKILLed between RQ's dequeue and diffq's claim: the job ran and succeeded "
                   f"{ran_after:.1f} s after a new worker started (heartbeat TTL 3 s), attempt 1")


def test_a_worker_survives_redis_failing_at_every_step_and_each_job_ends_once(service_on, redis_aof, capsys) -> None:
    service = service_on(**FAST)
    steps = ("taken", "dequeued", "claimed", "store", "stored")
    worker = service.add_worker(DIFFQ_FAULT=",".join(f"redis:{step}" for step in steps))
    service.wait_ready(workers=1)
    first = service.post(JOB)
    job = wait_for(lambda: (j := service.job(first))["status"] in ("succeeded", "failed") and j, timeout=120)
    second = service.post({**JOB, "seed": 7})  # the same worker takes jobs again
    after = wait_for(lambda: (j := service.job(second))["status"] in ("succeeded", "failed") and j, timeout=120)

    redis = Redis.from_url(redis_aof.url)
    logs = service.log_text()
    assert worker.poll() is None, logs[-3000:]
    for step in steps:
        assert f"Redis failure injected at step {step!r}" in logs, step
    assert job["status"] == "succeeded" and len(job["images"]) == 1, job
    assert after["status"] == "succeeded" and after["attempt"] == 1
    assert event_types(redis, first).count("succeeded") == 1 and event_types(redis, first)[-1] == "succeeded"
    assert redis.zcard(keys.RUNNING) == 0
    report(capsys, f"Redis failing at each of {len(steps)} steps of one job (take, dequeue, claim, store, after "
                   f"store): the worker stayed up, the job succeeded once (attempt {job['attempt']}), and the "
                   f"next job ran on the same worker")


def test_a_worker_killed_between_storing_and_publishing_sends_one_terminal_webhook(
    service_on, redis_aof, capsys
) -> None:
    receiver = Receiver(free_port())
    service = service_on(**FAST, DIFFQ_WEBHOOK_ALLOW_LOOPBACK="true")
    service.add_deliverer()
    doomed = service.add_worker(DIFFQ_FAULT="kill:stored")  # dies right after the guarded result write
    service.wait_ready(workers=1)
    hook = {"url": f"http://127.0.0.1:{receiver.port}/hook", "events": ["running", "succeeded", "failed"]}
    try:
        job_id = service.post({**JOB, "webhook": hook})
        assert doomed.wait(timeout=120) == -signal.SIGKILL
        job = service.job(job_id)
        wait_for(lambda: len(receiver.requests) >= 2, timeout=30)
        time.sleep(2)  # a duplicate would arrive now
        types = [json.loads(body)["type"] for _, _, body in list(receiver.requests)]
    finally:
        receiver.close()
    assert job["status"] == "succeeded" and job["attempt"] == 1, job
    assert types == ["job.running", "job.succeeded"], types
    report(capsys, "worker SIGKILLed right after storing a result: job.running and job.succeeded each "
                   "delivered exactly once (the events were written by the same script as the changes)")
