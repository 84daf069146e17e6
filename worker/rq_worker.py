"""diffq's RQ worker class: no fork, allow-listed jobs only."""

from __future__ import annotations

from rq.job import Job
from rq.queue import Queue
from rq.worker import SimpleWorker

from app.contract.tasks import enqueue_again
from worker import context
from worker.allowlist import AllowListedJob


class DiffqWorker(SimpleWorker):
    """Runs jobs in this process, where the model already sits in (GPU) memory.

    RQ's default ``Worker`` forks a child per job; CUDA does not survive a
    fork, and reloading the model per job would cost seconds. Every dequeued
    job is an ``AllowListedJob``, refused unless it is diffq's task.
    """

    job_class = AllowListedJob

    def request_stop(self, signum, frame) -> None:  # type: ignore[no-untyped-def]
        """SIGTERM/SIGINT: RQ's warm shutdown (finish the job, then exit), with a grace period:
        past ``shutdown_grace`` the running job stops at its next step and goes back to the queue."""
        current = context.current()
        current.shutdown.begin(current.settings.shutdown_grace)
        super().request_stop(signum, frame)

    def execute_job(self, job: Job, queue: Queue) -> None:
        super().execute_job(job, queue)
        handed_back = context.current().shutdown.handed_back
        if job.id in handed_back:
            # RQ has just recorded the run as finished; make it queued again for another worker.
            handed_back.discard(job.id)
            enqueue_again(queue, job.id)
