"""Job figures for ``GET /metrics``, kept in Redis so any API process can report every worker's jobs.

Whoever ends a job (a worker, or the API when it cancels a queued job or
expires one past its deadline) calls ``record_finished`` once (a worker's runs:
``record_job_end`` into its ``Tally``, written every ``FLUSH_EVERY`` seconds).
It adds, in one ``MULTI``, to the model's hash ``diffq:metrics:<model>``:

==============================  ==========================================================
field                           meaning
==============================  ==========================================================
``jobs:<status>``               jobs that ended ``succeeded``, ``failed`` or ``canceled``
``failures:<code>``             failed jobs by error code (``timeout``, ``worker_lost``, …)
``images``                      images made
``steps``, ``steps_seconds``    denoising steps of succeeded jobs, and their run seconds
``<hist>:bucket:<le>``          observations with ``previous bound < value <= le`` (not
                                cumulative: ``read`` sums them up to each bound)
``<hist>:count``, ``:sum``      number and sum of the observations
==============================  ==========================================================

``<hist>`` is ``queue_wait`` (creation to the start of the run that ended the job)
or ``run`` (that run's start to its end). Storing each bucket on its own means one
``HINCRBY`` per observation, and a later change of ``*_BUCKETS`` still reads right:
a stored bound folds into the smallest current bound at or above it.

Nothing here raises: a metrics write that fails is logged and dropped, never
allowed to fail the job it describes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from diffq.app.contract import keys
from diffq.app.contract.records import JobMode, JobParams, JobRecord, utcnow
from diffq.app.contract.rules import denoising_steps

log = logging.getLogger(__name__)

QUEUE_WAIT_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
"""Upper bounds (seconds) of the queue wait histogram."""

RUN_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
"""Upper bounds (seconds) of the run time histogram."""

HISTOGRAMS: dict[str, tuple[float, ...]] = {"queue_wait": QUEUE_WAIT_BUCKETS, "run": RUN_BUCKETS}


def record_finished(
    redis: Redis,
    model: str,
    status: str,
    error_code: str | None = None,
    queue_wait_s: float | None = None,
    run_s: float | None = None,
    steps: int = 0,
    images: int = 0,
) -> bool:
    """Count one ended job of ``model``. ``queue_wait_s``/``run_s`` ``None``: it never ran (not
    observed). ``steps``: denoising steps it ran (counted for succeeded jobs, for the step
    rate). False (and a log line) if Redis refused: metrics never fail a job."""
    try:
        with redis.pipeline(transaction=True) as pipe:
            _write(pipe, model, status, error_code, queue_wait_s, run_s, steps, images)
            pipe.execute()
        return True
    except RedisError as error:
        log.warning("could not record metrics of a %s job of model %r: %s", status, model, error)
        return False


def record_job_end(
    redis: Redis,
    record: JobRecord,
    values: Mapping[str, Any],
    images: int = 0,
    now: datetime | None = None,
    tally: Tally | None = None,
) -> bool:
    """``record_finished`` for a worker's run: ``record`` is the claimed record (its ``created_at``
    and ``started_at``), ``values`` the final fields it stored (``status``, ``error``,
    ``finished_at``), ``images`` how many it stored. With ``tally``, the counts wait there for
    its next ``flush``."""
    status = str(values["status"])
    error = values.get("error")
    code = error.get("code") if isinstance(error, Mapping) else getattr(error, "code", None)
    finished = values.get("finished_at")
    end = datetime.fromisoformat(finished) if isinstance(finished, str) else (now or utcnow())
    started = record.started_at
    queue_wait = (started - record.created_at).total_seconds() if started is not None else None
    run = (end - started).total_seconds() if started is not None else None
    steps = effective_steps(record.request) if status == "succeeded" else 0
    if tally is not None:
        tally.add(record.model, _increments(status, code, queue_wait, run, steps, images))
        return True
    return record_finished(redis, record.model, status, code, queue_wait, run, steps, images)


def effective_steps(params: JobParams) -> int:
    """Denoising steps a request runs (``rules.denoising_steps``)."""
    if params.mode is not JobMode.TXT2IMG and params.strength is not None:
        return max(1, denoising_steps(params.steps, params.strength))
    return params.steps


def _write(
    pipe: Pipeline,
    model: str,
    status: str,
    error_code: str | None,
    queue_wait_s: float | None,
    run_s: float | None,
    steps: int,
    images: int,
) -> None:
    _write_counts(pipe, model, _increments(status, error_code, queue_wait_s, run_s, steps, images))


def _increments(
    status: str, error_code: str | None, queue_wait_s: float | None, run_s: float | None, steps: int, images: int
) -> list[tuple[str, int | float]]:
    """The fields one ended job adds to its model's hash, and by how much (a float: HINCRBYFLOAT)."""
    counts: list[tuple[str, int | float]] = [(f"jobs:{status}", 1)]
    if status == "failed":
        counts.append((f"failures:{error_code or 'unknown'}", 1))
    if images:
        counts.append(("images", images))
    if status == "succeeded" and steps and run_s is not None and run_s > 0:
        counts += [("steps", steps), ("steps_seconds", float(run_s))]
    for name, value in (("queue_wait", queue_wait_s), ("run", run_s)):
        if value is not None:
            value = max(0.0, value)  # clocks of two hosts may disagree a little
            bucket = f"{name}:bucket:{_bound_text(_bucket(HISTOGRAMS[name], value))}"
            counts += [(bucket, 1), (f"{name}:count", 1), (f"{name}:sum", float(value))]
    return counts


