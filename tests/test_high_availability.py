"""Redis high availability, with real processes: a Sentinel failover loses no acknowledged job,
a full Redis answers 503 redis_full and leaves nothing half-written, and an evicting Redis is
refused at start. The failover test prints its figures (docs/high-availability.md
quotes them)."""

from __future__ import annotations

import re
import signal
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from redis.exceptions import OutOfMemoryError

from diffq.app.contract import keys
from diffq.app.contract.memory import EvictionPolicyError
from diffq.app.contract.records import ModelRecord
from diffq.app.embedded_redis import EmbeddedRedis, free_port
from diffq.app.main import create_app
from diffq.app.settings import Settings
from tests.helpers import clean_environment, diffq_command, wait_for
from tests.redis_ha import SentinelCluster

KILLS = 3
ORPHAN_AFTER = 10.0
JOB = {"prompt": "a small red circle on the left, blue background", "steps": 20, "num_images": 2}


def report(capsys: pytest.CaptureFixture, line: str) -> None:
    with capsys.disabled():
        print(f"\n[ha] {line}")


# --- the failover test ----------------------------------------------------------------------------


@dataclass
class Submitter:
    """Submits jobs without pause, each under its own Idempotency-Key, retrying 503s, 409s
    (the key's first request still creating) and connection errors with the same key; backs
    off as a 429 says (the queue is full). A key answered 404 never had a job: its first
    request reserved it and died with the primary before creating the job (a reservation and
    its job written in one step, issue 20, closes that); the client goes on with a new key, and
    so it does after ORPHAN_AFTER seconds of 409s (the API answers 404 only after a minute)."""

    url: str
    acknowledged: dict[str, str] = field(default_factory=dict)  # key -> job id
    replies: list[tuple[float, int, str]] = field(default_factory=list)  # (time answered, status, code)
    accepted_sent: list[float] = field(default_factory=list)  # when each request answered 202 was sent
    keys_to_jobs: dict[str, set[str]] = field(default_factory=dict)
    never_created: list[str] = field(default_factory=list)  # keys answered 404
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop.is_set():
                self._submit_one(client, uuid.uuid4().hex)

    def _submit_one(self, client: httpx.Client, key: str) -> None:
        first_conflict: float | None = None
        while True:  # a key is never abandoned: once submitted, it is retried until acknowledged
            sent = time.monotonic()
            try:
                response = client.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": key})
            except httpx.HTTPError:
                self.replies.append((time.monotonic(), 0, "connection"))
                time.sleep(0.1)
                continue
            code = response.json().get("code", "") if response.status_code != 202 else ""
            self.replies.append((time.monotonic(), response.status_code, code))
            if response.status_code == 202:
                job_id = response.json()["id"]
                self.keys_to_jobs.setdefault(key, set()).add(job_id)
                self.acknowledged[key] = job_id
                self.accepted_sent.append(sent)
                return
            if response.status_code == 409 and code == "idempotency_key_in_progress":
                # Only this client's own first request could create the job, and it has had its answer.
                first_conflict = first_conflict or time.monotonic()
                if time.monotonic() - first_conflict > ORPHAN_AFTER:
                    self.never_created.append(key)
                    return
                time.sleep(0.1)
            elif response.status_code == 503:
                time.sleep(0.1)
            elif response.status_code == 429:
                time.sleep(min(float(response.headers["Retry-After"]), 1.0))
            elif response.status_code == 404 and code == "job_not_found":
                self.never_created.append(key)
                return
            else:
                self.replies.append((time.monotonic(), response.status_code, response.text[:300]))
                time.sleep(0.5)


@pytest.fixture
def cluster() -> Iterator[SentinelCluster]:
    started = SentinelCluster().start()
    yield started
    started.stop()


