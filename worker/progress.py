"""What a running job tells the world between denoising steps, and how it learns to stop.

The engine calls ``ProgressReporter`` after every step (a batch of jobs calls
``report_step`` with every job's reporter). It

- checks the record: a cancel request stops the run within the step
  (``JobCanceledError``); a deleted, ended or re-attempted job stops it without
  storing anything (``JobAbandonedError``);
- writes progress with an ETA from the measured step times, at most once per
  ``interval`` seconds (and always the last step), and publishes it as an event;
  check, progress and event take one Redis round trip per step, for all the
  jobs of a batch together (``JobStore.step``);
- stores a preview of the clean-image estimate at most once per
  ``preview_interval`` seconds (the fitted latent projection by default, the
  VAE when configured), and publishes that too.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.exceptions

from app.contract import events
from app.contract.store import JobStore, RunCheck, WriteResult
from model.engine import StopGeneration

if TYPE_CHECKING:
    from model.engine import Engine

log = logging.getLogger(__name__)


class JobAbandonedError(StopGeneration):
    """The record is gone (deleted), ended, or owned by a newer attempt: stop without storing."""

    def __init__(self, job_id: str, result: WriteResult) -> None:
        super().__init__(f"job {job_id}: stopping, record {result.name.lower()}")
        self.result = result


class JobCanceledError(StopGeneration):
    """A client canceled the running job: end it ``canceled``, with no images."""


class JobHandBackError(StopGeneration):
    """The worker is shutting down and its grace period is over: give the job back to the queue."""


@dataclass(frozen=True)
class PreviewSettings:
    """How previews are made: "latent" (fitted projection), "vae" (full decode) or "off"."""

    decoder: str = "latent"
    interval: float = 0.5  # least seconds between two stored previews
    ttl: int = 86400
    size: tuple[int, int] = (64, 64)  # the output's width and height


_RUN_CHECK_TO_WRITE = {RunCheck.MISSING: WriteResult.MISSING, RunCheck.STALE: WriteResult.STALE,
                       RunCheck.ENDED: WriteResult.ENDED}


class ProgressReporter:
    """An engine ``on_step`` callback for one job (one attempt)."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        token: str,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        engine: Engine | None = None,
        previews: PreviewSettings | None = None,
        event_ttl: int = 86400,
        overdue: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.token = token
        self.interval = interval
        self.clock = clock
        self.engine = engine
        self.previews = previews if previews is not None else PreviewSettings(decoder="off")
        self.event_ttl = event_ttl
        self.overdue = overdue
        self.writes = 0
        self.previews_written = 0
        self._started = clock()
        self._last_write = -float("inf")
        self._last_preview = clock()  # the first preview after one interval: step 1 is mostly noise
        self._redis_down = False

    def __call__(
        self, step: int, total: int, latents_by_request: Any = None, denoised_by_request: Any = None
    ) -> None:
        stop = report_step([(self, denoised_by_request)], step, total)[0]
        if stop is not None:
            raise stop

    def _progress_due(self, step: int, total: int, now: float) -> dict[str, Any] | None:
        """The progress to write at this step, or None while throttled (the last step always is)."""
        if not (step == total or now - self._last_write >= self.interval):
            return None
        step_seconds = (now - self._started) / step
        return {"step": step, "total": total, "step_seconds": round(step_seconds, 4),
                "eta_seconds": round(step_seconds * (total - step), 2)}

    def _after_check(self, check: RunCheck, step: int, total: int, now: float, progress: dict[str, Any] | None,
                     denoised_by_request: Any) -> StopGeneration | None:
        """What the step's check (and progress write) means for this run; stores a preview when due."""
        if check is RunCheck.CANCEL:
            return JobCanceledError(f"job {self.job_id}: canceled at step {step} of {total}")
        if check is not RunCheck.GO_ON:
            return JobAbandonedError(self.job_id, _RUN_CHECK_TO_WRITE[check])
        if progress is not None:
            self._last_write = now
            self.writes += 1
        if (
            step < total
            and self.previews.decoder != "off"
            and self.engine is not None
            and denoised_by_request
            and now - self._last_preview >= self.previews.interval
        ):
            self._last_preview = now
            try:
                self._store_preview(step, total, denoised_by_request)
            except JobAbandonedError as stop:
                return stop
        return None

    def _redis_unreachable(self, step: int, error: Exception) -> None:
        # Redis is down: keep denoising; the result is stored once it is back (see runner).
        if not self._redis_down:
            log.warning("job %s: Redis unreachable at step %d, going on without progress: %s",
                        self.job_id, step, error)
        self._redis_down = True

    def _store_preview(self, step: int, total: int, denoised_by_request: Any) -> None:
        import hashlib

        assert self.engine is not None  # previews are due only with an engine
        denoised = next(iter(denoised_by_request.values()))[:1]  # image 0 of the job
        [image] = self.engine.preview_images(denoised, self.previews.size, self.previews.decoder)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)  # fast: previews are replaced within seconds
        png = buffer.getvalue()
        info = {"step": step, "total": total, "sha256": hashlib.sha256(png).hexdigest()}
        result = self.store.put_preview(self.job_id, self.token, png, info, self.previews.ttl)
        if result is not WriteResult.WRITTEN:
            raise JobAbandonedError(self.job_id, result)
        self.previews_written += 1
        events.publish(self.store.redis, self.job_id, "preview", {"step": step, "total": total}, self.event_ttl)


def report_step(
    runs: Sequence[tuple[ProgressReporter, Any]], step: int, total: int
) -> list[StopGeneration | None]:
    """One denoising step of one or more jobs that run together (a batch), each with its reporter
    and its ``denoised_by_request``: whether each may go on, in one Redis round trip for all of them
    (the cancel check, and the progress write with its event where one is due), then the previews
    that are due. Returns, per job, the exception that must stop it (``JobCanceledError``,
    ``JobAbandonedError``) or None. Raises ``JobHandBackError`` (the whole run goes back to the
    queue) once the worker's shutdown grace is over. While Redis is unreachable every job goes on."""
    for reporter, _ in runs:
        if reporter.overdue():
            raise JobHandBackError(f"job {reporter.job_id}: shutdown grace over at step {step} of {total}")
    store = runs[0][0].store
    moments = [reporter.clock() for reporter, _ in runs]
    progress = [reporter._progress_due(step, total, now) for (reporter, _), now in zip(runs, moments, strict=True)]
    try:
        checks = store.step([(reporter.job_id, reporter.token, due) for (reporter, _), due in
                             zip(runs, progress, strict=True)], runs[0][0].event_ttl)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        for reporter, _ in runs:
            reporter._redis_unreachable(step, error)
        return [None] * len(runs)
    stops: list[StopGeneration | None] = []
    for (reporter, denoised), check, now, due in zip(runs, checks, moments, progress, strict=True):
        try:
            stops.append(reporter._after_check(check, step, total, now, due, denoised))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            reporter._redis_unreachable(step, error)
            stops.append(None)
        else:
            reporter._redis_down = False
    return stops
