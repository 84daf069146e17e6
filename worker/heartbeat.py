"""Keeps this worker's registration alive from a background thread.

The thread renews the worker and model keys every ``interval`` seconds, also
while a long job holds the main thread, so the API sees the worker as live
exactly as long as the process is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import redis.exceptions

from diffq.app.contract.records import ModelRecord, WorkerRecord, utcnow
from diffq.app.contract.registry import Registry

log = logging.getLogger(__name__)


QUEUES_EVERY = 30
"""Beats between two writes of the models' queues to RQ's set of queues (the first beat writes
them): about a minute at the default interval."""


class Heartbeat:
    """Announce now, renew periodically, withdraw on stop."""

    def __init__(
        self,
        registry: Registry,
        worker: WorkerRecord,
        model: ModelRecord | Sequence[ModelRecord],
        interval: float,
        status: Callable[[], dict] | None = None,
        also: Callable[[], object] | None = None,
    ) -> None:
        self.registry = registry
        self.worker = worker
        models = [model] if isinstance(model, ModelRecord) else list(model)
        self.model = models[0]  # the main model
        #: Every model this worker serves, by name.
        self.records = {record.name: record for record in models}
        self._status = status  # fields of the worker record to refresh at each beat (loaded models)
        self._also = also  # run after each periodic beat (the metrics' flush); must not raise
        self.interval = interval
        self._beats = 0  # periodic beats so far: every QUEUES_EVERY-th also lists the queues in RQ's set
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="diffq-heartbeat", daemon=True)

    def start(self) -> None:
        """Register synchronously (so the caller knows it worked), then keep renewing."""
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and unregister, so the API stops routing to this worker at once."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self.registry.withdraw(self.worker.id, list(self.records))
        except redis.exceptions.RedisError as error:
            log.warning("could not unregister worker %s: %s", self.worker.id, error)

    def beat(self) -> None:
        """Renew the registration now."""
        with self._lock:
            update = self._status() if self._status is not None else {}
            self.worker = self.worker.model_copy(update={**update, "heartbeat_at": utcnow()})
            self.registry.announce(self.worker, list(self.records.values()), queues=self._beats % QUEUES_EVERY == 0)
            self._beats += 1

    @contextmanager
    def busy(self, job_id: str) -> Iterator[None]:
        """Show ``job_id`` as this worker's current job while the block runs: written at once; that
        it has ended is written by the next periodic beat (at most ``interval`` s later), so a
        worker going from job to job writes its record once a job, not twice."""
        self._set_current(job_id)
        try:
            yield
        finally:
            with self._lock:
                self.worker = self.worker.model_copy(update={"current_job": None})

    def _set_current(self, job_id: str) -> None:
        """The worker's record, now with ``job_id``; its models and its place in the set of
        workers are the periodic beat's (one command per change, not three)."""
        with self._lock:
            update = self._status() if self._status is not None else {}
            self.worker = self.worker.model_copy(update={**update, "current_job": job_id, "heartbeat_at": utcnow()})
            self.registry.renew_worker(self.worker)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except redis.exceptions.RedisError as error:  # keep trying: Redis may come back
                log.warning("heartbeat failed: %s", error)
            if self._also is not None:
                self._also()
