"""worker/allowlist.py: a diffq worker runs its own task with a job id, and refuses anything else."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from diffq.app.contract.records import ModelRecord
from diffq.app.contract.tasks import TASK, queue_name
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB, work
from diffq.worker.allowlist import refusal_reason

pytestmark = pytest.mark.usefixtures("served")


def _queue(redis: Redis, model: ModelRecord, serializer=JSONSerializer) -> Queue:
    return Queue(queue_name(model.name), connection=redis, serializer=serializer)


def _failure(redis: Redis, job_id: str) -> str:
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FAILED
    return job.latest_result().exc_string


def test_a_job_naming_another_function_is_refused_and_nothing_runs(
    redis: Redis, served: ModelRecord, settings: Settings, engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    job = _queue(redis, served).enqueue_call("os.system", args=[f"touch {marker}"])  # by hand, as an intruder would

    with caplog.at_level(logging.ERROR, logger="diffq.worker.allowlist"):
        work(settings, engine)

    assert not marker.exists()
    assert "RefusedTaskError" in _failure(redis, job.id)
    assert "'os.system'" in _failure(redis, job.id)
    [logged] = [r for r in caplog.records if r.name == "diffq.worker.allowlist"]
    assert f"refused RQ job {job.id}" in logged.getMessage() and "'os.system'" in logged.getMessage()


def test_diffq_task_with_other_arguments_is_refused(
    redis: Redis, served: ModelRecord, settings: Settings, engine
) -> None:
    queue = _queue(redis, served)
    wrong_id = queue.enqueue_call(TASK, args=["someone-elses-job"])
    with_kwargs = queue.enqueue_call(TASK, args=[], kwargs={"job_id": "x"})

    work(settings, engine)

    for job in (wrong_id, with_kwargs):
        assert "arguments must be exactly [job id]" in _failure(redis, job.id)


def test_a_pickled_payload_is_refused_without_unpickling(
    redis: Redis, served: ModelRecord, settings: Settings, engine, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    job = _queue(redis, served, serializer=None).enqueue_call("os.system", args=[f"touch {marker}"])  # pickle

    work(settings, engine)

    assert not marker.exists()
    assert Job(job.id, connection=redis).get_status() == JobStatus.FAILED


def test_a_tampered_diffq_job_ends_failed_with_code_refused(
    client: TestClient, redis: Redis, settings: Settings, engine, tmp_path: Path
) -> None:
    job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
    rq_job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    rq_job.func_name, rq_job.args = "os.system", (f"touch {tmp_path / 'pwned'}",)  # as an attacker would
    rq_job.save()

    work(settings, engine)

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "refused"
    assert not (tmp_path / "pwned").exists()


def test_the_genuine_task_passes(client: TestClient, redis: Redis) -> None:
    job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
    assert refusal_reason(Job.fetch(job_id, connection=redis, serializer=JSONSerializer)) is None
