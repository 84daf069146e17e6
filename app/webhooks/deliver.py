"""The webhook deliverer: sends scheduled deliveries, retries failures, records every attempt.

Run it as its own process (any number of them, on any hosts)::

    diffq webhooks            # or: python -m diffq.app.webhooks.deliver

It stops cleanly on SIGTERM/SIGINT. In tests or embedded use::

    deliverer = Deliverer(redis, settings)
    deliverer.run_once(now)                 # one pass: claim what is due, send, record
    deliverer.run_forever(stop_event)       # until stop_event is set
    attempts(redis, job_id)                 # what the job resource shows

How no delivery is lost or sent twice at once:

- Each pass first relays the outbox (``diffq.app.contract.webhook_outbox``): status events that
  the job scripts wrote with their change become deliveries, each exactly once.

- Claiming is one Lua script: it moves due deliveries from ``diffq:webhooks:due``
  to ``diffq:webhooks:inflight`` (scored by the lease's end, ``webhook_lease``
  seconds on) and records the claiming pass's token in
  ``diffq:webhooks:owners``. Two deliverers never claim the same delivery.
- A deliverer that dies mid-send leaves its claims in flight; once their lease
  has run out the next claim puts them back in the due set, so they are sent
  again (delivery is at least once; receivers deduplicate on ``webhook-id``).
- Finishing (done, retry later, or give up) is one Lua script that first checks
  the claim is still the caller's, so a deliverer whose lease ran out cannot
  reschedule or delete a delivery another one now owns.

Each attempt is POSTed to the address the URL's host resolved to when the
attempt began, after checking it again (``urls.resolve_checked``): a host that
now resolves to a private address is refused, and the connection cannot be
sent elsewhere by a second DNS answer. Redirects are not followed (a 3xx is a
failure: following one would reach an unchecked URL). A 2xx is success;
anything else is retried after 5 s, 30 s, 2 min, 5 min, 30 min, 1 h, 2 h, then
every 4 h (each ±20 %), until ``webhook_max_age`` after the first attempt,
then given up.

Every attempt is appended to ``diffq:job:<job id>:webhooks`` (a list of JSON,
the newest last, at most ``MAX_RECORDED`` kept) with the job record's
remaining TTL (``job_ttl`` if the record is gone).
"""

from __future__ import annotations

import json
import logging
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import redis.exceptions
from redis import Redis

from diffq.app.contract import connection, keys
from diffq.app.contract.webhook_outbox import relay
from diffq.app.contract.webhook_queue import DELIVERY_PREFIX, DUE, delivery_key
from diffq.app.core.errors import InvalidRequestError
from diffq.app.settings import Settings, load_settings
from diffq.app.webhooks.signing import get_secret, sign
from diffq.app.webhooks.urls import AllowList, resolve_checked

log = logging.getLogger(__name__)

INFLIGHT = f"{keys.PREFIX}:webhooks:inflight"
"""Sorted set: claimed delivery id -> unix time its lease ends."""

OWNERS = f"{keys.PREFIX}:webhooks:owners"
"""Hash: claimed delivery id -> token of the pass that claimed it."""

BACKOFF = (5, 30, 120, 300, 1800, 3600, 7200, 14400)
"""Seconds before retry n (the last repeats), before jitter."""

JITTER = 0.2
MAX_RECORDED = 100
USER_AGENT = "diffq-webhooks/0.1"
REDIS_RETRY_MAX = 5.0

# KEYS: due, inflight, owners. ARGV: now, lease end, most to claim, token, delivery key prefix.
# Expired leases go back to due first, so a crashed deliverer's claims are taken again here.
# Returns id, body, id, body, ... of the claimed deliveries (ids without a body are dropped).
_CLAIM = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZADD', KEYS[1], ARGV[1], id)
end
local claimed = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))) do
  redis.call('ZREM', KEYS[1], id)
  local body = redis.call('GET', ARGV[5] .. id)
  if body then
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    redis.call('HSET', KEYS[3], id, ARGV[4])
    table.insert(claimed, id)
    table.insert(claimed, body)
  end
end
return claimed
"""

# KEYS: due, inflight, owners, delivery, attempts list, job record.
# ARGV: id, token, 'retry' or 'done', attempt JSON, delivery JSON, next due, delivery TTL,
#       attempts TTL if the job record has none, most attempts kept.
# The attempt is always recorded (it happened); the delivery changes only if still ours.
_FINISH = """
redis.call('RPUSH', KEYS[5], ARGV[4])
redis.call('LTRIM', KEYS[5], -tonumber(ARGV[9]), -1)
local ttl = redis.call('PTTL', KEYS[6])
if ttl > 0 then redis.call('PEXPIRE', KEYS[5], ttl) else redis.call('EXPIRE', KEYS[5], ARGV[8]) end
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if ARGV[3] == 'retry' then
  redis.call('SET', KEYS[4], ARGV[5], 'EX', ARGV[7])
  redis.call('ZADD', KEYS[1], ARGV[6], ARGV[1])
