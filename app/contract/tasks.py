"""The one task workers run, and the RQ queue each model uses.

The API enqueues by the task's dotted path (a string), so it never imports
the worker, and with RQ's JSON serializer the only argument is the job id:
the request itself lives in the job record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from app.contract import keys
from app.settings import Settings

TASK = "worker.task.run_job"
"""Dotted path of the only function a diffq worker will execute."""

QUEUE_PREFIX = "diffq:"


def queue_name(model: str) -> str:
    """One queue per model, so a worker only ever dequeues jobs for the model it holds."""
    return f"{QUEUE_PREFIX}{model}"


def model_queue(model: str, redis: Redis, place: Place | None = None) -> Queue:
    """The RQ queue of a model, with RQ's JSON serializer (never pickle). With ``place``, jobs
    enqueued through it take their owner's fair place in the queue instead of its end."""
    if place is not None:
        return FairQueue(queue_name(model), connection=redis, serializer=JSONSerializer, place=place)
    return Queue(queue_name(model), connection=redis, serializer=JSONSerializer)


@dataclass(frozen=True)
class Place:
    """Whose job is being queued, and in which priority class (0 high, 1 normal, 2 low)."""

    owner: str
    rank: int
    ttl: int  # seconds the fair-order bookkeeping lives after the latest submit


# Fair order within a queue. A queued job's place is (priority class, round): every class is
# served before the next one, and within a class, rounds in order, first come first served within
# a round. An owner's next job takes the round after its previous one, but never one before the
# earliest queued job of its class ("base"; with none queued, the highest round given so far).
# So an owner with nothing queued goes in the round being served now, and waits behind at most
# one job of each owner in that round and one in the next: with key A's 100 jobs queued,
# key B's new job starts after at most 2 more of A's.
#
# KEYS[1]: RQ's queue list. KEYS[2]: the queue's fair zset (job id -> class * SPAN + round).
# KEYS[3]: the fair state hash (owner's last round per class; the top round per class).
# ARGV: job id, owner, class, TTL, job record key prefix. Ids the zset still holds whose job is
# no longer queued (taken by a worker, canceled, deleted) are dropped when met: as the base, by
# the job record's status (no list scan); as the place to insert before, when LINSERT misses.
_FAIR_PUSH = """
local SPAN = 1000000000000
local rank = tonumber(ARGV[3])
local low = rank * SPAN
local base = nil
while true do
  local first = redis.call('ZRANGEBYSCORE', KEYS[2], low, '(' .. (low + SPAN), 'WITHSCORES', 'LIMIT', 0, 1)
  if #first == 0 then break end
  if redis.call('HGET', ARGV[5] .. first[1], 'status') == '"queued"' then
    base = tonumber(first[2]) - low
    break
  end
  redis.call('ZREM', KEYS[2], first[1])
end
local last_field = 'last:' .. rank .. ':' .. ARGV[2]
local top_field = 'top:' .. rank
local last = tonumber(redis.call('HGET', KEYS[3], last_field) or '-1')
local top = tonumber(redis.call('HGET', KEYS[3], top_field) or '0')
local round = math.max(last + 1, base or top)
redis.call('HSET', KEYS[3], last_field, round)
if round > top then redis.call('HSET', KEYS[3], top_field, round) end
local score = low + round
while true do
  local after = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. score, '+inf', 'LIMIT', 0, 1)
  if #after == 0 then
    redis.call('RPUSH', KEYS[1], ARGV[1])
    break
  end
  if redis.call('LINSERT', KEYS[1], 'BEFORE', after[1], ARGV[1]) > 0 then break end
  redis.call('ZREM', KEYS[2], after[1])
end
redis.call('ZADD', KEYS[2], score, ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[4])
return score
"""


