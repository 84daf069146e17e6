"""Finds jobs that would otherwise be stuck, and sets them going (or ends them) within seconds.

RQ leaves the job of a killed worker in its started registry until that
entry expires (many minutes) and then fails it. diffq instead looks every
``sweep_interval`` seconds, from every worker (one at a time per model, by a
short Redis lock):

- a running job whose worker's registration has expired (heartbeats stop
  ``heartbeat_ttl`` seconds after the process dies) goes back to ``queued``
  and into RQ's queue again, for any live worker to take. Its old attempt
  token is void, so the lost run can never store anything if it wakes up.
  After ``max_attempts`` lost attempts it fails with ``worker_lost`` instead:
  a job that kills its worker every time does not loop;
- a queued job past its ``deadline_at`` ends ``failed`` with ``deadline_exceeded``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis.exceptions
from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from app.contract import events, keys, metrics
from app.contract.records import ErrorCode, utcnow
from app.contract.registry import Registry
from app.contract.status import JobStatus
from app.contract.store import JobStore, WriteResult
from app.contract.tasks import enqueue_again, model_queue
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    """What one sweep did (job ids)."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)


class Sweeper:
    """Sweeps the jobs of one model."""

    def __init__(self, redis: Redis, settings: Settings, model: str, owner: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.settings = settings
        self.model = model
        self.owner = owner
        self.clock = clock
        self.store = JobStore(redis)
        self.registry = Registry(redis, settings.heartbeat_ttl)
        self.queue = model_queue(model, redis)

    def sweep(self) -> SweepReport:
        report = SweepReport()
        lock = int(self.settings.sweep_interval * 1000 * 0.9) or 1
        if not self.redis.set(keys.sweeper_lock(self.model), self.owner, nx=True, px=lock):
            return report  # another worker of this model swept a moment ago
        self._lost_jobs(report)
        self._passed_deadlines(report)
        return report

    def _lost_jobs(self, report: SweepReport) -> None:
        live = {worker.id for worker in self.registry.live_workers()}
        now = self.clock()
        for job_id, claimed_at in self.store.running():
            record = self.store.get(job_id)
            if record is None or record.status is not JobStatus.RUNNING:
                self.redis.zrem(keys.RUNNING, job_id)  # ended or deleted without the index noticing
                continue
            if record.model != self.model or record.worker in live:
                continue
            if now - claimed_at < self.settings.heartbeat_ttl:
                continue  # just claimed: its worker's first heartbeat may still be on the way
            self._recover(record.id, record.attempt_token, record.worker, record.attempt, report)

    def _recover(self, job_id: str, token: str | None, worker: str | None, attempt: int, report: SweepReport) -> None:
        result, lost = self.store.requeue(job_id, token, lost=True)
        if result is not WriteResult.WRITTEN:
            return
        if lost >= self.settings.max_attempts:
            message = (f"its worker was lost {lost} times (last: {worker}); giving up after "
                       f"{self.settings.max_attempts} lost attempts")
            values = {"status": "failed", "finished_at": utcnow().isoformat(),
                      "error": {"code": ErrorCode.WORKER_LOST.value, "message": message}}
            self.store.finish(job_id, None, values, [], job_ttl=self.settings.job_ttl,
                              result_ttl=self.settings.result_ttl)
            self._forget_rq_job(job_id)
            metrics.record_finished(self.redis, self.model, "failed", ErrorCode.WORKER_LOST.value)
            events.publish(self.redis, job_id, "failed", {"status": "failed", "error": values["error"], "images": 0},
                           self.settings.job_ttl)
            report.failed.append(job_id)
            log.warning("job %s: %s", job_id, message)
            return
        if not enqueue_again(self.queue, job_id):
            log.error("job %s: RQ no longer has it; it cannot be queued again", job_id)
        # `attempt` (the one lost) keeps this event's webhook-id apart from the first `queued`.
        events.publish(self.redis, job_id, "queued", {"status": "queued", "reason": "worker_lost", "attempt": attempt,
                                                      "lost_attempts": lost}, self.settings.job_ttl)
        report.requeued.append(job_id)
        log.warning("job %s: worker %s was lost; queued again (lost attempts: %d)", job_id, worker, lost)

    def _passed_deadlines(self, report: SweepReport) -> None:
        now = datetime.fromtimestamp(self.clock(), UTC)
        for job_id in self.queue.get_job_ids():
            record = self.store.get(job_id)
            if record is None or record.request.deadline_at is None or record.request.deadline_at > now:
                continue
            if self.store.expire_if_queued(job_id, self.settings.job_ttl):
                metrics.record_finished(self.redis, self.model, "failed", ErrorCode.DEADLINE_EXCEEDED.value)
                self.queue.remove(job_id)
                report.expired.append(job_id)

    def _forget_rq_job(self, job_id: str) -> None:
        try:
            job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return
        StartedJobRegistry(self.queue.name, connection=self.redis).remove_executions(job)


class SweeperThread:
    """Runs ``Sweeper.sweep`` every ``sweep_interval`` seconds in the background; survives Redis outages."""

    def __init__(self, sweeper: Sweeper, interval: float) -> None:
        self.sweeper = sweeper
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="diffq-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweeper.sweep()
            except redis.exceptions.RedisError as error:
                log.warning("sweep failed: %s", error)
            except Exception:  # a bug in one sweep must not end recovery for good
                log.exception("sweep failed")