def _write_counts(pipe: Pipeline, model: str, counts: Iterable[tuple[str, int | float]]) -> None:
    key = keys.metrics(model)
    pipe.sadd(keys.METRICS_MODELS, model)
    for name, amount in counts:
        if isinstance(amount, float):
            pipe.hincrbyfloat(key, name, amount)
        else:
            pipe.hincrby(key, name, amount)


#: Seconds a worker's ``Tally`` holds counts before its heartbeat thread writes them.
FLUSH_EVERY = 10.0


class Tally:
    """Counts of ended jobs a worker has not written yet. ``record_job_end(..., tally=)`` adds a
    job's to it; ``flush`` writes them all in one ``MULTI``, one ``HINCRBY`` per field however
    many jobs ended (13 commands per job otherwise): from the worker's heartbeat thread once
    ``FLUSH_EVERY`` seconds have passed, and when the worker stops. ``GET /metrics`` then lags a
    worker's jobs by up to that long, and a worker killed outright loses what it had not written
    (counters, not job state: the records are written when each job ends)."""

    def __init__(self, every: float = FLUSH_EVERY) -> None:
        self.every = every
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, int | float]] = {}
        self._durations: dict[str, list[str]] = {}  # model -> job durations not written yet, oldest first
        self._timed: set[str] = set()  # models whose durations this tally has been given before
        self._flushed = time.monotonic()

    def hold_durations(self, model: str, seconds: Iterable[str]) -> bool:
        """Hold recent job durations for ``keys.model_durations`` (the queued jobs' ETAs) until the
        next write of the counts: an ETA then lags a worker's jobs by up to ``every`` seconds, as
        ``GET /metrics`` does. False for a model's first durations, held nowhere: the caller
        writes them now (``write_durations``), so that ETAs exist from a worker's first job."""
        with self._lock:
            if model not in self._timed:
                self._timed.add(model)
                return False
            self._durations.setdefault(model, []).extend(seconds)
            return True

    def add(self, model: str, counts: Iterable[tuple[str, int | float]]) -> None:
        with self._lock:
            held = self._pending.setdefault(model, {})
            for name, amount in counts:
                held[name] = held.get(name, 0) + amount

    def flush(self, redis: Redis, *, due_only: bool = False) -> bool:
        """Write what is held (``due_only``: only once ``every`` seconds have passed since the last
        write). False (and a log line) if Redis refused; the counts are then kept for the next try."""
        with self._lock:
            if due_only and time.monotonic() - self._flushed < self.every:
                return True
            pending, self._pending = self._pending, {}
            durations, self._durations = self._durations, {}
            self._flushed = time.monotonic()
        if not pending and not durations:
            return True
        try:
            with redis.pipeline(transaction=True) as pipe:
                for model, counts in pending.items():
                    _write_counts(pipe, model, counts.items())
                for model, seconds in durations.items():
                    write_durations(pipe, model, seconds)
                pipe.execute()
            return True
        except RedisError as error:
            log.warning("could not write the metrics of %d model(s): %s", len(pending) + len(durations), error)
            for model, counts in pending.items():
                self.add(model, counts.items())
            with self._lock:
                for model, seconds in durations.items():
                    self._durations[model] = [*seconds, *self._durations.get(model, [])]
            return False


