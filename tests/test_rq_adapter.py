"""Contract tests of diffq's touches of RQ, against a real Redis and the RQ version installed under
pyproject's pin: what RQ must do for diffq's enqueue, cancel and delete, its workers' dequeue and
its bookkeeping to hold. Upgrading RQ starts here."""

from __future__ import annotations

import ast
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import rq
from packaging.requirements import Requirement
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from diffq.app.contract.rq_adapter import (
    begin_execution,
    end_execution,
    end_lost,
    end_success,
    failure_text,
    fetch_job,
    mark_requeued,
    queue_depths,
    queue_key,
    set_dequeue_order,
    start_execution,
    started_ids,
    taken_ids,
    write_counts,
)
from diffq.app.contract.status import JobStatus
from diffq.app.contract.tasks import cancel_queued, enqueue, forget, intermediate_key, model_queue, rq_status
from diffq.app.settings import Settings

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = REPO / "pyproject.toml"
#: Modules allowed to import rq: the adapter, and the one mapping of RQ's statuses to diffq's.
RQ_IMPORTERS = {"app/contract/rq_adapter.py", "app/contract/status.py"}


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
    api = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["api"]  # the server's part
    pins = [Requirement(line) for line in api]
    pin = next(requirement for requirement in pins if requirement.name == "rq")
    assert pin.specifier.contains(rq.__version__), f"rq {rq.__version__} is outside the pin {pin}"


def test_a_workers_dequeue_moves_the_id_to_the_intermediate_list(redis: Redis, settings: Settings) -> None:
    queue = queued(redis, settings, "a1", "a2")
    assert taken_by_a_worker(queue) == "a1"
    assert redis.lrange(intermediate_key(queue), 0, -1) == [b"a1"]
    assert queue.get_job_ids() == ["a2"] and queue_key("shapes") == queue.key
    assert taken_ids(queue) == ["a1"]


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


