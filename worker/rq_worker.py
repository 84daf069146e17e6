"""diffq's RQ worker class: no fork, allow-listed jobs only, compatible queued jobs batched."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

import redis.exceptions

from diffq.app.contract import keys
from diffq.app.contract.rq_adapter import (
    QUEUE_PREFIX,
    Job,
    Queue,
    SimpleWorker,
    StopRequested,
    WorkerStatus,
    begin_execution,
    end_execution,
    end_success,
    failure_text,
    intermediate_key,
    is_suspended,
    mark_requeued,
    set_dequeue_order,
    worker_key_renewed,
    write_counts,
)
from diffq.app.contract.status import JobStatus
from diffq.app.contract.store import WriteResult
from diffq.worker import context, faults
from diffq.worker.allowlist import AllowListedJob
from diffq.worker.batching import Company, Taken, engine_batch_key
from diffq.worker.models import QueueChooser

log = logging.getLogger(__name__)

RESUME_MAX_PAUSE = 5.0
"""Longest pause between two tries to reach Redis before the work loop resumes."""
RESUME_RESET = 60.0
"""A work loop that ran this long before it ended starts its backoff afresh."""
RQ_HEARTBEAT_EVERY = 60.0
"""Seconds between renewals of RQ's worker key (it lives ``worker_ttl + 60`` s, 480 by default): RQ
renews it several times per job. diffq's own liveness is its heartbeat thread's (``heartbeat.py``)."""
SUSPENSION_CHECK_EVERY = 5.0
"""Seconds between two reads of ``rq suspend``'s flag (RQ reads it before every dequeue): a
suspension stops this worker's dequeues within that long."""


