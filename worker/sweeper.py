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
- a job a worker took off the queue list but never claimed (it died between RQ's ``BLMOVE``
  into ``<queue>:intermediate`` and diffq's claim: in that list, or marked started in RQ only)
  goes back to the front of the queue list once it has been seen so, still unclaimed, for
  ``heartbeat_ttl`` seconds (a live worker claims within milliseconds). It never ran: no
  attempt is counted;
- a queued job past its ``deadline_at`` ends ``failed`` with ``deadline_exceeded``.

Each of these changes is one guarded script (``diffq.app.contract.store``) that writes the job's
event with it; RQ's own records are tidied afterwards, and are never what a client reads.
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

from diffq.app.contract import keys, metrics
from diffq.app.contract.records import ErrorCode
from diffq.app.contract.registry import Registry
from diffq.app.contract.rq_adapter import taken_ids
from diffq.app.contract.status import JobStatus
from diffq.app.contract.store import JobStore, WriteResult
from diffq.app.contract.tasks import end_lost, intermediate_key, mark_requeued, model_queue
from diffq.app.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    """What one sweep did (job ids)."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    rescued: list[str] = field(default_factory=list)  # taken off the queue, never claimed


class Sweeper:
    """Sweeps the jobs of one model."""

    def __init__(
        self, redis: Redis, settings: Settings, model: str, owner: str, clock: Callable[[], float] = time.time
    ) -> None:
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
        running = self._lost_jobs(report)
        self._unclaimed_jobs(report, running)
        self._passed_deadlines(report)
        return report

    def _lost_jobs(self, report: SweepReport) -> set[str]:
        """Recover the running jobs whose worker is gone. Returns the ids in the running index.
        (A job claimed less than ``heartbeat_ttl`` s ago is not looked at: its worker's first
        heartbeat may still be on the way; so a sweep while only short jobs run reads no record.)"""
        running = self.store.running()
        now = self.clock()
        live: set[str] | None = None
        for job_id, claimed_at in running:
            if now - claimed_at < self.settings.heartbeat_ttl:
                continue
            record = self.store.get(job_id)
            if record is None or record.status is not JobStatus.RUNNING:
                self.redis.zrem(keys.RUNNING, job_id)  # ended or deleted without the index noticing
                continue
            if live is None:
                live = {worker.id for worker in self.registry.live_workers()}
            if record.model != self.model or record.worker in live:
                continue
            self._recover(record.id, record.attempt_token, record.worker, record.attempt, report)
        return {job_id for job_id, _ in running}

    def _recover(self, job_id: str, token: str | None, worker: str | None, attempt: int, report: SweepReport) -> None:
        message = (
            f"its worker was lost {self.settings.max_attempts} times (last: {worker}); giving up after "
            f"{self.settings.max_attempts} lost attempts"
        )
        result, lost, failed = self.store.requeue(
            job_id,
            token,
            self.queue.key,
            lost=True,
            reason="worker_lost",
            max_attempts=self.settings.max_attempts,
            lost_message=message,
        )
        if result is not WriteResult.WRITTEN:
            return
        if failed:
            end_lost(self.queue, job_id, self.settings.job_ttl, f"diffq: {message}")
            metrics.record_finished(self.redis, self.model, "failed", ErrorCode.WORKER_LOST.value)
            report.failed.append(job_id)
            log.warning("job %s: %s", job_id, message)
            return
        mark_requeued(self.queue, job_id)
        report.requeued.append(job_id)
        log.warning("job %s: worker %s was lost; queued again (lost attempts: %d)", job_id, worker, lost)

    def _unclaimed_jobs(self, report: SweepReport, running: set[str]) -> None:
        """Jobs taken off the queue list (RQ's intermediate list, or started in RQ) whose record is
        still queued and unclaimed: seen so for ``heartbeat_ttl`` s, their worker is gone. (A job
        in the running index was claimed, and is the lost-job check's.)"""
        seen_key = keys.sweeper_unclaimed(self.model)
        intermediate = intermediate_key(self.queue)
        taken = [job_id for job_id in taken_ids(self.queue) if job_id not in running]
        if not taken:
            self.redis.delete(seen_key)  # none now: whatever was seen before is gone
            return
        waiting = set(self.queue.get_job_ids())
        candidates = [job_id for job_id in taken if job_id not in waiting and self._unclaimed(job_id)]
        seen = {k.decode(): float(v) for k, v in self.redis.hgetall(seen_key).items()}
        now = self.clock()
        with self.redis.pipeline(transaction=False) as pipe:
            gone = [job_id for job_id in seen if job_id not in candidates]
            if gone:
                pipe.hdel(seen_key, *gone)
            new = {job_id: now for job_id in candidates if job_id not in seen}
            if new:
                pipe.hset(seen_key, mapping=new)
            pipe.expire(seen_key, max(60, self.settings.heartbeat_ttl * 3))
            pipe.execute()
        for job_id in candidates:
            if job_id in seen and now - seen[job_id] >= self.settings.heartbeat_ttl:
                if self.store.rescue(job_id, intermediate, self.queue.key):
                    mark_requeued(self.queue, job_id)
                    report.rescued.append(job_id)
                    log.warning("job %s: taken off the queue by a worker that never claimed it; queued again", job_id)
                self.redis.hdel(seen_key, job_id)

    def _unclaimed(self, job_id: str) -> bool:
        record = self.store.get(job_id)
        return record is not None and record.status is JobStatus.QUEUED and record.attempt_token is None

    def _passed_deadlines(self, report: SweepReport) -> None:
        """End the queued jobs whose deadline has passed. Only those are read: the model's deadline
        index (``keys.deadlines``, written with each job that has a deadline) gives them in one
        command, however many jobs are queued. An entry goes once its job has ended or is gone; a
        running one stays (it may be queued again), and is read again at each sweep until then."""
        index = keys.deadlines(self.model)
        stamp = self.clock()
        due = [raw.decode() for raw in self.redis.zrangebyscore(index, "-inf", stamp)]
        now = datetime.fromtimestamp(stamp, UTC)
        done = []
        for job_id in due:
            record = self.store.get(job_id)
            if record is None or record.status.is_terminal:
                done.append(job_id)
                continue
            deadline = record.request.deadline_at
            if record.status is not JobStatus.QUEUED or deadline is None or deadline > now:
                continue  # running (it may be queued again), or the record's deadline is later than the index's
            if self.store.expire_if_queued(job_id, self.settings.job_ttl):
                metrics.record_finished(self.redis, self.model, "failed", ErrorCode.DEADLINE_EXCEEDED.value)
                self.queue.remove(job_id)
                report.expired.append(job_id)
                done.append(job_id)
        if done:
            self.redis.zrem(index, *done)


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
