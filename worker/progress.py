"""Reports denoising progress to the job record, throttled, and stops runs nobody wants any more."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from app.contract.store import JobStore, WriteResult
from model.engine import StopGeneration


class JobAbandonedError(StopGeneration):
    """The record is gone (deleted), ended, or owned by a newer attempt: stop without storing."""

    def __init__(self, job_id: str, result: WriteResult) -> None:
        super().__init__(f"job {job_id}: stopping, record {result.name.lower()}")
        self.result = result


class ProgressReporter:
    """An engine ``on_step`` callback for one job.

    Writes at most one progress update per ``interval`` seconds (the last step
    always), so a fast model does not flood Redis. Every write is guarded by
    the job's attempt token; when the guard refuses, the run is stopped by
    raising ``JobAbandonedError`` from inside the denoising loop.
    """

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        token: str,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.token = token
        self.interval = interval
        self.clock = clock
        self.writes = 0
        self._last_write = -float("inf")

    def __call__(self, step: int, total: int, latents_by_request: Any = None) -> None:
        now = self.clock()
        if step < total and now - self._last_write < self.interval:
            return
        self._last_write = now
        self.writes += 1
        result = self.store.update(self.job_id, self.token, {"progress": {"step": step, "total": total}})
        if result is not WriteResult.WRITTEN:
            raise JobAbandonedError(self.job_id, result)