else
  redis.call('DEL', KEYS[4])
end
return 1
"""


def attempts_key(job_id: str) -> str:
    """List of JSON attempt records of a job's webhook deliveries, oldest first."""
    return f"{keys.PREFIX}:job:{job_id}:webhooks"


def attempts(redis: Redis, job_id: str) -> list[dict[str, Any]]:
    """Every recorded delivery attempt of a job, oldest first (for the job resource)."""
    return [json.loads(item) for item in redis.lrange(attempts_key(job_id), 0, -1)]


def backoff(attempt: int, jitter: float = 0.5) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based); ``jitter`` in [0, 1)
    spreads retries of many deliveries that failed together (0.5 = no change)."""
    base = BACKOFF[min(attempt, len(BACKOFF)) - 1]
    return base * (1 - JITTER + 2 * JITTER * jitter)


@dataclass(frozen=True)
class Outcome:
    """What one POST did: a status code, or the error that stopped it."""

    status_code: int | None
    error: str | None
    duration: float

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class Deliverer:
    """Claims due deliveries, POSTs them (several at once), and records each attempt.

    ``clock`` and ``jitter`` are injectable so tests can step through hours of
    retries without sleeping. ``concurrency`` deliveries are claimed and sent
    per pass, each in its own thread, so one slow receiver does not hold up
    the others for longer than ``webhook_timeout``.
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        client: httpx.Client | None = None,
        *,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        concurrency: int = 8,
        poll_interval: float = 0.5,
    ) -> None:
        if settings.webhook_lease <= settings.webhook_timeout * 3:
            log.warning(
                "webhook_lease (%s s) should be well above 3 × webhook_timeout (%s s): a slow send "
                "may outlive its lease and be sent twice",
                settings.webhook_lease,
                settings.webhook_timeout,
            )
        self.redis = redis
        self.settings = settings
        self.allow = AllowList.from_settings(settings)
        self._own_client = client is None
        # trust_env=False: a proxy from the environment would undo the address pinning.
        self.client = client or httpx.Client(follow_redirects=False, trust_env=False)
        self.clock = clock
        self.jitter = jitter
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self._claim = redis.register_script(_CLAIM)
        self._finish = redis.register_script(_FINISH)
        self._pool: ThreadPoolExecutor | None = None

    def run_once(self, now: float | None = None) -> int:
        """Claim what is due at ``now`` (default: the clock), send it, record it; returns how many."""
        now = self.clock() if now is None else now
        relay(self.redis, now)  # events the job scripts wrote become deliveries, due now
        claimed = self.claim(now)
        if not claimed:
            return 0
        secret = get_secret(self.redis, self.settings)
        if len(claimed) == 1:
            self._deliver(*claimed[0], secret=secret, now=now)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="webhook")
            futures = [self._pool.submit(self._deliver, *item, secret=secret, now=now) for item in claimed]
            for future in futures:
                future.result()  # a Redis error surfaces here; unfinished claims are retried after their lease
        return len(claimed)

    def run_forever(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set, riding out Redis outages with a growing pause."""
        failures = 0
        while not stop.is_set():
            try:
                sent = self.run_once()
                failures = 0
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                failures += 1
                pause = min(REDIS_RETRY_MAX, 0.25 * 2**failures)
                log.warning("Redis unreachable (%s); retrying in %.1f s", exc, pause)
                stop.wait(pause)
                continue
            except Exception:
                log.exception("webhook delivery pass failed; continuing")
                sent = 0
            if sent == 0:
                stop.wait(self.poll_interval)

    def claim(self, now: float) -> list[tuple[str, dict[str, Any], str]]:
        """Take up to ``concurrency`` due deliveries: (id, delivery, lease token) each."""
        token = uuid.uuid4().hex
        reply = self._claim(
            keys=[DUE, INFLIGHT, OWNERS],
            args=[now, now + self.settings.webhook_lease, self.concurrency, token, DELIVERY_PREFIX],
        )
        return [(_text(reply[i]), json.loads(reply[i + 1]), token) for i in range(0, len(reply), 2)]

    def close(self) -> None:
        """Stop the sending threads and close the HTTP client if this deliverer made it."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._own_client:
            self.client.close()

    def _deliver(self, delivery_id: str, delivery: dict[str, Any], token: str, *, secret: str, now: float) -> None:
        try:
            outcome = self.post(delivery, secret)
        except Exception as exc:  # a bug must cost one attempt, not the delivery
            log.exception("webhook %s: unexpected error", delivery_id)
            outcome = Outcome(None, f"internal error: {type(exc).__name__}: {exc}", 0.0)
        self._record(delivery_id, delivery, token, outcome, now)

    def post(self, delivery: dict[str, Any], secret: str) -> Outcome:
        """One signed POST of a delivery to the address its URL resolves to right now."""
        started = time.monotonic()
        try:
            ip, port = resolve_checked(delivery["url"], self.allow)
        except InvalidRequestError as exc:
            return Outcome(None, f"refused: {exc.problems[0].message}", time.monotonic() - started)
        body = json.dumps(delivery["payload"], separators=(",", ":"))
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            **sign(secret, delivery["event_id"], datetime.now(UTC), body),
        }
        request = pinned_request(self.client, delivery["url"], ip, port, body, headers, self.settings.webhook_timeout)
        try:
            response = self.client.send(request, stream=True, follow_redirects=False)
            response.close()  # only the status matters; an endless body cannot hold us
        except httpx.HTTPError as exc:
            return Outcome(
                None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, time.monotonic() - started
            )
        return Outcome(response.status_code, _status_problem(response), time.monotonic() - started)

    def _record(self, delivery_id: str, delivery: dict[str, Any], token: str, outcome: Outcome, now: float) -> None:
        attempt = delivery["attempts"] + 1
        first = delivery.get("first_attempt_at") or now
        deadline = first + self.settings.webhook_max_age
        ended = now + outcome.duration
        if outcome.delivered:
            result, next_at = "delivered", None
        elif ended >= deadline:
            result, next_at = "gave_up", None
        else:
            result, next_at = "retrying", min(ended + backoff(attempt, self.jitter()), deadline)
        record = {
            "delivery_id": delivery_id,
            "event_id": delivery["event_id"],
            "type": delivery["type"],
            "attempt": attempt,
            "at": _iso(now),
            "status_code": outcome.status_code,
            "error": outcome.error,
            "duration_ms": round(outcome.duration * 1000, 1),
            "outcome": result,
            "next_attempt_at": _iso(next_at) if next_at is not None else None,
        }
        updated = {**delivery, "attempts": attempt, "first_attempt_at": first}
        keep = int(deadline - now) + self.settings.webhook_lease + 3600
        written = self._finish(
            keys=[
                DUE,
                INFLIGHT,
                OWNERS,
                delivery_key(delivery_id),
                attempts_key(delivery["job_id"]),
                keys.job(delivery["job_id"]),
            ],
            args=[
                delivery_id,
                token,
                "retry" if next_at is not None else "done",
                json.dumps(record),
                json.dumps(updated),
                next_at or 0,
                keep,
                self.settings.job_ttl,
                MAX_RECORDED,
            ],
        )
        level = logging.INFO if result != "gave_up" else logging.WARNING
        log.log(
            level,
            "webhook %s (job %s, %s) attempt %d: %s%s",
            delivery_id,
            delivery["job_id"],
            delivery["type"],
            attempt,
            result,
            f" ({outcome.error})" if outcome.error else "",
        )
        if not int(written):
            log.warning("webhook %s: lease lost during the attempt; another deliverer owns it now", delivery_id)


