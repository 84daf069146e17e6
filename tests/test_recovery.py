"""worker/sweeper.py and the hand-back paths: lost workers, max attempts, deadlines (real Redis, RQ)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from diffq.app.contract import events, keys
from diffq.app.contract.records import utcnow
from diffq.app.contract.store import JobStore, WriteResult
from diffq.app.contract.tasks import model_queue
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB, work
from diffq.worker.sweeper import Sweeper

pytestmark = pytest.mark.usefixtures("served")


def later(seconds: float):
    """A clock `seconds` ahead of now, so a fresh claim already looks old to the sweeper."""
    return lambda: time.time() + seconds


def claim_by_dead_worker(redis: Redis, job_id: str, token: str = "lost-token") -> None:
    """What a worker that then died did: dequeue in RQ, claim in diffq."""
    queue = model_queue(JobStore(redis).get(job_id).model, redis)
    job = queue.dequeue_any([queue], timeout=None, connection=redis, serializer=JSONSerializer)
    assert job is not None
    JobStore(redis).claim(job_id, "dead-worker-1", token)


def test_a_lost_workers_job_is_queued_again_and_the_lost_run_cannot_store(client, redis, settings, served) -> None:
    job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
    claim_by_dead_worker(redis, job_id)
    store = JobStore(redis)

    report = Sweeper(redis, settings, served.name, "sweeper", clock=later(60)).sweep()

    assert report.requeued == [job_id]
    record = store.get(job_id)
    assert record.status.value == "queued" and record.lost_attempts == 1 and record.attempt_token is None
    assert job_id in model_queue(served.name, redis).get_job_ids()
    assert Job.fetch(job_id, connection=redis).get_status() == "queued"
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # not RQ's stale view
    values = {"status": "succeeded", "finished_at": utcnow().isoformat()}
    assert store.finish(job_id, "lost-token", values, [], job_ttl=60, result_ttl=60) is WriteResult.STALE


def test_the_requeued_job_completes_on_a_live_worker(client, redis, settings, served, engine) -> None:
    job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
    claim_by_dead_worker(redis, job_id)
    Sweeper(redis, settings, served.name, "sweeper", clock=later(60)).sweep()
    work(settings, engine)

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["attempt"] == 2 and len(job["images"]) == 1
    assert redis.zscore(keys.RUNNING, job_id) is None


def test_a_job_that_keeps_losing_its_worker_fails_after_max_attempts(client, redis, settings, served) -> None:
    job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
    sweeper = Sweeper(redis, settings.model_copy(update={"max_attempts": 2}), served.name, "s", clock=later(60))
    for attempt in (1, 2):
        claim_by_dead_worker(redis, job_id, token=f"t{attempt}")
        redis.delete(keys.sweeper_lock(served.name))
        sweeper.sweep()

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    assert "2 times" in job["error"]["message"]
    assert job_id not in model_queue(served.name, redis).get_job_ids()  # no hot loop


def test_live_and_just_claimed_jobs_are_left_alone(client, redis, settings, served) -> None:
    job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
    claim_by_dead_worker(redis, job_id)
    assert Sweeper(redis, settings, served.name, "s").sweep().requeued == []  # claimed a moment ago

    JobStore(redis).claim(job_id, "test-worker", "t2")  # the `served` fixture's live worker
    redis.delete(keys.sweeper_lock(served.name))
    assert Sweeper(redis, settings, served.name, "s", clock=later(60)).sweep().requeued == []


def test_one_sweep_at_a_time_per_model(redis, settings, served) -> None:
    assert Sweeper(redis, settings, served.name, "a").sweep() is not None
    assert redis.get(keys.sweeper_lock(served.name)) == b"a"


def test_a_job_past_its_deadline_fails_without_running(client, redis, settings, served, engine) -> None:
    job_id = client.post("/v1/jobs", json={**TINY_JOB, "deadline_seconds": 1}).json()["id"]
    other = client.post("/v1/jobs", json={**TINY_JOB, "deadline_seconds": 3600}).json()["id"]
    report = Sweeper(redis, settings, served.name, "s", clock=later(5)).sweep()

    assert report.expired == [job_id]
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "deadline_exceeded" and job["attempt"] == 0
    assert model_queue(served.name, redis).get_job_ids() == [other]


def test_the_api_ends_an_expired_job_itself_when_no_worker_sweeps(client, redis) -> None:
    job_id = client.post("/v1/jobs", json={**TINY_JOB, "deadline_seconds": 0.2}).json()["id"]
    time.sleep(0.3)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "deadline_exceeded"
    assert job["request"]["deadline_at"]


def test_a_worker_that_claims_a_job_past_its_deadline_does_not_run_it(client, redis, settings, engine) -> None:
    job_id = client.post("/v1/jobs", json={**TINY_JOB, "deadline_seconds": 30}).json()["id"]
    record = JobStore(redis).get(job_id)
    past = record.request.model_copy(update={"deadline_at": utcnow() - timedelta(seconds=1)})
    redis.hset(keys.job(job_id), "request", past.model_dump_json())  # as if it had waited in the queue
    work(settings, engine)

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "deadline_exceeded" and job["images"] == []


def test_deadline_is_limited_by_settings(client) -> None:
    response = client.post("/v1/jobs", json={**TINY_JOB, "deadline_seconds": 10**9})
    assert response.status_code == 422 and "deadline_seconds" in response.json()["message"]


def test_a_run_longer_than_the_deployments_timeout_fails_with_timeout(settings, engine) -> None:
    from diffq.app.main import create_app

    short = settings.model_copy(update={"job_timeout": 1})
    with TestClient(create_app(short)) as client:
        job_id = client.post("/v1/jobs", json={**TINY_JOB, "steps": 100, "scheduler": "ddim", "num_images": 4}).json()["id"]
        started = time.monotonic()
        work(short, engine)
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "timeout", job
    assert time.monotonic() - started < 10 and job["images"] == []


def test_a_job_its_dead_worker_took_off_the_queue_but_never_claimed_runs_again(client, redis, settings, served,
                                                                                 engine) -> None:
    job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
    queue = model_queue(served.name, redis)
    # RQ's BLMOVE, by a worker that then died: in the intermediate list, on no queue, not claimed.
    assert redis.lmove(queue.key, queue.intermediate_queue_key) == job_id.encode()
    sweeper = Sweeper(redis, settings, served.name, "s", clock=time.time)
    assert sweeper.sweep().rescued == []  # a live worker would claim it within milliseconds

    redis.delete(keys.sweeper_lock(served.name))
    later_sweep = Sweeper(redis, settings, served.name, "s", clock=later(settings.heartbeat_ttl + 1)).sweep()

    assert later_sweep.rescued == [job_id] and queue.get_job_ids() == [job_id]
    assert redis.llen(queue.intermediate_queue_key) == 0
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    work(settings, engine)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["attempt"] == 1  # it had never run


def test_a_job_rq_marked_started_but_diffq_never_claimed_runs_again(client, redis, settings, served, engine) -> None:
    job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
    queue = model_queue(served.name, redis)
    job = queue.dequeue_any([queue], timeout=None, connection=redis, serializer=JSONSerializer)[0]
    worker = SimpleWorker([queue], connection=redis, name="dead-before-claim")
    worker.prepare_execution(job)  # RQ's steps before it calls the task, then death
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    for clock in (time.time, later(settings.heartbeat_ttl + 1)):
        redis.delete(keys.sweeper_lock(served.name))
        report = Sweeper(redis, settings, served.name, "s", clock=clock).sweep()

    assert report.rescued == [job_id] and queue.get_job_ids() == [job_id]
    work(settings, engine)
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"


def test_a_job_failed_worker_lost_leaves_an_expiring_failed_rq_record(client, redis, settings, served) -> None:
    job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
    sweeper = Sweeper(redis, settings.model_copy(update={"max_attempts": 1}), served.name, "s", clock=later(60))
    claim_by_dead_worker(redis, job_id)
    assert sweeper.sweep().failed == [job_id]

    assert Job.fetch(job_id, connection=redis).get_status() == "failed"
    assert 0 < redis.ttl(f"rq:job:{job_id}") <= settings.job_ttl
    assert [e.type for e in events.read(redis, job_id)] == ["queued", "running", "failed"]


def test_a_sweep_reads_only_the_jobs_whose_deadline_has_passed(client, redis, settings, served) -> None:
    """The sweeper finds passed deadlines in the model's deadline index, so queued jobs without
    one (or not yet due) cost a sweep nothing, however many are queued; entries go once their
    job has ended."""
    for _ in range(30):
        client.post("/v1/jobs", json=TINY_JOB)
    due = client.post("/v1/jobs", json={**TINY_JOB, "deadline_seconds": 1}).json()["id"]
    later_one = client.post("/v1/jobs", json={**TINY_JOB, "deadline_seconds": 3600}).json()["id"]
    index = keys.deadlines(served.name)
    assert [raw.decode() for raw in redis.zrange(index, 0, -1)] == [due, later_one]
    redis.config_resetstat()
    report = Sweeper(redis, settings, served.name, "s", clock=later(5)).sweep()
    assert report.expired == [due]
    reads = redis.info("commandstats")
    assert reads.get("cmdstat_hgetall", {}).get("calls", 0) <= 2, reads  # the due job's record, not 32
    assert [raw.decode() for raw in redis.zrange(index, 0, -1)] == [later_one]
    assert client.get(f"/v1/jobs/{due}").json()["error"]["code"] == "deadline_exceeded"
