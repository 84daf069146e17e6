"""What a running job tells the world between denoising steps, and how it learns to stop.

The engine calls ``ProgressReporter`` after every step (a batch of jobs calls
``report_step`` with every job's reporter). It

- writes progress with an ETA from the measured step times, at most once per
  ``interval`` seconds (the first one interval after the run starts: its ``running`` event
  says it began), and publishes it as an event; the last step's progress goes with the
  job's end (``final_progress``, written by the finish script), not in a write of its own;
- stores a preview of the clean-image estimate at most once per
  ``preview_interval`` seconds, with a progress write (the fitted latent
  projection by default, the VAE when configured), and publishes that too;
- checks the record with every such write, and at any step where the worker's
  stop listener (``diffq.worker.stops``) heard that the job was canceled or deleted,
  or is not subscribed: a cancel request stops the run within the step
  (``JobCanceledError``); a deleted, ended or re-attempted job stops it without
  storing anything (``JobAbandonedError``).

Checks and writes take one Redis round trip at the steps that have any, for all
the jobs of a batch together (``JobStore.step``), and none at the other steps.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.exceptions

from diffq.app.contract.store import JobStore, PreviewWrite, RunCheck, WriteResult
from diffq.model.engine import StopGeneration

if TYPE_CHECKING:
    from diffq.model.engine import Engine
    from diffq.worker.stops import StopListener

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


_RUN_CHECK_TO_WRITE = {
    RunCheck.MISSING: WriteResult.MISSING,
    RunCheck.STALE: WriteResult.STALE,
    RunCheck.ENDED: WriteResult.ENDED,
}


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
        overdue: Callable[[], bool] = lambda: False,
        stops: StopListener | None = None,
        seen: int = -1,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.token = token
        self.interval = interval
        self.clock = clock
        self.engine = engine
        self.previews = previews if previews is not None else PreviewSettings(decoder="off")
        self.overdue = overdue
        self.stops = stops
        # The stop listener's generation at the last read of the record: ``seen``, when the claim
        # read it (-1: no read yet, or no listener then), so the first step reads it only if the
        # listener has subscribed again since (it may have missed a cancel) or heard one.
        self._generation = seen
        self.writes = 0
        self.previews_written = 0
        self._started = clock()
        self._last_write = self._started  # the first write after one interval, as previews
        self._last_step: tuple[int, int, float] | None = None  # the last step seen: step, total, when
        self._last_preview = self._started  # the first preview after one interval: step 1 is mostly noise
        self._redis_down = False

    def __call__(self, step: int, total: int, latents_by_request: Any = None, denoised_by_request: Any = None) -> None:
        stop = report_step([(self, denoised_by_request)], step, total)[0]
        if stop is not None:
            raise stop

    def _progress_due(self, step: int, total: int, now: float) -> dict[str, Any] | None:
        """The progress to write at this step, or None while throttled."""
        self._last_step = (step, total, now)
        if now - self._last_write < self.interval:
            return None
        return self._progress(step, total, now)

    def _progress(self, step: int, total: int, now: float) -> dict[str, Any]:
        step_seconds = (now - self._started) / step
        return {
            "step": step,
            "total": total,
            "step_seconds": round(step_seconds, 4),
            "eta_seconds": round(step_seconds * (total - step), 2),
        }

    def final_progress(self) -> dict[str, Any] | None:
        """The progress at the last step the run reached, for the job's end to store with its result
        (a step's own write would be followed within milliseconds by the end's); None before any step."""
        if self._last_step is None:
            return None
        return self._progress(*self._last_step)

    def _after_check(
        self,
        check: RunCheck,
        step: int,
        total: int,
        now: float,
        progress: dict[str, Any] | None,
        preview: PreviewWrite | None,
    ) -> StopGeneration | None:
        """What the step's check (and the writes that came with it) means for this run."""
        if check is RunCheck.CANCEL:
            return JobCanceledError(f"job {self.job_id}: canceled at step {step} of {total}")
        if check is not RunCheck.GO_ON:
            return JobAbandonedError(self.job_id, _RUN_CHECK_TO_WRITE[check])
        if progress is not None:
            self._last_write = now
            self.writes += 1
        if preview is not None:
            self.previews_written += 1
        return None

    def _must_look(self) -> bool:
        """Whether this step reads the record although nothing is due: always without a stop
        listener or while it is not subscribed; else when this job's stop was heard, or the
        listener has (re)subscribed since the last read (it may have missed one)."""
        stops = self.stops
        if stops is None or not stops.live:
            return True
        heard = stops.heard(self.job_id)
        return heard or stops.generation != self._generation

    def _redis_unreachable(self, step: int, error: Exception) -> None:
        # Redis is down: keep denoising; the result is stored once it is back (see runner).
        if not self._redis_down:
            log.warning("job %s: Redis unreachable at step %d, going on without progress: %s", self.job_id, step, error)
        self._redis_down = True

    def _preview_due(self, step: int, total: int, now: float, denoised_by_request: Any) -> PreviewWrite | None:
        """The preview to store at this step (rendered now), or None while throttled or off."""
        if not (
            step < total
            and self.previews.decoder != "off"
            and self.engine is not None
            and denoised_by_request
            and now - self._last_preview >= self.previews.interval
        ):
            return None
        self._last_preview = now
        denoised = next(iter(denoised_by_request.values()))[:1]  # image 0 of the job
        [image] = self.engine.preview_images(denoised, self.previews.size, self.previews.decoder)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)  # fast: previews are replaced within seconds
        png = buffer.getvalue()
        info = {"step": step, "total": total, "sha256": hashlib.sha256(png).hexdigest()}
        return PreviewWrite(png, info, self.previews.ttl)


