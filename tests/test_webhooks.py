"""app/webhooks: checked URLs, Standard Webhooks signatures, and deliveries that are never lost.

Everything runs against the real test Redis and a real HTTP receiver on
loopback (allowed by these tests' settings). Retries are stepped through
with an explicit ``now``, so hours of backoff take no time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import standardwebhooks
from redis import Redis

from diffq.app.contract import keys
from diffq.app.core.errors import InvalidRequestError
from diffq.app.embedded_redis import EmbeddedRedis, free_port
from diffq.app.settings import Settings
from diffq.app.webhooks import signing
from diffq.app.webhooks.deliver import INFLIGHT, OWNERS, Deliverer, attempts, attempts_key, backoff
from diffq.app.contract.webhook_outbox import OUTBOX, relay
from diffq.app.contract.webhook_queue import DUE, delivery_key, schedule
from diffq.app.webhooks.signing import get_secret
from diffq.app.webhooks.urls import AllowList, check_url, resolve_checked

REPO = Path(__file__).resolve().parent.parent
T0 = 1_900_000_000.0  # "now" of the scheduling clock; signatures still use the real time
DATA = {"id": "job-1", "status": "succeeded"}


class Receiver:
    """A real HTTP server on loopback that records requests and answers from a script."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.script: list[tuple[int, dict[str, str], float]] = []  # (status, headers, delay) per request
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    receiver.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    status, headers, delay = receiver.script.pop(0) if receiver.script else (200, {}, 0.0)
                time.sleep(delay)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=abc"

    def answer(self, *statuses: int | tuple[int, dict[str, str], float]) -> None:
        self.script.extend(s if isinstance(s, tuple) else (s, {}, 0.0) for s in statuses)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def hook_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"webhook_allow_loopback": True, "webhook_timeout": 2.0, "webhook_max_age": 86400, "webhook_lease": 60}
    )


@pytest.fixture
def make_deliverer(redis: Redis, hook_settings: Settings) -> Iterator[Callable[..., Deliverer]]:
    made: list[Deliverer] = []

    def make(client: Redis | None = None, **updates: object) -> Deliverer:
        deliverer = Deliverer(
            client or redis, hook_settings.model_copy(update=updates), jitter=lambda: 0.5, concurrency=4
        )
        made.append(deliverer)
        return deliverer

    yield make
    for deliverer in made:
        deliverer.close()


def _job(redis: Redis, job_id: str = "job-1", ttl: int = 500) -> None:
    """A stand-in job record: only its TTL matters here."""
    redis.hset(keys.job(job_id), "id", json.dumps(job_id))
    redis.expire(keys.job(job_id), ttl)


def _schedule(redis: Redis, url: str, event_id: str = "evt-1", job_id: str = "job-1") -> str:
    return schedule(redis, job_id, url, "job.succeeded", DATA, event_id, now=T0)


def _outcomes(redis: Redis, job_id: str = "job-1") -> list[tuple[str, int | None]]:
    return [(a["outcome"], a["status_code"]) for a in attempts(redis, job_id)]


def _queues_empty(redis: Redis) -> bool:
    return redis.zcard(DUE) == 0 and redis.zcard(INFLIGHT) == 0 and redis.hlen(OWNERS) == 0


