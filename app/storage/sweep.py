"""Removes objects of the result store that no live job refers to.

An object is kept while its job's record refers to it, or while it may still become
referred to: younger than ``store_sweep_grace`` (an upload of a job being submitted or
finishing), or written by the attempt that owns a job still running. Everything else goes:
objects of expired and deleted jobs, a stale attempt's upload, a worker's upload cut short
by its death, and a write cut short in the ``file`` store's temporary folder. Workers run
it every ``store_sweep_interval`` seconds, one at a time (a Redis lock); the ``redis``
backend needs none (its objects expire with their job).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from redis import Redis

from diffq.app.contract import keys
from diffq.app.contract.records import JobRecord
from diffq.app.settings import Settings
from diffq.app.storage import objects
from diffq.app.storage.base import ListedObject, ResultStore

log = logging.getLogger(__name__)

#: Listed names that are the stores' own leftovers, not objects: cut-short file writes, S3 probes.
LEFTOVER_PREFIXES = (".tmp/", ".diffq-probe-")


@dataclass
class StoreSweepReport:
    removed: list[str] = field(default_factory=list)
    kept: int = 0


class StoreSweeper:
    def __init__(
        self, redis: Redis, store: ResultStore, settings: Settings, clock: Callable[[], float] = time.time
    ) -> None:
        self.redis = redis
        self.store = store
        self.grace = settings.store_sweep_grace
        self.lock_seconds = max(1, int(settings.store_sweep_interval))
        self.clock = clock

    def sweep(self, locked: bool = True) -> StoreSweepReport:
        """One pass over the store; ``locked``: skip it while another worker's pass holds the lock."""
        report = StoreSweepReport()
        if self.store.name == "redis":
            return report
        if locked and not self.redis.set(keys.STORE_SWEEPER, "1", nx=True, ex=self.lock_seconds):
            return report
        by_job: dict[str, list[ListedObject]] = defaultdict(list)
        now = self.clock()
        for listed in self.store.list():
            if objects.is_valid(listed.key):
                by_job[objects.job_of(listed.key)].append(listed)
            elif listed.key.startswith(LEFTOVER_PREFIXES) and now - listed.modified >= self.grace:
                self._remove_leftover(listed.key)
                report.removed.append(listed.key)
        ids = list(by_job)
        for start in range(0, len(ids), 200):
            chunk = ids[start : start + 200]
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in chunk:
                    pipe.hgetall(keys.job(job_id))
                found = pipe.execute()
            for job_id, fields in zip(chunk, found, strict=True):
                record = JobRecord.from_hash(fields) if fields else None
                doomed = [o.key for o in by_job[job_id] if not _keep(o, record, now, self.grace)]
                report.kept += len(by_job[job_id]) - len(doomed)
                if doomed:
                    self.store.delete(doomed)
                    report.removed.extend(doomed)
        if report.removed:
            log.info("store sweep removed %d unreferenced object(s), kept %d", len(report.removed), report.kept)
        return report

    def _remove_leftover(self, key: str) -> None:
        remove = getattr(self.store, "remove_listed", None)  # the file store's temporary files
        if remove is not None:
            remove(key)
        else:
            self.store.delete([key])


def referenced(record: JobRecord) -> set[str]:
    """Every object key a job record refers to."""
    found = {key for image in record.images for key in (image.key, image.journey_key) if key is not None}
    for name in ("image", "mask"):
        source = getattr(record.request, name)
        if source is not None and source.key is not None:
            found.add(source.key)
    return found


def _keep(listed: ListedObject, record: JobRecord | None, now: float, grace: float) -> bool:
    if now - listed.modified < grace:
        return True
    if record is None:
        return False
    if listed.key in referenced(record):
        return True
    # The running attempt's own upload, not yet referenced: its finish script may still accept it.
    return not record.status.is_terminal and objects.attempt_of(listed.key) == record.attempt_token


class StoreSweeperThread:
    """Runs ``StoreSweeper.sweep`` every ``interval`` seconds in the background; survives outages."""

    def __init__(self, sweeper: StoreSweeper, interval: float) -> None:
        self.sweeper = sweeper
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="diffq-store-sweeper", daemon=True)

    def start(self) -> None:
        if self.sweeper.store.name != "redis":
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweeper.sweep()
            except Exception as error:  # a store or Redis outage: try again next interval
                log.warning("store sweep failed: %s", error)