#: Job durations kept per model for the queued jobs' ETAs (``keys.model_durations``).
DURATIONS_KEPT = 20


def write_durations(pipe: Pipeline, model: str, seconds: Sequence[str]) -> None:
    """Add job durations (oldest first) to the model's recent ones, newest first, keeping the last 20."""
    key = keys.model_durations(model)
    pipe.lpush(key, *seconds)
    pipe.ltrim(key, 0, DURATIONS_KEPT - 1)


def _bucket(bounds: Sequence[float], value: float) -> float:
    for bound in bounds:
        if value <= bound:
            return bound
    return math.inf


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))


@dataclass
class Histogram:
    """A histogram as Prometheus wants it: cumulative counts per upper bound (+Inf last), and the sum."""

    buckets: list[tuple[float, int]]
    count: int
    sum: float


@dataclass
class ModelFigures:
    """Everything ``record_finished`` counted for one model."""

    jobs: dict[str, int] = field(default_factory=dict)  # status -> jobs
    failures: dict[str, int] = field(default_factory=dict)  # error code -> jobs
    images: int = 0
    steps: int = 0
    steps_seconds: float = 0.0
    histograms: dict[str, Histogram] = field(default_factory=dict)

    @property
    def steps_per_second(self) -> float | None:
        """Mean denoising steps per second over the succeeded runs, or None before any."""
        return self.steps / self.steps_seconds if self.steps_seconds > 0 else None


def read(redis: Redis) -> dict[str, ModelFigures]:
    """Every model's figures, by model name (one round trip)."""
    models = sorted(
        member.decode() if isinstance(member, bytes) else member for member in redis.smembers(keys.METRICS_MODELS)
    )
    if not models:
        return {}
    with redis.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.hgetall(keys.metrics(model))
        hashes = pipe.execute()
    return {model: parse(fields) for model, fields in zip(models, hashes, strict=True)}


def parse(fields: Mapping[bytes | str, bytes | str]) -> ModelFigures:
    """A ``diffq:metrics:<model>`` hash as figures."""
    figures = ModelFigures()
    raw_buckets: dict[str, dict[float, int]] = {name: {} for name in HISTOGRAMS}
    totals: dict[str, dict[str, float]] = {name: {"count": 0, "sum": 0.0} for name in HISTOGRAMS}
    for raw_name, raw_value in fields.items():
        name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
        value = float(raw_value)
        kind, _, rest = name.partition(":")
        if kind == "jobs":
            figures.jobs[rest] = int(value)
        elif kind == "failures":
            figures.failures[rest] = int(value)
        elif name == "images":
            figures.images = int(value)
        elif name == "steps":
            figures.steps = int(value)
        elif name == "steps_seconds":
            figures.steps_seconds = value
        elif kind in HISTOGRAMS:
            part, _, bound = rest.partition(":")
            if part == "bucket":
                upper = math.inf if bound == "+Inf" else float(bound)
                raw_buckets[kind][upper] = raw_buckets[kind].get(upper, 0) + int(value)
            elif part in ("count", "sum"):
                totals[kind][part] = value
    for kind, bounds in HISTOGRAMS.items():
        if not totals[kind]["count"] and not raw_buckets[kind]:
            continue
        per_bound = dict.fromkeys((*bounds, math.inf), 0)
        for upper, count in raw_buckets[kind].items():
            per_bound[_bucket(bounds, upper)] += count  # a bound no longer listed folds into the next one
        cumulative, running = [], 0
        for upper in (*bounds, math.inf):
            running += per_bound[upper]
            cumulative.append((upper, running))
        figures.histograms[kind] = Histogram(
            buckets=cumulative, count=int(totals[kind]["count"]), sum=totals[kind]["sum"]
        )
    return figures
