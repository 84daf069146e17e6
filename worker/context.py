"""What the task needs from its worker process: the engine loaded once, Redis, the result store, settings.

RQ calls the task as a plain function with only the job id, so the worker
installs this context before it starts taking jobs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redis import Redis

from diffq.app.contract.metrics import Tally
from diffq.app.contract.records import ModelRecord
from diffq.app.contract.store import JobStore
from diffq.app.settings import Settings
from diffq.app.storage.base import ResultStore

if TYPE_CHECKING:
    from diffq.model.engine import Engine
    from diffq.worker.batching import Company
    from diffq.worker.heartbeat import Heartbeat
    from diffq.worker.marking import Marker
    from diffq.worker.models import ModelCache
    from diffq.worker.stops import StopListener


@dataclass
class Shutdown:
    """A graceful shutdown in progress: the running job may finish until ``deadline`` (monotonic)."""

    deadline: float | None = None
    handed_back: set[str] = field(default_factory=set)  # jobs given back to the queue, for RQ to re-enqueue

    def begin(self, grace: float) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + grace

    def overdue(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


@dataclass
class Batching:
    """Where the running job finds company: set by ``DiffqWorker`` around each job it executes
    (``None`` when batching is off or no RQ worker is running the job)."""

    company: Company | None = None


@dataclass(frozen=True)
class WorkerContext:
    """The long-lived state of one worker process.

    ``engine`` is the main model's; a multi-model worker finds every model's engine and record
    through ``engine_for`` and ``record_for`` (``models`` loads and evicts them).
    """

    worker_id: str
    engine: Engine
    settings: Settings
    redis: Redis
    store: JobStore
    heartbeat: Heartbeat
    results: ResultStore  # where images, journeys and inputs live (diffq.app.storage)
    shutdown: Shutdown = field(default_factory=Shutdown)
    batching: Batching = field(default_factory=Batching)
    marker: Marker = field(default_factory=lambda: _default_marker())
    models: ModelCache | None = None
    stops: StopListener | None = None  # cancels and deletes heard by pub/sub; None: read the record every step
    metrics: Tally | None = None  # ended jobs' counts until the heartbeat thread writes them; None: at once

    def engine_for(self, model: str) -> Engine:
        """The loaded engine of ``model`` (loading it now, and evicting another, if need be)."""
        if self.models is None or model not in self.heartbeat.records:
            return self.engine
        return self.models.get(model)

    def record_for(self, model: str) -> ModelRecord:
        """What the API was told about ``model`` (the main model's record for unknown names)."""
        return self.heartbeat.records.get(model, self.heartbeat.model)


def _default_marker() -> Marker:
    """The IPTC label only: what a context built without settings' marks gets (tests, embedding)."""
    from diffq.worker.marking import Marker

    return Marker()


_current: WorkerContext | None = None


def install(context: WorkerContext | None) -> None:
    """Make ``context`` the one the task sees (``None`` removes it)."""
    global _current
    _current = context


def current() -> WorkerContext:
    """The installed context; the task cannot run outside a diffq worker."""
    if _current is None:
        raise RuntimeError("diffq.worker.task.run_job runs only inside a diffq worker (no context installed)")
    return _current
