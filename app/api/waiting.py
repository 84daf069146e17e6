"""Waiting for a job to end inside one HTTP request: what the synchronous APIs (A1111's ``/sdapi/v1``,
OpenAI's image generations, edits and variations) are built on, inside a wait admitted by
``app.api.waits.hold_wait``.

The wait follows the job's event stream (no polling of the record between events), re-reads
the record every few seconds in case RQ ended the job silently, and cancels the job if the
client hangs up: nobody would read its result.
"""

from __future__ import annotations

import logging
import time

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from redis.asyncio import Redis as AsyncRedis

from app.api.waits import WaitSlot
from app.contract import events, keys
from app.core.errors import DiffqError, JobNotFoundError
from app.core.jobs import JobService, JobView

log = logging.getLogger(__name__)

#: How often the wait re-reads the job even without events, and how long one blocking read lasts.
RECHECK_SECONDS = 5.0
POLL_SECONDS = 1.0


class WaitTimedOut(Exception):
    """The job had not ended when the wait's time was up; it goes on."""

    def __init__(self, view: JobView, timeout: float) -> None:
        super().__init__(f"job {view.record.id} still {view.status.value} after {timeout:g} s")
        self.view, self.timeout = view, timeout


async def until_ended(request: Request, jobs: JobService, view: JobView, timeout: float,
                      slot: WaitSlot | None = None) -> JobView | None:
    """The job once it has ended; ``None`` if the client hung up first (the job is then canceled).
    Raises ``WaitTimedOut``, or ``JobNotFoundError`` if the job was deleted meanwhile. The caller
    holds ``slot`` (``app.api.waits.hold_wait``): blocking reads go to the waits' own pool."""
    job_id = view.record.id
    aredis: AsyncRedis = request.app.state.aredis
    blocking: AsyncRedis = request.app.state.wait_redis
    deadline = time.monotonic() + timeout
    last = events.last_id_text(await aredis.xrevrange(keys.events(job_id), count=1))
    checked = time.monotonic()
    while not view.status.is_terminal:
        if slot is not None:
            await slot.renew()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimedOut(view, timeout)
        if await request.is_disconnected():
            log.info("client hung up while waiting; canceling job %s", job_id, extra={"job_id": job_id})
            try:
                await run_in_threadpool(jobs.cancel, job_id)
            except DiffqError:
                pass  # it ended meanwhile, or was deleted
            return None
        block_ms = max(1, int(min(remaining, POLL_SECONDS) * 1000))
        reply = await blocking.xread({keys.events(job_id): last}, block=block_ms)
        ended = False
        if reply:
            parsed = events.parse(reply[0][1])
            last = parsed[-1].id
            ended = any(event.is_terminal for event in parsed)
        if ended or time.monotonic() - checked >= RECHECK_SECONDS:
            checked = time.monotonic()
            view = await run_in_threadpool(jobs.get, job_id)  # JobNotFoundError: deleted while running
    return view


__all__ = ["JobNotFoundError", "WaitTimedOut", "until_ended"]
