"""The single function a diffq worker will execute for an RQ job."""

from __future__ import annotations

from diffq.worker import context
from diffq.worker.runner import JobRunner


def run_job(job_id: str) -> None:
    """Run the diffq job ``job_id``: its request is read from the job record, not from RQ.

    Referenced by path as ``diffq.app.contract.tasks.TASK``; the worker refuses any
    RQ job naming another function or carrying other arguments.
    """
    JobRunner(context.current()).run(job_id)