# URL checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://localhost:8080/hook",
        "http://2130706433/",  # 127.0.0.1 spelled as one number
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/",
        "http://172.16.5.4/",
        "http://100.64.0.1/",
        "http://[fd12:3456::1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://[fe80::1]/",
        "http://224.0.0.1/",
        "http://0.0.0.0/",
        "http://240.0.0.1/",
        "ftp://93.184.216.34/hook",
        "file:///etc/passwd",
        "http://user:pass@93.184.216.34/hook",
        "http://token@93.184.216.34/hook",
        "http:///hook",
        "http://93.184.216.34:99999/",
        "http://93.184.216.34/a b",
        "",
    ],
)
def test_urls_refused_by_default(url: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        check_url(url, AllowList())
    assert [p.field for p in raised.value.problems] == ["webhook.url"]


# Blocks of the IANA special-purpose registries (and site-local) that Python 3.11's is_global lets through,
# and some it does not: every one refused, even with loopback and private addresses allowed.
SPECIAL = [
    "fec0::1", "fec0:1:2:3::4", "feff::1",  # fec0::/10 site-local
    "3fff::1", "3fff:fff:ffff::1",  # 3fff::/20 documentation (RFC 9637)
    "192.88.99.1",  # deprecated 6to4 relay anycast
    "192.0.0.9", "192.0.0.10", "192.31.196.1", "192.52.193.1", "192.175.48.1",  # anycast services
    "2001:4:112::1", "2001:1::1", "2001:20::1", "2620:4f:8000::1", "2002:5db8:d822::1",  # AS112, ORCHIDv2, 6to4
    "5f00::1", "100::1", "100:0:0:1::1", "64:ff9b:1::1", "2001:db8::1", "198.18.0.1", "203.0.113.5",
]


@pytest.mark.parametrize("address", SPECIAL)
def test_every_special_purpose_range_is_refused(address: str) -> None:
    literal = f"[{address}]" if ":" in address else address
    with pytest.raises(InvalidRequestError, match="special-purpose|reserved|not a public") as raised:
        check_url(f"http://{literal}/hook", AllowList(loopback=True, private=True))
    assert address in raised.value.problems[0].message


def test_nat64_addresses_are_judged_as_the_ipv4_address_they_carry() -> None:
    check_url("http://[64:ff9b::5db8:d822]/hook", AllowList())  # 93.184.216.34 through DNS64/NAT64
    with pytest.raises(InvalidRequestError, match="loopback"):
        check_url("http://[64:ff9b::7f00:1]/hook", AllowList())


PUBLIC = ["http://93.184.216.34/hook", "https://93.184.216.34:8443/x?y=1", "http://[2606:2800:220:1:248:1893:25c8:1946]/"]


@pytest.mark.parametrize("url", PUBLIC)
def test_public_addresses_are_accepted(url: str) -> None:
    check_url(url, AllowList())


def test_settings_allow_loopback_and_private_but_never_metadata_or_link_local(hook_settings: Settings) -> None:
    loopback = AllowList.from_settings(hook_settings)
    assert resolve_checked("http://127.0.0.1:8080/x", loopback) == ("127.0.0.1", 8080)
    assert resolve_checked("https://[::1]/x", loopback) == ("::1", 443)
    with pytest.raises(InvalidRequestError):
        check_url("http://10.0.0.1/", loopback)

    private = AllowList(private=True)
    for url in ["http://10.0.0.1/", "http://192.168.1.1/", "http://100.64.3.4/", "http://[fd12::1]/"]:
        check_url(url, private)
    for url in ["http://169.254.169.254/", "http://[fe80::1]/", "http://127.0.0.1/", "http://224.0.0.1/"]:
        with pytest.raises(InvalidRequestError):
            check_url(url, private)
    with pytest.raises(InvalidRequestError, match="metadata"):
        check_url("http://169.254.169.254/", AllowList(loopback=True, private=True))


def test_every_resolved_address_must_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """One private address among public ones is enough to refuse: a connection could go there."""
    answers = {"mixed.example": ["93.184.216.34", "10.0.0.7"], "public.example": ["93.184.216.34", "2606:4700::1"]}

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(InvalidRequestError, match="10.0.0.7"):
        check_url("https://mixed.example/hook", AllowList())
    assert resolve_checked("https://public.example/hook", AllowList()) == ("93.184.216.34", 443)
    with pytest.raises(InvalidRequestError, match="does not resolve"):
        check_url("https://nowhere.example/hook", AllowList())


# Signing ---------------------------------------------------------------------------------------


def test_generated_secret_is_shared_through_redis(redis: Redis, hook_settings: Settings) -> None:
    first = get_secret(redis, hook_settings)
    assert first.startswith("whsec_") and get_secret(redis, hook_settings) == first
    assert redis.get(signing.SECRET_KEY) == first.encode() and redis.ttl(signing.SECRET_KEY) == -1

    configured = signing.generate_secret()
    assert get_secret(redis, hook_settings.model_copy(update={"webhook_secret": configured})) == configured
    with pytest.raises(ValueError, match="webhook_secret"):
        get_secret(redis, hook_settings.model_copy(update={"webhook_secret": "whsec_"}))


def test_deliveries_verify_with_standardwebhooks(
    redis: Redis, receiver: Receiver, make_deliverer: Callable[..., Deliverer]
) -> None:
    _schedule(redis, receiver.url)
    assert make_deliverer().run_once(T0) == 1

    (path, headers, body), = receiver.requests
    secret = get_secret(redis, make_deliverer().settings)
    payload = standardwebhooks.Webhook(secret).verify(body, headers)
    assert payload["type"] == "job.succeeded" and payload["data"] == DATA and payload["timestamp"].endswith("Z")
    assert path == "/hook?token=abc" and headers["webhook-id"] == "evt-1"
    assert headers["webhook-signature"].startswith("v1,") and headers["content-type"] == "application/json"
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(body.replace(b"succeeded", b"failed"), headers)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(signing.generate_secret()).verify(body, headers)


# Scheduling and delivery -----------------------------------------------------------------------


def test_schedule_is_part_of_the_callers_transaction(redis: Redis) -> None:
    with redis.pipeline() as pipe:
        pipe.hset(keys.job("job-1"), "status", json.dumps("succeeded"))
        delivery_id = schedule(pipe, "job-1", "http://93.184.216.34/", "job.succeeded", DATA, "evt-1", now=T0)
        assert redis.zcard(DUE) == 0 and not redis.exists(delivery_key(delivery_id))  # nothing until EXEC
        pipe.execute()

    assert redis.zscore(DUE, delivery_id) == T0
    stored = json.loads(redis.get(delivery_key(delivery_id)))
    assert {k: stored[k] for k in ("job_id", "url", "type", "event_id", "attempts", "first_attempt_at")} == {
        "job_id": "job-1", "url": "http://93.184.216.34/", "type": "job.succeeded", "event_id": "evt-1",
        "attempts": 0, "first_attempt_at": None,
    }
    assert stored["payload"]["data"] == DATA and 0 < redis.ttl(delivery_key(delivery_id))


def test_delivery_is_sent_once_and_recorded_with_the_jobs_ttl(
    redis: Redis, receiver: Receiver, make_deliverer: Callable[..., Deliverer]
) -> None:
    _job(redis, ttl=500)
    delivery_id = _schedule(redis, receiver.url)
    deliverer = make_deliverer()

    assert deliverer.run_once(T0 - 1) == 0  # not due yet
    assert deliverer.run_once(T0) == 1
    assert deliverer.run_once(T0 + 3600) == 0

    assert len(receiver.requests) == 1
    (attempt,) = attempts(redis, "job-1")
    assert attempt["outcome"] == "delivered" and attempt["status_code"] == 200 and attempt["error"] is None
    assert (attempt["delivery_id"], attempt["event_id"], attempt["attempt"]) == (delivery_id, "evt-1", 1)
    assert attempt["next_attempt_at"] is None and attempt["duration_ms"] >= 0
    assert _queues_empty(redis) and not redis.exists(delivery_key(delivery_id))
    assert 400 < redis.ttl(attempts_key("job-1")) <= 500


def test_a_failing_receiver_is_retried_with_backoff(
    redis: Redis, receiver: Receiver, make_deliverer: Callable[..., Deliverer]
) -> None:
    receiver.answer(500, 503)
    _schedule(redis, receiver.url)
    deliverer = make_deliverer()

    assert deliverer.run_once(T0) == 1
    first = attempts(redis, "job-1")[0]
    assert (first["outcome"], first["status_code"], first["error"]) == ("retrying", 500, "HTTP 500")
    assert deliverer.run_once(T0 + 4.5) == 0  # the first retry waits 5 s
    assert deliverer.run_once(T0 + 5.5) == 1
    assert deliverer.run_once(T0 + 30) == 0  # the second waits 30 s more
    assert deliverer.run_once(T0 + 36) == 1

    assert _outcomes(redis) == [("retrying", 500), ("retrying", 503), ("delivered", 200)]
    assert [a["attempt"] for a in attempts(redis, "job-1")] == [1, 2, 3]
    assert {headers["webhook-id"] for _, headers, _ in receiver.requests} == {"evt-1"}  # receivers can dedupe
    assert _queues_empty(redis)


def test_backoff_grows_to_hours_with_jitter() -> None:
    assert [backoff(n) for n in range(1, 10)] == [5, 30, 120, 300, 1800, 3600, 7200, 14400, 14400]
    assert backoff(1, 0.0) == pytest.approx(4.0) and backoff(1, 0.999) == pytest.approx(6.0, abs=0.01)


def test_redirects_are_not_followed_and_count_as_failures(
    redis: Redis, receiver: Receiver, make_deliverer: Callable[..., Deliverer]
) -> None:
    receiver.answer((302, {"location": "http://169.254.169.254/latest/meta-data/"}, 0.0))
    _schedule(redis, receiver.url)

    assert make_deliverer().run_once(T0) == 1

    assert len(receiver.requests) == 1
    (attempt,) = attempts(redis, "job-1")
    assert (attempt["outcome"], attempt["status_code"]) == ("retrying", 302)
    assert "redirect" in attempt["error"] and "not followed" in attempt["error"]


def test_a_slow_receiver_times_out_and_is_retried(
    redis: Redis, receiver: Receiver, make_deliverer: Callable[..., Deliverer]
) -> None:
    receiver.answer((200, {}, 1.0))
    _schedule(redis, receiver.url)

    assert make_deliverer(webhook_timeout=0.3).run_once(T0) == 1

    (attempt,) = attempts(redis, "job-1")
    assert attempt["outcome"] == "retrying" and attempt["status_code"] is None and "Timeout" in attempt["error"]


def test_a_receiver_that_is_down_gets_the_delivery_when_it_is_back(
    redis: Redis, make_deliverer: Callable[..., Deliverer]
) -> None:
    port = free_port()
    _schedule(redis, f"http://127.0.0.1:{port}/hook")
    deliverer = make_deliverer()

    assert deliverer.run_once(T0) == 1
    assert deliverer.run_once(T0 + 6) == 1
    back = Receiver(port)
    try:
        assert deliverer.run_once(T0 + 6 + 31) == 1
    finally:
        back.close()

    assert [a["outcome"] for a in attempts(redis, "job-1")] == ["retrying", "retrying", "delivered"]
    assert "ConnectError" in attempts(redis, "job-1")[0]["error"]
    assert len(back.requests) == 1 and _queues_empty(redis)


def test_two_deliverers_never_send_the_same_delivery(
    redis: Redis, redis_server: EmbeddedRedis, receiver: Receiver, make_deliverer: Callable[..., Deliverer]
) -> None:
    for n in range(24):
        _schedule(redis, receiver.url, event_id=f"evt-{n}", job_id=f"job-{n % 3}")
    clients = [Redis.from_url(redis_server.url) for _ in range(2)]
    deliverers = [make_deliverer(client) for client in clients]
    start = threading.Barrier(2)
    sent = [0, 0]

    def drain(index: int) -> None:
        start.wait(timeout=10)
        while (count := deliverers[index].run_once(T0)) > 0:
            sent[index] += count

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for client in clients:
        client.close()

    ids = [headers["webhook-id"] for _, headers, _ in receiver.requests]
    assert sorted(ids) == sorted(f"evt-{n}" for n in range(24))  # each exactly once
    assert sum(sent) == 24 and _queues_empty(redis)
    assert sum(len(attempts(redis, f"job-{j}")) for j in range(3)) == 24


def test_a_crashed_deliverers_claim_is_sent_again_after_its_lease(
    redis: Redis, receiver: Receiver, make_deliverer: Callable[..., Deliverer]
) -> None:
    receiver.answer(200, 500)
    delivery_id = _schedule(redis, receiver.url)
    crashed, survivor = make_deliverer(), make_deliverer()

    ((claimed_id, delivery, token),) = crashed.claim(T0)  # ...and then the process dies
    assert claimed_id == delivery_id and redis.zscore(INFLIGHT, delivery_id) == T0 + 60
    assert survivor.run_once(T0 + 59) == 0  # still leased
    assert survivor.run_once(T0 + 61) == 1
    assert len(receiver.requests) == 1 and _queues_empty(redis)

    # Had it only been slow, its late failure is recorded but cannot reschedule what is done.
    crashed._deliver(claimed_id, delivery, token, secret=signing.generate_secret(), now=T0 + 62)
    assert _queues_empty(redis) and not redis.exists(delivery_key(delivery_id))
    assert _outcomes(redis) == [("delivered", 200), ("retrying", 500)]


def test_gives_up_after_max_age_and_records_it(
    redis: Redis, receiver: Receiver, make_deliverer: Callable[..., Deliverer]
) -> None:
    receiver.answer(*[500] * 20)
    delivery_id = _schedule(redis, receiver.url)
    deliverer = make_deliverer(webhook_max_age=3600)

    now = T0
    while (due := redis.zscore(DUE, delivery_id)) is not None:
        now = due
        assert deliverer.run_once(now) == 1

    history = attempts(redis, "job-1")
    assert [a["outcome"] for a in history] == ["retrying"] * 6 + ["gave_up"]
    assert now == pytest.approx(T0 + 3600)  # the last try is at the deadline, after 5 s ... 30 min waits
    assert history[-1]["next_attempt_at"] is None and history[-1]["status_code"] == 500
    assert len(receiver.requests) == 7 and _queues_empty(redis) and not redis.exists(delivery_key(delivery_id))


def test_delivery_time_checks_refuse_a_host_that_now_resolves_to_loopback(
    redis: Redis, receiver: Receiver, make_deliverer: Callable[..., Deliverer]
) -> None:
    _schedule(redis, receiver.url)

    assert make_deliverer(webhook_allow_loopback=False).run_once(T0) == 1

    (attempt,) = attempts(redis, "job-1")
    assert attempt["outcome"] == "retrying" and "refused" in attempt["error"] and "loopback" in attempt["error"]
    assert receiver.requests == []


def test_delivery_goes_to_the_checked_address_under_the_urls_host_name(
    redis: Redis, receiver: Receiver, make_deliverer: Callable[..., Deliverer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the connection uses the address that was checked, named by the URL's host."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        lookups.append(host)
        if host == "hooks.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    _schedule(redis, f"http://hooks.example:{receiver.port}/hook")

    assert make_deliverer().run_once(T0) == 1

    assert lookups.count("hooks.example") == 1  # resolved once, when checked; httpx got the IP
    (_, headers, _), = receiver.requests
    assert headers["host"] == f"hooks.example:{receiver.port}"
    assert _outcomes(redis) == [("delivered", 200)]


# Running as a process --------------------------------------------------------------------------


def test_run_forever_rides_out_a_redis_outage(
    receiver: Receiver, make_deliverer: Callable[..., Deliverer], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    client = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1, socket_timeout=2)
    deliverer = make_deliverer(client)
    deliverer.poll_interval = 0.05
    stop = threading.Event()
    thread = threading.Thread(target=deliverer.run_forever, args=(stop,))
    thread.start()
    server = EmbeddedRedis(port=port)
    try:
        time.sleep(0.4)  # a few failed passes against no Redis at all
        server.start()
        schedule(client, "job-1", receiver.url, "job.succeeded", DATA, "evt-1")
        deadline = time.monotonic() + 10
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=10)
        client.close()
        server.stop()
    assert not thread.is_alive() and len(receiver.requests) == 1
    assert "Redis unreachable" in caplog.text


def test_main_stops_cleanly_on_sigterm(redis_server: EmbeddedRedis, receiver: Receiver, redis: Redis) -> None:
    env = {**os.environ, "DIFFQ_REDIS_URL": redis_server.url, "DIFFQ_WEBHOOK_ALLOW_LOOPBACK": "true",
           "DIFFQ_LOG_LEVEL": "info", "OMP_NUM_THREADS": "1"}
    _job(redis)
    schedule(redis, "job-1", receiver.url, "job.succeeded", DATA, "evt-1")
    process = subprocess.Popen(
        [sys.executable, "-m", "diffq.app.webhooks.deliver"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "webhook deliverer stopped" in stderr and len(receiver.requests) == 1
    assert _outcomes(redis) == [("delivered", 200)]


def test_ip_literals_are_checked_without_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """A literal never reaches a resolver, so it is checked the same on a machine without DNS."""

    def no_dns(*args: object, **kwargs: object) -> None:
        raise AssertionError("DNS was asked")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert resolve_checked("https://[2606:2800:220:1:248:1893:25c8:1946]:8443/x", AllowList()) == (
        "2606:2800:220:1:248:1893:25c8:1946", 8443,
    )
    check_url("http://93.184.216.34/hook", AllowList())
    for url in ["http://10.0.0.1/", "http://[::1]/", "http://metadata.google.internal/"]:
        with pytest.raises(InvalidRequestError):
            check_url(url, AllowList())


def test_outbox_entries_become_one_delivery_each_however_many_relay_at_once(redis: Redis) -> None:
    hook = json.dumps({"url": "https://example.com/hook", "events": ["succeeded"]})
    for n in range(50):
        redis.xadd(OUTBOX, {"job_id": f"job{n}", "type": "succeeded", "data": '{"status":"succeeded","images":1}',
                            "webhook": hook})
    redis.xadd(OUTBOX, {"job_id": "bad", "type": "succeeded", "data": "{}", "webhook": "not json"})
    barrier = threading.Barrier(4)
    written: list[int] = []

    def relay_all() -> None:
        barrier.wait()
        while (n := relay(redis, time.time(), batch=7)) or redis.xlen(OUTBOX):
            written.append(n)

    threads = [threading.Thread(target=relay_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sum(written) == 50 and redis.zcard(DUE) == 50 and redis.xlen(OUTBOX) == 0
    bodies = [json.loads(redis.get(delivery_key(member.decode()))) for member in redis.zrange(DUE, 0, -1)]
    assert sorted(body["event_id"] for body in bodies) == sorted(f"msg_job{n}_succeeded" for n in range(50))
    assert {body["payload"]["data"]["images"][0] for body in bodies if body["job_id"] == "job3"} == {
        "/v1/jobs/job3/images/0.png"}
