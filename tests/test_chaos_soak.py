"""A bounded chaos soak, with real processes: jobs keep arriving (each with an Idempotency-Key and
a webhook) while workers are SIGKILLed and Redis is SIGKILLed and restarted from its AOF, at
random moments; then the chaos stops and everything is counted from Redis and the receiver:

- acknowledged: distinct jobs a client got a ``202`` for (retrying its key through outages);
- succeeded / failed (by error code);
- lost: acknowledged jobs that never reached a terminal status (must be 0);
- duplicated: job records beyond one per Idempotency-Key, and jobs with more than one terminal
  event (must be 0);
- terminal webhooks per terminal job, counted by webhook-id as a receiver deduplicates (must be
  exactly 1 for every job), and the raw sends (at least once: a re-send is allowed, and counted).

Redis runs with ``appendfsync always``, so what a kill takes away is what diffq failed to write,
not the last second the AOF had not yet synced (``everysec`` trades that second for speed; the
deployment docs say so). The figures are printed (``capsys.disabled()``, so CI logs show them) and
docs/reliability.md quotes them. Bounded: about three minutes on two cores.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
from redis import Redis

from diffq.app.contract import events, keys
from diffq.app.embedded_redis import find_redis_server
from tests.helpers import wait_for
from tests.test_chaos import Redis_, Service, report
from tests.test_webhooks import Receiver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

WORKER_KILLS = 5
REDIS_KILLS = 3
JOB = {"prompt": "a small red circle on the left, blue background", "steps": 20}  # busy workers: kills hit runs
SETTINGS = {
    "DIFFQ_HEARTBEAT_TTL": "3", "DIFFQ_HEARTBEAT_INTERVAL": "0.5", "DIFFQ_SWEEP_INTERVAL": "0.5",
    "DIFFQ_WEBHOOK_ALLOW_LOOPBACK": "true", "DIFFQ_WEBHOOK_TIMEOUT": "2", "DIFFQ_WEBHOOK_LEASE": "10",
    "DIFFQ_MAX_ATTEMPTS": "3",
}


class DurableRedis(Redis_):
    """``Redis_`` with every write fsynced before its reply (``appendfsync always``)."""

    def start(self) -> None:
        command = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _pings(Redis.from_url(self.url)), timeout=10)


def _pings(client: Redis) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


class Submitter:
    """A client that submits jobs with keys and webhooks and retries each key until it gets a 202."""

    def __init__(self, url: str, hook: dict) -> None:
        self.url, self.hook = url, hook
        self.acknowledged: dict[str, str] = {}  # Idempotency-Key -> job id
        self.retries = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self.stop.is_set():
                key = uuid.uuid4().hex
                body = {**JOB, "seed": random.randrange(1 << 30), "webhook": self.hook}
                while not self.stop.is_set():
                    try:
                        response = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
                        if response.status_code == 202:
                            self.acknowledged[key] = response.json()["id"]
                            break
                    except httpx.HTTPError:
                        pass
                    self.retries += 1
                    time.sleep(0.3)
                self.stop.wait(random.uniform(0.8, 1.6))


def test_a_chaos_soak_loses_and_duplicates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(20)
    redis_server = DurableRedis(tmp_path)
    redis_server.start()
    receiver = Receiver(0)
    service = Service(redis_server.url, tmp_path, **SETTINGS)
    hook = {"url": f"http://127.0.0.1:{receiver.port}/hook", "events": ["succeeded", "failed", "canceled"]}
    kills = Counter()
    try:
        service.add_deliverer()
        for _ in range(2):
            service.add_worker()
        service.wait_ready(workers=2)
        submitter = Submitter(service.url, hook)
        submitter.thread.start()

        # 1. Chaos, in a shuffled order: 2-5 s after two workers serve again, SIGKILL one (a new one
        #    replaces it) or Redis (restarted from its AOF 1-3 s later).
        started = time.monotonic()
        plan = ["worker"] * WORKER_KILLS + ["redis"] * REDIS_KILLS
        rng.shuffle(plan)
        for action in plan:
            time.sleep(rng.uniform(2, 5))
            if action == "worker":
                victim = rng.choice([w for w in service.workers if w.poll() is None])
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                service.add_worker()
            else:
                redis_server.kill()
                time.sleep(rng.uniform(1, 3))
                redis_server.start()
            kills[action] += 1
            service.wait_ready(workers=2)  # the next kill hits a worker that serves, not one still loading
        chaos_seconds = time.monotonic() - started
        submitter.stop.set()
        submitter.thread.join(30)

        # 2. Calm: every acknowledged job ends; every terminal delivery is sent.
        redis = Redis.from_url(redis_server.url)
        acknowledged = dict(submitter.acknowledged)

        def statuses() -> dict[str, str]:
            return {job_id: json.loads(redis.hget(keys.job(job_id), "status") or b'"missing"')
                    for job_id in acknowledged.values()}

        def settled() -> dict[str, str] | None:
            now = statuses()
            return now if all(s in ("succeeded", "failed", "canceled") for s in now.values()) else None

        try:
            final = wait_for(settled, timeout=150, interval=1)
        except AssertionError:
            final = statuses()
        terminal = {job_id for job_id, status in final.items() if status in ("succeeded", "failed", "canceled")}
        wait_for(lambda: redis.xlen("diffq:webhooks:outbox") == 0 and redis.zcard("diffq:webhooks:due") == 0
                 and redis.zcard("diffq:webhooks:inflight") == 0, timeout=60, interval=0.5)
        time.sleep(2)
        received = list(receiver.requests)
        workers_alive = sum(w.poll() is None for w in service.workers)

        # 3. Count, from Redis itself and from what the receiver got.
        prefix = f"{keys.PREFIX}:job:"
        records = [k for k in redis.scan_iter(f"{prefix}*", count=1000) if b":" not in k[len(prefix):]]
        codes = Counter((json.loads(redis.hget(keys.job(job_id), "error") or b"null") or {}).get("code", "?")
                        for job_id in terminal if final[job_id] == "failed")
        terminal_events = {job_id: sum(e.is_terminal for e in events.read(redis, job_id, count=1000))
                           for job_id in terminal}
        rerun = sum(int(redis.hget(keys.job(job_id), "attempt") or b"0") > 1 for job_id in terminal)
    finally:
        service.stop()
        receiver.close()
        if redis_server.process and redis_server.process.poll() is None:
            redis_server.process.terminate()
            redis_server.process.wait()

    lost = sorted(set(acknowledged.values()) - terminal)
    duplicated_records = len(records) - len(acknowledged)
    outcome = Counter(final[job_id] for job_id in terminal)
    doubled_events = sum(count > 1 for count in terminal_events.values())
    by_event: dict[str, set[str]] = {}
    for _, headers, body in received:
        payload = json.loads(body)
        if payload["type"] in ("job.succeeded", "job.failed", "job.canceled"):
            by_event.setdefault(payload["data"]["id"], set()).add(headers["webhook-id"])
    per_job = Counter(len(by_event.get(job_id, set())) for job_id in terminal)
    resent = len(received) - sum(len(ids) for ids in by_event.values())

    report(capsys, f"soak {chaos_seconds:.0f} s of chaos, 2 workers, {kills['worker']} worker SIGKILLs, {kills['redis']} Redis "
                   f"SIGKILL+restarts (AOF always): {len(acknowledged)} jobs acknowledged ({submitter.retries} "
                   f"client retries), {rerun} run again after a kill, {outcome['succeeded']} succeeded, {outcome['failed']} failed {dict(codes)}, "
                   f"lost {len(lost)}, duplicated {duplicated_records + doubled_events}, terminal webhooks per "
                   f"terminal job {dict(per_job)}, re-sent {resent}; workers alive at the end {workers_alive}")
    assert len(acknowledged) >= 20
    assert lost == [], lost
    assert duplicated_records == 0 and doubled_events == 0
    assert set(per_job) == {1}, per_job
    assert workers_alive == len(service.workers) - kills["worker"]  # no worker quit on its own