class FairQueue(Queue):
    """RQ's queue, except that a new job is inserted at its owner's fair place (``_FAIR_PUSH``)
    rather than appended. Workers dequeue from the front as usual; jobs RQ puts at the front
    (``at_front``) and jobs enqueued by a plain ``Queue`` keep RQ's own placement."""

    def __init__(self, *args: Any, place: Place, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.place = place
        self._fair_push = self.connection.register_script(_FAIR_PUSH)

    def push_job_id(self, job_id: str, pipeline: Pipeline | None = None, at_front: bool = False) -> None:
        if at_front:
            super().push_job_id(job_id, pipeline=pipeline, at_front=True)
            return
        self._fair_push(
            keys=[self.key, keys.fair(self.name), keys.fair_state(self.name)],
            args=[job_id, self.place.owner, self.place.rank, self.place.ttl, keys.job("")],
            client=pipeline if pipeline is not None else self.connection,
        )


#: Seconds RQ keeps a job that succeeded (its job hash, result and finished-registry entry).
FINISHED_TTL = 300


def enqueue(queue: Queue, job_id: str, settings: Settings, pipeline: Pipeline | None = None) -> Job:
    """Queue a job by id. RQ keeps a failure's bookkeeping as long as diffq keeps the record, and a
    success's for ``FINISHED_TTL`` seconds."""
    return queue.enqueue_call(
        TASK,
        args=[job_id],
        job_id=job_id,
        timeout=settings.job_timeout,
        ttl=settings.job_ttl,
        # RQ keeps a success only for FINISHED_TTL (dashboards show recent ones; diffq's record is the
        # truth): its job hash and result stream are 6.7 KB of Redis per job. Failures stay longer.
        result_ttl=min(FINISHED_TTL, settings.job_ttl),
        failure_ttl=settings.job_ttl,
        description=f"diffq job {job_id}",
        pipeline=pipeline,
    )


def mark_requeued(queue: Queue, job_id: str) -> bool:
    """RQ's side of a job that diffq has put back on the queue list itself (``JobStore.requeue``,
    ``JobStore.rescue``): forget its started executions and call it ``queued`` again. Only
    bookkeeping: the list already holds the id. False if RQ no longer has the job."""
    try:
        job = Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer)
    except NoSuchJobError:
        return False
    with queue.connection.pipeline() as pipe:
        StartedJobRegistry(queue.name, connection=queue.connection).remove_executions(job, pipeline=pipe)
        FinishedJobRegistry(queue.name, connection=queue.connection).remove(job, pipeline=pipe)
        job.set_status(RQStatus.QUEUED, pipeline=pipe)
        pipe.execute()
    return True


def end_lost(queue: Queue, job_id: str, ttl: int, reason: str) -> None:
    """RQ's side of a job diffq failed ``worker_lost``: no started executions left, status
    ``failed`` in the failed registry, and the RQ job expiring after ``ttl`` like any failure."""
    try:
        job = Job.fetch(job_id, connection=queue.connection, serializer=JSONSerializer)
    except NoSuchJobError:
        return
    with queue.connection.pipeline() as pipe:
        StartedJobRegistry(queue.name, connection=queue.connection).remove_executions(job, pipeline=pipe)
        job.set_status(RQStatus.FAILED, pipeline=pipe)
        FailedJobRegistry(queue.name, connection=queue.connection).add(job, ttl=ttl, exc_string=reason, pipeline=pipe)
        pipe.expire(job.key, ttl)
        pipe.execute()


def intermediate_key(queue: Queue) -> str:
    """RQ's list of job ids a worker has taken off ``queue`` (BLMOVE) and not yet started."""
    return queue.intermediate_queue_key


def started_ids(queue: Queue) -> list[str]:
    """Ids of the jobs RQ has marked started on ``queue`` (without RQ's own cleanup)."""
    registry = StartedJobRegistry(queue.name, connection=queue.connection)
    return list(dict.fromkeys(job_id for job_id, _ in registry.get_job_and_execution_ids(cleanup=False)))


def rq_status(job_id: str, redis: Redis) -> RQStatus | None:
    """RQ's status of a job, or ``None`` when RQ no longer has it (deleted or expired)."""
    try:
        return Job(job_id, connection=redis).get_status(refresh=True)
    except InvalidJobOperation:
        return None
