"""Pacing of plain job reads, so clients that poll in tight loops cannot starve a shared host.

Clients in the wild poll ``GET /v1/jobs/{id}`` in loops of a few milliseconds. Each answer costs
the API process CPU time that a worker on the same host needs, and long polls (``?wait=``) or
event streams already tell a client the moment a job changes. So each API process answers plain
reads of one job at most every ``DIFFQ_POLL_INTERVAL`` seconds after a burst of
``DIFFQ_POLL_BURST`` (a token bucket per job id): a read that comes sooner is *held*, on the event
loop with no thread and no Redis connection, until its turn, and answered then with the job as it
is. A client that waits for each answer before polling again (nearly all of them) is slowed to the
interval without an error; only reads that would wait more than ``MAX_HOLD_SECONDS`` (many
concurrent reads of one job) get ``429 polling_too_fast`` with ``Retry-After``. Holding rather than
refusing is the point: a refused poller comes straight back, a held one does not.

Per job rather than per key: one key may rightly poll many jobs, and what a tight loop costs is
per request. Per process: the CPU to protect is the host's own, and a read answered by another
API process costs that host's CPU. Every answer about a job that is not done carries
``Retry-After: 1`` (``POLL_HINT_SECONDS``), the pace a client should keep.
"""

from __future__ import annotations

import time

#: Longest a read is held before it is refused instead.
MAX_HOLD_SECONDS = 2.0
#: Jobs tracked at once per process; beyond it, jobs with a full bucket are forgotten.
MAX_TRACKED = 50_000


class PollPacer:
    """A token bucket per job id: ``burst`` reads at once, then one per ``interval`` seconds."""

    def __init__(self, interval: float, burst: int) -> None:
        self.interval = interval
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # job id -> (tokens, monotonic time)

    def reserve(self, job_id: str) -> float | None:
        """Seconds to hold this read before answering it (0: at once), its turn taken; ``None``:
        its turn is more than ``MAX_HOLD_SECONDS`` away, refuse it (nothing taken)."""
        if self.interval <= 0:
            return 0.0
        now = time.monotonic()
        tokens, then = self._buckets.get(job_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) / self.interval)
        wait = max(0.0, (1 - tokens) * self.interval)
        if wait > MAX_HOLD_SECONDS:
            return None
        if len(self._buckets) >= MAX_TRACKED:
            self._forget_idle(now)
        self._buckets[job_id] = (tokens - 1, now)
        return wait

    def retry_after(self, job_id: str) -> int:
        """Whole seconds until a read of ``job_id`` would be held no longer than ``MAX_HOLD_SECONDS``."""
        tokens, then = self._buckets.get(job_id, (float(self.burst), time.monotonic()))
        tokens += (time.monotonic() - then) / self.interval
        return max(1, int((1 - tokens) * self.interval - MAX_HOLD_SECONDS + 0.999))

    def _forget_idle(self, now: float) -> None:
        idle = [
            job_id
            for job_id, (tokens, then) in self._buckets.items()
            if tokens + (now - then) / self.interval >= self.burst
        ]
        for job_id in idle:
            del self._buckets[job_id]
        if len(self._buckets) >= MAX_TRACKED:  # all busy: start again rather than grow
            self._buckets.clear()
