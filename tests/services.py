"""Real diffq processes for tests: `diffq api`, `diffq worker`, `diffq webhooks` on the test Redis.

Used by the tests that must cross process boundaries (races against a real
uvicorn server, a deliverer that runs beside a worker). Each process logs to a
file in the test's tmp_path; a process that dies while the test waits for it
fails the test with the tails of the logs.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from diffq.app.embedded_redis import free_port
from tests.helpers import clean_environment, diffq_command, wait_for


class Services:
    """Started processes by name, and the API's URL (if an API was started)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.url = ""
        self.headers: dict[str, str] = {}  # what a client of these processes sends (e.g. an API key)

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ---\n" + (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
            for name in self.processes
        )

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
        if dead:
            raise AssertionError(f"service process(es) exited: {dead}\n{self.logs()}")


@contextmanager
def services(
    redis_url: str, log_dir: Path, *, api: bool = True, worker: Path | None = None, webhooks: bool = False,
    ready: str = "/healthz", **environment: str,
) -> Iterator[Services]:
    """Start the asked-for processes with ``DIFFQ_*`` ``environment`` on top of a clean one;
    wait until the API answers ``ready`` with 200 (``/readyz`` also waits for the worker)."""
    env = clean_environment(DIFFQ_REDIS_URL=redis_url, DIFFQ_TORCH_THREADS="1", DIFFQ_HEARTBEAT_INTERVAL="1",
                            **environment)
    started = Services(log_dir)
    commands: list[tuple[str, list[str]]] = []
    if api:
        port = free_port()
        started.url = f"http://127.0.0.1:{port}"
        commands.append(("api", ["api", "--port", str(port)]))
    if worker is not None:
        commands.append(("worker", ["worker", "--model", str(worker)]))
    if webhooks:
        commands.append(("webhooks", ["webhooks"]))
    try:
        for name, args in commands:
            with (log_dir / f"{name}.log").open("wb") as log:
                started.processes[name] = subprocess.Popen(
                    [*diffq_command(), *args], stdout=log, stderr=subprocess.STDOUT, env=env
                )
        if api:

            def answers() -> bool:
                started.check_alive()
                try:
                    return httpx.get(f"{started.url}{ready}", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(answers, timeout=240, interval=0.2)
        yield started
    finally:
        for process in started.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in started.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
