"""Contract tests of diffq's touches of RQ, against a real Redis and the RQ version installed under
pyproject's pin: what RQ must do for diffq's enqueue, cancel and delete, its workers' dequeue and
its bookkeeping to hold. Upgrading RQ starts here."""

from __future__ import annotations

import tomllib
from pathlib import Path

import rq
from packaging.requirements import Requirement
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from app.contract.status import JobStatus
from app.contract.tasks import cancel_queued, enqueue, forget, intermediate_key, model_queue, rq_status
from app.settings import Settings

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def queued(redis: Redis, settings: Settings, *ids: str) -> Queue:
    queue = model_queue("shapes", redis)
    for job_id in ids:
        enqueue(queue, job_id, settings)
    return queue


def taken_by_a_worker(queue: Queue) -> str:
    """What an RQ worker's dequeue does before diffq's code runs: the id moves to RQ's intermediate list."""
    result = Queue.dequeue_any([queue], timeout=1, connection=queue.connection, serializer=JSONSerializer)
    assert result is not None
    return result[0].id


def test_the_installed_rq_is_the_pinned_one() -> None:
    pins = [Requirement(line) for line in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]]
    pin = next(requirement for requirement in pins if requirement.name == "rq")
    assert pin.specifier.contains(rq.__version__), f"rq {rq.__version__} is outside the pin {pin}"


def test_a_workers_dequeue_moves_the_id_to_the_intermediate_list(redis: Redis, settings: Settings) -> None:
    queue = queued(redis, settings, "a1", "a2")
    assert taken_by_a_worker(queue) == "a1"
    assert redis.lrange(intermediate_key(queue), 0, -1) == [b"a1"]
    assert queue.get_job_ids() == ["a2"]


def test_cancel_queued_takes_the_job_off_the_queue_and_rq_calls_it_canceled(redis: Redis, settings: Settings) -> None:
    queue = queued(redis, settings, "c1", "c2")
    cancel_queued(redis, "c1")
    cancel_queued(redis, "c1")  # again: harmless
    cancel_queued(redis, "missing")
    assert queue.get_job_ids() == ["c2"] and rq_status("c1", redis) == "canceled"


def test_forget_deletes_a_queued_or_ended_job_in_rq(redis: Redis, settings: Settings) -> None:
    queue = queued(redis, settings, "f1", "f2", "f3")
    forget(redis, "shapes", "f1", JobStatus.QUEUED)
    forget(redis, "shapes", "f2", JobStatus.SUCCEEDED)
    assert queue.get_job_ids() == ["f3"]
    assert rq_status("f1", redis) is None and rq_status("f2", redis) is None
    forget(redis, "shapes", "missing", JobStatus.FAILED)  # RQ's job already expired: nothing to do


def test_forget_leaves_a_running_job_and_one_a_worker_has_taken_to_its_worker(redis: Redis,
                                                                               settings: Settings) -> None:
    queue = queued(redis, settings, "t1", "r1")
    taken = taken_by_a_worker(queue)  # taken, not yet claimed: diffq's record still says queued
    forget(redis, "shapes", taken, JobStatus.QUEUED)
    forget(redis, "shapes", "r1", JobStatus.RUNNING)
    assert Job.exists(taken, connection=redis) and Job.exists("r1", connection=redis)
    assert redis.lrange(intermediate_key(queue), 0, -1) == [taken.encode()]
