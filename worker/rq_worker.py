"""diffq's RQ worker class: no fork, allow-listed jobs only."""

from __future__ import annotations

from rq.worker import SimpleWorker

from worker.allowlist import AllowListedJob


class DiffqWorker(SimpleWorker):
    """Runs jobs in this process, where the model already sits in (GPU) memory.

    RQ's default ``Worker`` forks a child per job; CUDA does not survive a
    fork, and reloading the model per job would cost seconds. Every dequeued
    job is an ``AllowListedJob``, refused unless it is diffq's task.
    """

    job_class = AllowListedJob
