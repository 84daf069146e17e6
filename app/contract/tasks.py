"""The one task workers run, and the RQ queue each model uses.

The API enqueues by the task's dotted path (a string), so it never imports
the worker, and with RQ's JSON serializer the only argument is the job id:
the request itself lives in the job record.
"""

from __future__ import annotations

from redis import Redis
from redis.client import Pipeline
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from app.settings import Settings

TASK = "worker.task.run_job"
"""Dotted path of the only function a diffq worker will execute."""

QUEUE_PREFIX = "diffq:"


def queue_name(model: str) -> str:
    """One queue per model, so a worker only ever dequeues jobs for the model it holds."""
    return f"{QUEUE_PREFIX}{model}"


def model_queue(model: str, redis: Redis) -> Queue:
    """The RQ queue of a model, with RQ's JSON serializer (never pickle)."""
    return Queue(queue_name(model), connection=redis, serializer=JSONSerializer)


def enqueue(queue: Queue, job_id: str, settings: Settings, pipeline: Pipeline | None = None) -> Job:
    """Queue a job by id. RQ keeps its bookkeeping as long as diffq keeps the record."""
    return queue.enqueue_call(
        TASK,
        args=[job_id],
        job_id=job_id,
        timeout=settings.job_timeout,
        ttl=settings.job_ttl,
        result_ttl=settings.job_ttl,
        failure_ttl=settings.job_ttl,
        description=f"diffq job {job_id}",
        pipeline=pipeline,
    )


def enqueue_again(queue: Queue, job_id: str) -> bool:
    """Put an RQ job that was started (and maybe finished) back on its queue as ``queued``:
    for a job diffq hands back (lost worker, shutdown). False if RQ no longer has the job."""
    try:
        job = Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer)
    except NoSuchJobError:
        return False
    StartedJobRegistry(queue.name, connection=queue.connection).remove_executions(job)  # RQ 2: per execution
    FinishedJobRegistry(queue.name, connection=queue.connection).remove(job)
    queue.enqueue_job(job)
    return True


def rq_status(job_id: str, redis: Redis) -> RQStatus | None:
    """RQ's status of a job, or ``None`` when RQ no longer has it (deleted or expired)."""
    try:
        return Job(job_id, connection=redis).get_status(refresh=True)
    except InvalidJobOperation:
        return None
