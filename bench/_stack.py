"""Real diffq processes for the benchmarks: an embedded redis-server, `diffq api`, `diffq worker`.

Started the way tests/test_chaos.py starts them (the installed `diffq` script next to this
interpreter, a clean environment plus DIFFQ_* settings), each logging to a file in a temporary
folder that `Stack.logs()` prints when something goes wrong.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from diffq.app.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "model" / "shapes"
T = TypeVar("T")


def diffq_command() -> list[str]:
    script = Path(sys.executable).parent / "diffq"
    if script.exists():
        return [str(script)]
    found = shutil.which("diffq")
    return [found] if found else [sys.executable, "-m", "diffq.app.cli"]


def wait_for(condition: Callable[[], T], timeout: float = 120.0, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


HEADERS: dict[str, str] = {}
"""What every benchmark request sends: the API key of the running ``Stack``."""


class Stack:
    """An embedded Redis plus any number of `diffq api` and `diffq worker` processes on it."""

    def __init__(self, **env: str) -> None:
        self.redis = EmbeddedRedis()
        self.redis.start()
        self.log_dir = Path(tempfile.mkdtemp(prefix="diffq-bench-"))
        self.env = {name: value for name, value in os.environ.items() if not name.startswith("DIFFQ_")}
        # API keys on, as deployed: every request sends HEADERS (a key made here), with a rate no benchmark reaches.
        self.env.update(DIFFQ_REDIS_URL=self.redis.url, DIFFQ_LOG_LEVEL="warning", DIFFQ_AUTH="keys",
                        DIFFQ_RATE_LIMIT="10000000/second", DIFFQ_MAX_QUEUED_JOBS="10000000", **env)
        from redis import Redis

        from diffq.app.auth.apikeys import KeyStore

        with Redis.from_url(self.redis.url) as redis:
            HEADERS["Authorization"] = f"Bearer {KeyStore(redis).create('bench')[1]}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("wb") as log:
            process = subprocess.Popen([*diffq_command(), *args], stdout=log, stderr=subprocess.STDOUT,
                                       env={**self.env, **env})
        self.processes[name] = process
        return process

    def api(self, name: str = "api", **env: str) -> str:
        """Start `diffq api` on a free port; returns its URL once /healthz answers."""
        port = free_port()
        self.spawn(name, ["api", "--port", str(port)], **env)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: self._answers(f"{url}/healthz"), timeout=60, interval=0.1)
        return url

    def worker(self, name: str = "worker", model: Path = SHAPES, **env: str) -> subprocess.Popen[bytes]:
        return self.spawn(name, ["worker", "--model", str(model)], **env)

    def wait_models(self, url: str, names: set[str]) -> None:
        """Until every model in ``names`` is served by a live worker."""

        def served() -> bool:
            self.check_alive()
            try:
                models = httpx.get(f"{url}/v1/models", timeout=5, headers=HEADERS).json()["models"]
            except (httpx.HTTPError, KeyError, ValueError):
                return False
            return names <= {model["name"] for model in models}

        wait_for(served, timeout=300, interval=0.3)

    def _answers(self, url: str) -> bool:
        self.check_alive()
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"process(es) exited: {dead}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n" + (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                         for name in self.processes)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.redis.stop()
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


#: Seconds of each long poll (`GET /v1/jobs/{id}?wait=`). Under 5: redis-py >= 8 gives an asyncio
#: client a 5 s socket timeout by default, and the API's long poll blocks in XREAD for up to 5 s
#: (RECHECK_SECONDS) on a client made without one, so a longer poll of a job that publishes
#: nothing for 5 s (still queued) can end in a 503. Short polls sidestep that.
LONG_POLL = 4


def one_job(client: httpx.Client, prompt: str, seed: int, steps: int) -> dict[str, Any]:
    """One job through the service as a client runs it: POST, long poll until it ends, download its PNG;
    returns the ended job resource."""
    response = client.post("/v1/jobs", json={"prompt": prompt, "seed": seed, "steps": steps})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    while (job := client.get(f"/v1/jobs/{job_id}", params={"wait": LONG_POLL}).json())["status"] in (
        "queued",
        "running",
    ):
        pass
    assert job["status"] == "succeeded", job
    assert client.get(f"/v1/jobs/{job_id}/images/0.png").status_code == 200
    return job


async def wait_for_end(http: httpx.AsyncClient, job_id: str) -> dict:
    """Long-poll a job until it has ended; the job resource."""
    while True:
        response = await http.get(f"/v1/jobs/{job_id}", params={"wait": LONG_POLL})
        if response.status_code != 200:
            raise RuntimeError(f"GET /v1/jobs/{job_id}: {response.status_code} {response.text}")
        job = response.json()
        if job["status"] not in ("queued", "running"):
            return job