@dataclass
class Processes:
    log_dir: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        with (self.log_dir / f"{name}.log").open("wb") as log:
            self.running[name] = subprocess.Popen([*diffq_command(), *args], stdout=log, stderr=subprocess.STDOUT,
                                                  env=env)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.running.items() if p.poll() is not None}
        assert not dead, f"exited: {dead}\n" + "\n".join(self.log(name)[-3000:] for name in dead)

    def stop(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.stop()


def _jobs_on(node_client: Redis) -> set[str]:
    """Ids of every job record on a Redis (``diffq:job:<id>``, not its sub-keys)."""
    return {raw.decode().split(":")[2] for raw in node_client.scan_iter(match=keys.job("*"), count=1000)
            if raw.decode().count(":") == 2}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_no_acknowledged_job_is_lost_across_three_sentinel_failovers(
    cluster: SentinelCluster, processes: Processes, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    port = free_port()
    env = clean_environment(
        DIFFQ_REDIS_URL="redis://127.0.0.1:1/0",  # the address is Sentinel's to give; this is unused
        DIFFQ_REDIS_SENTINELS=cluster.addresses, DIFFQ_REDIS_SENTINEL_SERVICE="diffq",
        DIFFQ_REDIS_WAIT_REPLICAS="1", DIFFQ_REDIS_WAIT_TIMEOUT="2", DIFFQ_MAX_QUEUE_DEPTH="40",
        DIFFQ_TORCH_THREADS="1", DIFFQ_HEARTBEAT_INTERVAL="1", DIFFQ_BATCH_MAX="1", DIFFQ_LOG_FORMAT="text",
    )
    processes.spawn("api", ["api", "--port", str(port)], env)
    for n in (1, 2):
        processes.spawn(f"worker-{n}", ["worker", "--model", str(tiny_model)], env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        processes.check_alive()
        try:
            return httpx.get(f"{url}/readyz", timeout=2).json()["workers"] == 2
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    wait_for(ready, timeout=240, interval=0.3)
    submitter = Submitter(url)
    clients = [threading.Thread(target=submitter.run, daemon=True) for _ in range(2)]  # two connections
    for client in clients:
        client.start()
    wait_for(lambda: len(submitter.acknowledged) >= 10, timeout=60, interval=0.1)

    windows: list[tuple[float, float]] = []
    promotions: list[float] = []
    for _ in range(KILLS):
        primary = cluster.primary()
        with primary.client() as redis:  # kill while jobs are queued, running and finishing
            wait_for(lambda r=redis: r.zcard(keys.RUNNING) > 0 and r.llen("rq:queue:diffq:tiny") > 0,
                     timeout=60, interval=0.05)
        killed = time.monotonic()
        _, _, promoted, rejoined = cluster.fail_over()
        promotions.append(promoted)
        windows.append((killed, killed + rejoined + 3.0))  # + the client's retry and the API's WAIT timeout
        wait_for(lambda: any(t > killed + rejoined and s == 202 for t, s, _ in submitter.replies[-50:]),
                 timeout=90, interval=0.2)
        processes.check_alive()
        time.sleep(2)

    submitter.stop.set()
    for client in clients:
        client.join(timeout=90)
    acknowledged = dict(submitter.acknowledged)
    with httpx.Client(base_url=url, timeout=10) as http:

        def all_ended() -> list[dict] | None:
            jobs = [http.get(f"/v1/jobs/{job_id}").json() for job_id in acknowledged.values()]
            return jobs if all(job["status"] in ("succeeded", "failed", "canceled") for job in jobs) else None

        jobs = wait_for(all_ended, timeout=180, interval=1.0)
        images_ok = all(http.get(image["url"]).status_code == 200 for job in jobs for image in job["images"])
    processes.check_alive()

    succeeded = [job for job in jobs if job["status"] == "succeeded" and len(job["images"]) == JOB["num_images"]]
    lost = len(acknowledged) - len(succeeded)
    twice_keyed = sum(len(ids) > 1 for ids in submitter.keys_to_jobs.values())
    with cluster.primary().client() as redis:
        stored = _jobs_on(redis)
    extra_jobs = stored - set(acknowledged.values())
    completions: dict[str, int] = {}
    for name in ("worker-1", "worker-2"):
        for job_id in re.findall(r"job ([0-9a-f]{32}): succeeded with", processes.log(name)):
            completions[job_id] = completions.get(job_id, 0) + 1
    ran_twice = [job_id for job_id, count in completions.items() if count > 1]
    unavailable = [t for t, status, _ in submitter.replies if status in (0, 503)]
    outside = [t for t in unavailable if not any(start <= t <= end for start, end in windows)]
    errors = [(status, code) for _, status, code in submitter.replies
              if status not in (0, 202, 409, 429, 503) and code != "job_not_found"]
    spans, outages = [], []  # per kill: the last 503 (or refused connection), the first 202 after the kill
    for start, end in windows:
        inside = [t for t in unavailable if start <= t <= end]
        spans.append(max(inside) - start if inside else 0.0)
        outages.append(min(t for t in submitter.accepted_sent if t > start) - start)

    report(capsys, f"{KILLS} primary SIGKILLs, each failed over by 3 sentinels: promotion after "
                   f"p50 {statistics.median(promotions):.1f} s / max {max(promotions):.1f} s; 503 window (kill to the last "
                   f"503 or refused connection) p50 {statistics.median(spans):.1f} s / max {max(spans):.1f} s; "
                   f"kill to the next request answered 202 p50 {statistics.median(outages):.1f} s / max {max(outages):.1f} s; "
                   f"jobs acknowledged {len(acknowledged)}, succeeded {len(succeeded)}, lost {lost}, "
                   f"duplicated {twice_keyed + len(extra_jobs) + len(ran_twice)}; "
                   f"{len(unavailable)} 503s/refused connections, {sum(s == 429 for _, s, _ in submitter.replies)} "
                   f"429s (queue full); {len(submitter.never_created)} key(s) whose job was never created "
                   f"(answered 404, never 202)")
    assert errors == [], errors[:10]
    assert lost == 0, [(job["id"], job["status"], job.get("error")) for job in jobs if job not in succeeded]
    assert images_ok
    assert twice_keyed == 0 and extra_jobs == set(), (twice_keyed, extra_jobs)
    assert ran_twice == [], ran_twice
    # The key is written in the job's own MULTI (docs/reliability.md): a failover keeps both or neither.
    assert submitter.never_created == [], submitter.never_created
    assert outside == [], f"{len(outside)} 503s outside the failover windows"
    assert len(acknowledged) > 20 and all(span > 0 for span in spans)


# --- the memory guard -----------------------------------------------------------------------------


@pytest.fixture
def small_redis() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis()
    server.start()
    yield server
    server.stop()


def test_a_full_redis_answers_503_redis_full_leaves_nothing_half_written_and_recovers(
    small_redis: EmbeddedRedis, served_on_small: ModelRecord, tmp_path: Path
) -> None:
    redis = Redis.from_url(small_redis.url)
    settings = Settings(_env_file=None, redis_url=small_redis.url, auth="off", model_path=tmp_path / "none")
    with TestClient(create_app(settings)) as client:
        used = int(redis.info("memory")["used_memory"])
        redis.config_set("maxmemory", used + 2 * 2**20)
        chunk, filled = b"x" * 2**16, 0
        while True:  # fill it until Redis refuses writes
            try:
                redis.set(f"filler:{filled}", chunk)
                filled += 1
            except OutOfMemoryError:
                break
        # Right at the limit, a client's freed buffers can bring Redis back under it for a moment:
        # lower the limit below what the data now takes, so it stays full for the assertions.
        full_at = int(int(redis.info("memory")["used_memory"]) * 0.95)
        redis.config_set("maxmemory", full_at)
        before = set(redis.keys("*"))
        response = client.post("/v1/jobs", json={"prompt": "a red circle"}, headers={"Idempotency-Key": "k-1"})
        assert response.status_code == 503 and response.json()["code"] == "redis_full", response.text
        assert int(response.headers["Retry-After"]) >= 1
        assert set(redis.keys("*")) == before, "a refused job left keys behind"
        unkeyed = client.post("/v1/jobs", json={"prompt": "a red circle"})  # no key: the job's own writes come first
        assert unkeyed.status_code == 503 and unkeyed.json()["code"] == "redis_full", unkeyed.text
        assert set(redis.keys("*")) == before, "a refused job left keys behind"
        metrics = client.get("/metrics").text
        assert float(re.search(r"^diffq_redis_memory_max_bytes (\S+)$", metrics, re.M).group(1)) == full_at
        assert float(re.search(r"^diffq_redis_memory_used_bytes (\S+)$", metrics, re.M).group(1)) > used

        redis.delete(*[f"filler:{n}" for n in range(filled)])  # memory freed: the service takes jobs again
        again = client.post("/v1/jobs", json={"prompt": "a red circle"}, headers={"Idempotency-Key": "k-1"})
        assert again.status_code == 202, again.text
        assert client.get(f"/v1/jobs/{again.json()['id']}").json()["status"] == "queued"
    redis.close()


def test_a_primary_without_its_replicas_answers_503_not_500(
    small_redis: EmbeddedRedis, served_on_small: ModelRecord, tmp_path: Path
) -> None:
    with Redis.from_url(small_redis.url) as redis:
        redis.config_set("min-replicas-to-write", 1)  # no replica is connected: writes get NOREPLICAS
        settings = Settings(_env_file=None, redis_url=small_redis.url, auth="off", model_path=tmp_path / "none")
        with TestClient(create_app(settings)) as client:
            response = client.post("/v1/jobs", json={"prompt": "a red circle"}, headers={"Idempotency-Key": "k"})
            assert response.status_code == 503 and response.json()["code"] == "store_unavailable", response.text
            assert response.headers["Retry-After"] == "1" and "NOREPLICAS" in response.json()["message"]
        redis.config_set("min-replicas-to-write", 0)


@pytest.fixture
def served_on_small(small_redis: EmbeddedRedis, engine) -> ModelRecord:  # type: ignore[no-untyped-def]
    from diffq.app.contract.records import WorkerRecord, utcnow
    from diffq.app.contract.registry import Registry
    from diffq.app.contract.tasks import queue_name
    from diffq.worker.service import model_record

    model = model_record(engine)
    now = utcnow()
    worker = WorkerRecord(id="test-worker", model=model.name, device=model.device, dtype=model.dtype,
                          host="localhost", pid=1, queue=queue_name(model.name), started_at=now, heartbeat_at=now)
    with Redis.from_url(small_redis.url) as redis:
        Registry(redis, ttl=60).announce(worker, model)
    return model


def test_an_evicting_redis_is_refused_at_start_by_the_api_and_the_worker(
    small_redis: EmbeddedRedis, engine, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    from diffq.worker.service import run_worker

    with Redis.from_url(small_redis.url) as redis:
        redis.config_set("maxmemory-policy", "allkeys-lru")
    port = free_port()
    env = clean_environment(DIFFQ_REDIS_URL=small_redis.url)
    api = subprocess.run([*diffq_command(), "api", "--port", str(port)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert api.returncode != 0
    assert "maxmemory-policy is 'allkeys-lru'" in api.stderr and "noeviction" in api.stderr
    assert "DIFFQ_REDIS_ALLOW_EVICTION" in api.stderr
    settings = Settings(_env_file=None, redis_url=small_redis.url, model_path=tmp_path / "none")
    with pytest.raises(EvictionPolicyError, match="noeviction"):
        run_worker(settings, engine=engine, burst=True)
    allowed = settings.model_copy(update={"redis_allow_eviction": True, "auth": "off"})
    with TestClient(create_app(allowed)) as client:  # told it may, the API starts
        assert client.get("/healthz").status_code == 200
