"""Which running jobs a client has just canceled or deleted, heard from Redis pub/sub.

A running job stops within one denoising step of a cancel or a delete. Asking Redis at every
step costs a round trip (and a command) per step per job; instead the store publishes the id of
a running job it flags as canceled, or deletes, on ``keys.STOPS`` (``diffq.app.contract.store``),
and this listener, one thread per worker process, notes it. A job's progress reporter reads its
record only when its id was heard here, when a progress or preview write is due anyway (those
scripts check the record), and at every step while the subscription is not live. The record
stays the only truth: a message only makes the worker look at it sooner.

Pub/sub does not keep messages for a subscriber that is away: after any reconnect
(``generation`` changes) every running job reads its record once at its next step, so a cancel
published while the connection was down is seen then.
"""

from __future__ import annotations

import logging
import threading
import time

import redis.exceptions
from redis import Redis

from diffq.app.contract import keys

log = logging.getLogger(__name__)

#: Seconds a heard job id is kept for a run on this worker to pick it up (ids of jobs running on
#: other workers are heard too, and dropped after this).
KEEP = 60.0


class StopListener:
    """A daemon thread subscribed to ``keys.STOPS``; ``heard(job_id)`` tells a reporter to look."""

    def __init__(self, redis: Redis, channel: str = keys.STOPS) -> None:
        self.redis = redis
        self.channel = channel
        self.generation = 0  # counts (re)subscriptions: a reporter seeing it change reads its record
        self.live = False  # subscribed now; while not, every step reads the record
        self._heard: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="diffq-stops", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def heard(self, job_id: str) -> bool:
        """Whether a stop of ``job_id`` was published since it was last asked (and forgets it)."""
        with self._lock:
            return self._heard.pop(job_id, None) is not None

    def _note(self, job_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._heard[job_id] = now
            if len(self._heard) > 1000:
                self._heard = {job: at for job, at in self._heard.items() if now - at < KEEP}

    def _loop(self) -> None:
        pause = 0.1
        while not self._stop.is_set():
            pubsub = self.redis.pubsub()
            try:
                pubsub.subscribe(self.channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self.generation += 1
                        self.live, pause = True, 0.1
                    elif message["type"] == "message":
                        data = message["data"]
                        self._note(data.decode() if isinstance(data, bytes) else str(data))
            except (redis.exceptions.RedisError, OSError) as error:
                if self.live:
                    log.warning("stop listener: lost its subscription (%s); checking every step until back", error)
                self.live = False
                self._stop.wait(pause)
                pause = min(pause * 2, 5.0)
            finally:
                self.live = False if self._stop.is_set() else self.live
                try:
                    pubsub.close()
                except (redis.exceptions.RedisError, OSError):
                    pass