def pinned_request(
    client: httpx.Client, url: str, ip: str, port: int, body: str, headers: dict[str, str], timeout: float
) -> httpx.Request:
    """A POST to ``url`` that connects to ``ip`` (checked) while naming the URL's host in the
    ``Host`` header and, for https, in TLS SNI and certificate verification."""
    original = httpx.URL(url)
    target = original.copy_with(host=ip, port=port, fragment=None)
    host = original.raw_host.decode("ascii")
    extensions = {"sni_hostname": host} if original.scheme == "https" else {}
    request = client.build_request(
        "POST",
        target,
        content=body.encode(),
        headers={**headers, "host": original.netloc.decode("ascii")},
        timeout=timeout,
        extensions=extensions,
    )
    return request


def _status_problem(response: httpx.Response) -> str | None:
    if 200 <= response.status_code < 300:
        return None
    if 300 <= response.status_code < 400:
        location = response.headers.get("location", "")
        return f"HTTP {response.status_code}: redirect{' to ' + location if location else ''} not followed"
    return f"HTTP {response.status_code}"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def main(settings: Settings | None = None) -> int:
    """``python -m diffq.app.webhooks.deliver`` (or ``diffq webhooks``): deliver until SIGTERM or SIGINT."""
    settings = settings or load_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    client = connection.sync_client(settings, socket_connect_timeout=2, socket_timeout=10)
    deliverer = Deliverer(client, settings)
    log.info("webhook deliverer started (lease %s s, timeout %s s)", settings.webhook_lease, settings.webhook_timeout)
    try:
        deliverer.run_forever(stop)
    finally:
        deliverer.close()
        client.close()
    log.info("webhook deliverer stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