def report_step(runs: Sequence[tuple[ProgressReporter, Any]], step: int, total: int) -> list[StopGeneration | None]:
    """One denoising step of one or more jobs that run together (a batch), each with its reporter
    and its ``denoised_by_request``: whether each may go on. The jobs that have a progress or
    preview write due, or must read their record (``ProgressReporter._must_look``), are checked
    and written in one Redis round trip for all of them (``JobStore.step``); the others go on
    without one. Returns, per job, the exception that must stop it (``JobCanceledError``,
    ``JobAbandonedError``) or None. Raises ``JobHandBackError`` (the whole run goes back to the
    queue) once the worker's shutdown grace is over. While Redis is unreachable every job goes on."""
    for reporter, _ in runs:
        if reporter.overdue():
            raise JobHandBackError(f"job {reporter.job_id}: shutdown grace over at step {step} of {total}")
    store = runs[0][0].store
    moments = [reporter.clock() for reporter, _ in runs]
    progress = [reporter._progress_due(step, total, now) for (reporter, _), now in zip(runs, moments, strict=True)]
    # A preview goes with a progress write (one script call, one read of the record, for both).
    previews = [
        reporter._preview_due(step, total, now, denoised) if due is not None else None
        for (reporter, denoised), now, due in zip(runs, moments, progress, strict=True)
    ]
    looks = [reporter._must_look() for reporter, _ in runs]
    pending = [index for index in range(len(runs)) if progress[index] or previews[index] or looks[index]]
    stops: list[StopGeneration | None] = [None] * len(runs)
    if not pending:
        return stops
    listeners = [runs[index][0].stops for index in pending]
    generations = [listener.generation if listener is not None else 0 for listener in listeners]
    try:
        checks = store.step(
            [(runs[index][0].job_id, runs[index][0].token, progress[index], previews[index]) for index in pending]
        )
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        for reporter, _ in runs:
            reporter._redis_unreachable(step, error)
        return stops
    for index, check, generation in zip(pending, checks, generations, strict=True):
        reporter = runs[index][0]
        reporter._redis_down = False
        reporter._generation = generation
        stops[index] = reporter._after_check(check, step, total, moments[index], progress[index], previews[index])
    return stops
