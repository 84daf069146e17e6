"""``diffq up``: Redis, the API, one worker and a webhook deliverer as child processes of one command.

Children run in their own sessions, so a Ctrl-C in the terminal reaches only
this supervisor, which then stops them in order: the worker, the webhook
deliverer (which may still send the worker's last events), the API, and Redis
last (a worker must not lose Redis while it finishes). Each child also gets
SIGTERM from the kernel if the supervisor dies without cleaning up, so no
process outlives it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from diffq.app.contract import connection
from diffq.app.embedded_redis import EmbeddedRedis
from diffq.app.settings import Settings

GRACE_SECONDS = 10.0
"""How long a child may take to stop after SIGTERM before it is killed."""

READY_TIMEOUT_SECONDS = 600.0
"""How long the worker may take to load its model before `up` gives up."""

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM us when the supervisor dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: orderly shutdown still works
        pass


@dataclass
class Child:
    """A supervised child process."""

    name: str
    process: subprocess.Popen[bytes]

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = GRACE_SECONDS) -> None:
        """SIGTERM, then SIGTERM again (RQ's cold shutdown) at half the grace, then SIGKILL."""
        for sig, wait in ((signal.SIGTERM, grace / 2), (signal.SIGTERM, grace / 2), (signal.SIGKILL, grace)):
            if not self.running():
                return
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue


def _spawn(name: str, args: list[str], env: dict[str, str]) -> Child:
    process = subprocess.Popen(
        [sys.executable, "-m", "diffq.app.cli", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    return Child(name, process)


def _without_password(url: str) -> str:
    """The URL safe to print: a password in it becomes ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def up(settings: Settings) -> int:
    """Run until Ctrl-C or SIGTERM (exit 0), or until a child dies (exit 1)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    redis: EmbeddedRedis | None = None
    children: list[Child] = []
    try:
        env = dict(os.environ)
        if connection.uses_sentinel(settings):
            print(f"diffq: using the {connection.describe(settings)}", flush=True)
        elif "redis_url" in settings.model_fields_set:
            print(f"diffq: using Redis at {_without_password(settings.redis_url)}", flush=True)
        else:
            redis = EmbeddedRedis(settings.embedded_redis_port)
            redis.start(start_new_session=True, preexec_fn=_die_with_parent)
            env["DIFFQ_REDIS_URL"] = redis.url
            print(f"diffq: started embedded Redis at {redis.url}", flush=True)
        env.update(DIFFQ_HOST=settings.host, DIFFQ_PORT=str(settings.port), DIFFQ_MODEL_PATH=str(settings.model_path))
        if settings.host in ("127.0.0.1", "localhost", "::1"):
            # One machine, loopback only: no API keys unless DIFFQ_AUTH says so, and `diffq jobs` works.
            env.setdefault("DIFFQ_AUTH", "off")
            env.setdefault("DIFFQ_JOB_LISTING", "true")
        children.append(_spawn("api", ["api"], env))
        children.append(_spawn("webhook deliverer", ["webhooks"], env))
        children.append(_spawn("worker", ["worker"], env))
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        url = f"http://{host}:{settings.port}"
        return _supervise(children, url, stop)
    finally:
        for child in reversed(children):  # worker first, then the deliverer, then the API
            child.stop()
        if redis is not None:
            redis.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("diffq: stopped", flush=True)


def _supervise(children: list[Child], url: str, stop: threading.Event) -> int:
    print(f"diffq: starting the API, a webhook deliverer and a worker (loading the model) at {url} ...", flush=True)
    started = time.monotonic()
    ready = False
    next_probe = 0.0
    while not stop.wait(0.1):
        for child in children:
            if not child.running():
                print(f"diffq: the {child.name} exited with code {child.process.returncode}; stopping", flush=True)
                return 1
        if ready or time.monotonic() < next_probe:
            continue
        next_probe = time.monotonic() + 1.0
        if _ready(url):
            ready = True
            print(f"diffq: ready at {url}  (API docs: {url}/docs; Ctrl-C stops everything)", flush=True)
        elif time.monotonic() - started > READY_TIMEOUT_SECONDS:
            print(f"diffq: not ready after {READY_TIMEOUT_SECONDS:.0f} s; stopping", flush=True)
            return 1
    return 0