def test_only_the_adapter_imports_rq() -> None:
    importers = set()
    for package in ("app", "worker", "model"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                if any(name == "rq" or name.startswith("rq.") for name in names):
                    importers.add(path.relative_to(REPO).as_posix())
    assert importers == RQ_IMPORTERS


def worker_of(queue: Queue) -> SimpleWorker:
    return SimpleWorker([queue], connection=queue.connection, serializer=JSONSerializer)


def test_a_job_taken_along_is_started_and_finished_in_rq_as_if_rq_had_run_it(redis: Redis,
                                                                            settings: Settings) -> None:
    queue = queued(redis, settings, "b1", "b2")
    worker = worker_of(queue)
    redis.lrem(queue.key, 1, "b2")  # taken off the list by diffq's claim script
    job = fetch_job(worker, "b2")
    assert job is not None and fetch_job(worker, "missing") is None
    execution = start_execution(worker, job)
    assert rq_status("b2", redis) == "started" and started_ids(queue) == ["b2"] and taken_ids(queue) == ["b2"]
    assert Job.fetch("b2", connection=redis, serializer=JSONSerializer).worker_name == worker.name

    end_execution(worker, job, queue, execution, None)
    assert rq_status("b2", redis) == "finished" and started_ids(queue) == []
    assert 0 < redis.ttl(Job.key_for("b2")) <= 300  # RQ's result TTL for a success
    assert redis.keys("rq:execution*") == [] and redis.keys("rq:executions*") == []
    redis.rpush(queue.key, "b2")  # handed back to the queue after its run ended in RQ
    assert mark_requeued(queue, "b2") and rq_status("b2", redis) == "queued"
    assert redis.ttl(Job.key_for("b2")) > 300  # a queued job's hash lives the job TTL again, not the result's


def test_a_job_taken_along_fails_in_rq_with_the_leads_failure_text(redis: Redis, settings: Settings) -> None:
    queue = queued(redis, settings, "b3")
    worker = worker_of(queue)
    redis.lrem(queue.key, 1, "b3")
    job = fetch_job(worker, "b3")
    assert job is not None
    end_execution(worker, job, queue, start_execution(worker, job), "ran in the batch of job b0, whose run failed")
    assert rq_status("b3", redis) == "failed" and started_ids(queue) == []
    assert "b3" in FailedJobRegistry(queue.name, connection=redis).get_job_ids()
    assert failure_text(Job.fetch("b3", connection=redis, serializer=JSONSerializer)) == \
        "ran in the batch of job b0, whose run failed"


def test_a_requeued_job_is_queued_again_in_rq_and_a_lost_one_failed(redis: Redis, settings: Settings) -> None:
    queue = queued(redis, settings, "q1", "q2")
    worker = worker_of(queue)
    for job_id in ("q1", "q2"):
        redis.lrem(queue.key, 1, job_id)
        job = fetch_job(worker, job_id)
        assert job is not None
        start_execution(worker, job)
    assert sorted(started_ids(queue)) == ["q1", "q2"]

    redis.lpush(queue.key, "q1")  # diffq's requeue script puts it back on the list
    assert mark_requeued(queue, "q1") and not mark_requeued(queue, "missing")
    end_lost(queue, "q2", 60, "its worker was lost")
    assert rq_status("q1", redis) == "queued" and rq_status("q2", redis) == "failed" and started_ids(queue) == []
    assert "q2" in FailedJobRegistry(queue.name, connection=redis).get_job_ids()
    assert 0 < redis.ttl(Job.key_for("q2")) <= 60
    assert queue_depths(redis) == {"shapes": 1}


def test_a_worker_dequeues_its_queues_in_the_order_set(redis: Redis, settings: Settings) -> None:
    first, second = model_queue("first", redis), model_queue("second", redis)
    enqueue(first, "o1", settings)
    enqueue(second, "o2", settings)
    worker = SimpleWorker([first, second], connection=redis, serializer=JSONSerializer)
    set_dequeue_order(worker, [second, first])
    job, queue = worker.dequeue_job_and_maintain_ttl(timeout=1)
    assert (job.id, queue.name) == ("o2", second.name)


def _commands(redis: Redis) -> int:
    return sum(stats["calls"] for stats in redis.info("commandstats").values())


def _rq_view(redis: Redis, queue: Queue, worker: SimpleWorker, job_id: str) -> dict:
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    fields = {k.decode() for k in redis.hkeys(worker.key)}
    return {
        "status": rq_status(job_id, redis),
        "times": (job.started_at is not None, job.ended_at is not None, job.worker_name == worker.name),
        "ttl": 0 < redis.ttl(job.key) <= 300,
        "started": started_ids(queue),
        "intermediate": redis.lrange(intermediate_key(queue), 0, -1),
        "worker": (worker.get_state(), "current_job" in fields),
    }


def test_rq_bookkeeping_in_two_round_trips_leaves_what_rq_s_queue_and_tools_read_as_rq_s_handlers_do(
    redis: Redis, settings: Settings
) -> None:
    """diffq's worker (DiffqWorker) starts and ends each job in RQ through begin_execution and
    end_success: what RQ's queue and `rq info` read (the job's status, times and TTL, the started
    registry while it runs, the worker's state and current job) is what RQ's own
    prepare_execution, prepare_job_execution, handle_job_success and set_state leave, in 10
    commands instead of about 38: no execution hash or executions set, no finished registry entry,
    no result stream, and the worker's job counters added with its next heartbeat (write_counts)."""
    views, costs = {}, {}
    for job_id, lean in (("r1", False), ("r2", True)):
        queue = queued(redis, settings, job_id)
        worker = worker_of(queue)
        worker.register_birth()
        job, _ = Queue.dequeue_any([queue], timeout=1, connection=redis, serializer=JSONSerializer)
        started = _commands(redis)
        if lean:
            begin_execution(worker, job, remove_from_intermediate=True)
        else:
            worker.prepare_execution(job)
            worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
        middle = _commands(redis)
        assert rq_status(job_id, redis) == "started" and started_ids(queue) == [job_id]
        assert redis.hget(worker.key, "current_job") == job_id.encode()
        assert redis.hget(worker.key, "state") == b"busy"
        ended = _commands(redis)
        job.ended_at = job.last_heartbeat = datetime.now(UTC)
        job._status = "finished"
        if lean:
            end_success(worker, job)
        else:
            worker.handle_job_success(job, queue, queue.started_job_registry)
            worker.set_state("idle")
        costs[job_id] = (middle - started - 1) + (_commands(redis) - ended - 1)  # less an INFO each
        views[job_id] = _rq_view(redis, queue, worker, job_id)
        if lean:
            assert redis.hget(worker.key, "successful_job_count") is None  # held until the next beat
            for _ in range(2):  # the second adds nothing: what was held is written once
                with redis.pipeline(transaction=False) as pipe:
                    write_counts(worker, pipe)
                    pipe.execute()
            assert redis.hget(worker.key, "successful_job_count") == b"1"
            assert float(redis.hget(worker.key, "total_working_time")) >= 0
            assert job_id not in FinishedJobRegistry(queue.name, connection=redis).get_job_ids()
            assert redis.keys("rq:execution*") == []
        redis.delete(worker.key)
    assert views["r2"] == views["r1"]
    assert views["r2"]["status"] == "finished" and views["r2"]["started"] == [] and views["r2"]["ttl"]
    assert views["r2"]["worker"] == ("idle", False)
    assert costs["r2"] <= 10 and costs["r2"] < 0.3 * costs["r1"], costs



def test_a_busy_workers_rq_key_is_renewed_at_a_jobs_start_only_when_it_could_lapse_before_the_job_ends(
    redis: Redis, settings: Settings
) -> None:
    """begin_execution gives the worker's RQ key the job's heartbeat TTL (its timeout plus 60 s)
    only when what it was last given has less than the job's timeout left: a worker busy with
    job after job renews it about once a minute, not at every job."""
    queue = queued(redis, settings, "k1", "k2")
    worker = worker_of(queue)
    worker.register_birth()
    expires = []
    for _ in ("k1", "k2"):
        job, _ = Queue.dequeue_any([queue], timeout=1, connection=redis, serializer=JSONSerializer)
        before = redis.info("commandstats").get("cmdstat_expire", {}).get("calls", 0)
        begin_execution(worker, job, remove_from_intermediate=True)
        expires.append(redis.info("commandstats").get("cmdstat_expire", {}).get("calls", 0) - before)
        ttl = worker.get_heartbeat_ttl(job)
        assert redis.ttl(worker.key) >= ttl - 60 == job.timeout  # outlives the job's longest run
        job.ended_at = job.last_heartbeat = datetime.now(UTC)
        end_success(worker, job)
    assert expires == [1, 0]
    worker.__dict__["_diffq_key_until"] -= 120  # as if the last renewal were two minutes older
    job = fetch_job(worker, "k1")
    assert job is not None
    before = redis.info("commandstats")["cmdstat_expire"]["calls"]
    begin_execution(worker, job, remove_from_intermediate=False)
    assert redis.info("commandstats")["cmdstat_expire"]["calls"] - before == 1