class DiffqWorker(SimpleWorker):
    """Runs jobs in this process, where the model already sits in (GPU) memory.

    RQ's default ``Worker`` forks a child per job; CUDA does not survive a
    fork, and reloading the model per job would cost seconds. Every dequeued
    job is an ``AllowListedJob``, refused unless it is diffq's task.

    Batching (``batch_max`` > 1): the job RQ dequeued runs through RQ's usual
    lifecycle, and while it runs the task takes compatible queued jobs along
    (``diffq.worker.batching.Company``). Once it has ended, each job taken along is
    ended in RQ by RQ's own success handling, as if RQ had run it.

    Several models (``chooser`` set): before each dequeue the queues are put in the chooser's
    order (loaded models first, a queue passed over too often before them; see
    ``diffq.worker.models``), and the job's model is made the loaded one before it runs.
    """

    job_class = AllowListedJob
    _running: tuple[str, Queue] | None = None  # the job being executed, and its queue
    _task_error: type[BaseException] | None = None  # what the task of that job raised, if it did
    chooser: QueueChooser | None = None

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        if self.chooser is None:
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        by_model = {queue.name.removeprefix(QUEUE_PREFIX): queue for queue in self.queues}
        with self.connection.pipeline(transaction=False) as pipe:
            for queue in by_model.values():
                pipe.llen(queue.key)
            waiting = dict(zip(by_model, (bool(n) for n in pipe.execute()), strict=True))
        models = context.current().models
        loaded = models.loaded if models is not None else []
        set_dequeue_order(self, [by_model[name] for name in self.chooser.order(loaded, waiting)])
        result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        if result is not None:
            self.chooser.took(result[1].name.removeprefix(QUEUE_PREFIX))
        return result

    # -- RQ's bookkeeping, leaner (diffq.app.contract.rq_adapter: begin_execution, end_success) --

    def heartbeat(self, timeout=None, pipeline=None):
        """RQ's worker heartbeat, at most every ``RQ_HEARTBEAT_EVERY`` s when RQ renews it on its
        own schedule (before and after every dequeue, after every job, in every suspension check),
        with the job counters ``end_success`` holds."""
        if timeout is None and pipeline is None:
            if self.last_heartbeat is not None:
                if (datetime.now(UTC) - self.last_heartbeat).total_seconds() < RQ_HEARTBEAT_EVERY:
                    return
            with self.connection.pipeline(transaction=False) as pipe:
                super().heartbeat(None, pipe)
                write_counts(self, pipe)  # the jobs ended since the last beat, for RQ's worker counters
                pipe.execute()
            worker_key_renewed(self, self.worker_ttl + 60)
            return
        super().heartbeat(timeout, pipeline)
        worker_key_renewed(self, timeout or self.worker_ttl + 60)

    def register_death(self) -> None:
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                write_counts(self, pipe)
                pipe.execute()
        except redis.exceptions.RedisError as error:
            log.warning("worker %s: could not write its job counters: %s", self.name, error)
        super().register_death()

    def set_state(self, state, pipeline=None):
        """RQ's worker state, written only when it changes (RQ writes ``idle`` after every job and
        again before every dequeue)."""
        if pipeline is None and state == self._state:
            return
        super().set_state(state, pipeline)

    _suspension_read = -SUSPENSION_CHECK_EVERY  # monotonic time of the last read of the flag

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's suspension check, reading the flag (one EXISTS, no heartbeat with it) at most every
        ``SUSPENSION_CHECK_EVERY`` s; once suspended, RQ's own check, which waits for the resume."""
        if time.monotonic() - self._suspension_read < SUSPENSION_CHECK_EVERY:
            return
        self._suspension_read = time.monotonic()
        if is_suspended(self.connection):
            super().check_for_suspension(burst)

    def prepare_execution(self, job: Job):
        return begin_execution(self, job, remove_from_intermediate=len(self.queues) == 1)

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        """Done by ``prepare_execution``, in the same round trip."""

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        """The job's end time and last heartbeat, written with its status by the handler that follows."""
        job.ended_at = job.last_heartbeat = datetime.now(UTC)

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry=None) -> None:
        end_success(self, job)

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry=None, exc_string: str = "") -> None:
        if job.last_heartbeat is not None:
            job.heartbeat(job.last_heartbeat, 0)  # what handle_execution_ended leaves to the handler
        super().handle_job_failure(job, queue, started_job_registry, exc_string)

    def request_stop(self, signum, frame) -> None:
        """SIGTERM/SIGINT: RQ's warm shutdown (finish the job, then exit), with a grace period:
        past ``shutdown_grace`` the running job stops at its next step and goes back to the queue."""
        current = context.current()
        current.shutdown.begin(current.settings.shutdown_grace)
        super().request_stop(signum, frame)

    def serve(self, *, burst: bool = False, logging_level: str = "INFO") -> bool:
        """RQ's work loop, resumed after whatever ended it other than a stop: RQ quits its loop on
        errors raised outside the task (a Redis restart during a dequeue, a registry write, the
        bookkeeping after a job), and this process must ride out any Redis outage however timed.
        Before resuming, once Redis answers, jobs this worker holds are handed back (``_recover``).
        Returns whether any job was taken."""
        current = context.current()
        worked, failures = False, 0
        while True:
            started = time.monotonic()
            try:
                worked = self.work(burst=burst, logging_level=logging_level) or worked
            except StopRequested:
                return worked
            except (redis.exceptions.RedisError, ValueError) as error:  # ValueError: a stale RQ registration
                log.warning("worker %s: work loop ended by %s: %s", self.name, type(error).__name__, error)
            if burst or current.shutdown.deadline is not None:
                return worked
            failures = 1 if time.monotonic() - started > RESUME_RESET else failures + 1
            try:
                self._recover(min(RESUME_MAX_PAUSE, 0.25 * 2**failures))
            except StopRequested:
                return worked
            if current.shutdown.deadline is not None:
                return worked
            log.info("worker %s: resuming its work loop", self.name)

    def _recover(self, pause: float) -> None:
        """Wait ``pause``, then until Redis answers; then register this worker's death in RQ (so it
        can register again), and hand back the job it was running, if any: put back on the
        queue if it was never claimed, or (a lost attempt) if it was."""
        current = context.current()
        while True:
            time.sleep(pause)
            if current.shutdown.deadline is not None:
                return
            try:
                self.connection.ping()
                self.register_death()
                if self._running is not None:
                    self._hand_back_after_error(*self._running)
                    self._running = None
                return
            except redis.exceptions.RedisError as error:
                log.warning("worker %s: Redis still unreachable (%s)", self.name, error)
                pause = RESUME_MAX_PAUSE

    def _hand_back_after_error(self, job_id: str, queue: Queue) -> None:
        current = context.current()
        if current.store.rescue(job_id, intermediate_key(queue), queue.key):
            log.warning("job %s: never claimed before the error; back at the front of the queue", job_id)
        else:
            record = current.store.get(job_id)
            if record is None or record.status is not JobStatus.RUNNING or record.worker != current.worker_id:
                return
            limit = current.settings.max_attempts
            message = f"its run was lost {limit} times (last on {current.worker_id}, to an error); giving up"
            result, _, failed = current.store.requeue(
                job_id,
                record.attempt_token,
                queue.key,
                lost=True,
                reason="worker_error",
                max_attempts=limit,
                lost_message=message,
            )
            if result is not WriteResult.WRITTEN:
                return
            log.warning("job %s: its run ended by an error; %s", job_id, "failed" if failed else "queued again")
        mark_requeued(queue, job_id)

    def handle_exception(self, job: Job, *exc_info) -> None:
        self._task_error = exc_info[0] if exc_info else None
        super().handle_exception(job, *exc_info)

    def execute_job(self, job: Job, queue: Queue) -> None:
        current = context.current()
        self._running, self._task_error = (job.id, queue), None
        faults.at("taken")
        engine = current.engine_for(queue.name.removeprefix(QUEUE_PREFIX))  # loads it if evicted
        company = None
        if current.settings.batch_max > 1:
            company = Company(self, queue, current.store, current.worker_id, engine_batch_key(engine))
        current.batching.company = company
        try:
            # SimpleWorker.execute_job, keeping perform_job's verdict for the jobs taken along.
            self.prepare_execution(job)
            succeeded = self.perform_job(job, queue)
            self.set_state(WorkerStatus.IDLE)
        finally:
            current.batching.company = None
        taken = company.taken if company is not None else []
        if not succeeded and self._task_error is not None and issubclass(self._task_error, redis.exceptions.RedisError):
            # Redis failed under the claim, or under the hand-back: the job must not stay queued
            # in no queue, or running on no one. (Any other error has failed it in its record.)
            self._hand_back_after_error(job.id, queue)
        failure = None if succeeded else self._failure_of(job)
        for extra in taken:
            self._end_taken(extra, queue, failure)
        handed_back = current.shutdown.handed_back
        for job_id in [job.id, *(extra.record.id for extra in taken)]:
            if job_id in handed_back:
                # Back on the list already (JobStore.requeue); RQ has just recorded the run as
                # finished: call it queued again, unless another worker has taken it since.
                handed_back.discard(job_id)
                record = current.store.get(job_id)
                if record is not None and record.status is JobStatus.QUEUED:
                    mark_requeued(queue, job_id)
        self._running = None

    def _end_taken(self, taken: Taken, queue: Queue, failure: str | None) -> None:
        """End a job taken along in RQ: perform_job's success path (or its failure path, when the
        lead's run failed before this job got a result), with the job's own execution."""
        job = taken.rq_job
        if failure is not None and self._has_ended(taken.record.id):
            failure = None  # its result (or its failure) is stored: RQ has nothing to add
        try:
            end_execution(self, job, queue, taken.execution, failure)
        except redis.exceptions.RedisError as error:  # the record holds the truth; RQ's view is secondary
            log.warning("job %s: could not end it in RQ: %s", job.id, error)

    def _has_ended(self, job_id: str) -> bool:
        raw = self.connection.hget(keys.job(job_id), "status")
        return raw is None or JobStatus(json.loads(raw)).is_terminal

    def _failure_of(self, lead: Job) -> str:
        """What RQ recorded of the lead's failure, for the jobs that ran with it."""
        detail = failure_text(lead)
        return f"ran in the batch of job {lead.id}, whose run failed:\n{detail or 'unknown failure'}"
