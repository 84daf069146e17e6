"""app/contract/tasks.py: one queue per model, and RQ jobs that carry only the job id."""

from __future__ import annotations

from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from diffq.app.contract.tasks import TASK, enqueue, model_queue, queue_name, rq_status
from diffq.app.settings import Settings


def test_each_model_has_its_own_queue(redis: Redis) -> None:
    assert queue_name("shapes") == "diffq:shapes"
    assert model_queue("shapes", redis).key == "rq:queue:diffq:shapes"


def test_enqueue_sets_timeouts_and_lifetimes_from_settings(redis: Redis, settings: Settings) -> None:
    strict = settings.model_copy(update={"job_timeout": 42, "job_ttl": 99})
    enqueue(model_queue("shapes", redis), "abc", strict)

    job = Job.fetch("abc", connection=redis, serializer=JSONSerializer)
    assert (job.func_name, job.args, job.kwargs) == (TASK, ["abc"], {})
    assert (job.timeout, job.ttl, job.result_ttl, job.failure_ttl) == (42, 99, 99, 99)  # job_ttl under FINISHED_TTL
    assert rq_status("abc", redis) == "queued"
    assert rq_status("missing", redis) is None
