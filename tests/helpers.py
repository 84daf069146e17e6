"""Small helpers the service tests share (plain functions, no fixtures)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from PIL import Image
from redis import Redis

from diffq.app.settings import Settings

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

    from diffq.model.engine import Engine

T = TypeVar("T")


def work(settings: Settings, engine: Engine) -> bool:
    """Run a real diffq worker in this process until its queue is empty."""
    from diffq.worker.service import run_worker

    return run_worker(settings, engine=engine, burst=True)


def while_working(settings: Settings, engine: Engine, client_side: Callable[[dict], None]) -> dict:
    """Run ``client_side(results)`` in a thread while a worker works in this thread (RQ's worker
    installs signal handlers, so it must own the main thread); returns what the client side recorded."""
    import threading

    results: dict = {}

    def client() -> None:
        try:
            client_side(results)
        except BaseException as error:  # surfaced in the test's thread below
            results["error"] = error

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    work(settings, engine)
    thread.join(timeout=60)
    if "error" in results:
        raise results["error"]
    return results


def post(client: TestClient, body: dict) -> str:
    """``POST /v1/jobs``; the new job's id (asserting the 202)."""
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def job_of(client: TestClient, job_id: str) -> dict:
    """The job resource, as ``GET /v1/jobs/{id}`` answers it."""
    return client.get(f"/v1/jobs/{job_id}").json()


def wait_for(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05) -> T:
    """Poll until ``condition()`` is truthy and return it; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def png_text(png: bytes) -> dict[str, str]:
    """The text chunks of a PNG."""
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        return dict(image.text)


TINY_JOB = {"prompt": "a red circle", "steps": 2, "seed": 7}
"""A request the tiny test model runs in milliseconds."""


def diffq_command() -> list[str]:
    """The installed ``diffq`` console script next to this interpreter (``python -m diffq.app.cli`` if absent)."""
    import shutil
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "diffq"
    if script.exists():
        return [str(script)]
    found = shutil.which("diffq")
    return [found] if found else [sys.executable, "-m", "diffq.app.cli"]


def clean_environment(**overrides: str) -> dict[str, str]:
    """This process' environment without DIFFQ_* variables, plus ``overrides``. Auth is off
    unless ``overrides`` turn it on (DIFFQ_AUTH=keys)."""
    import os

    env = {name: value for name, value in os.environ.items() if not name.startswith("DIFFQ_")}
    env["DIFFQ_AUTH"] = "off"
    env.update(overrides)
    return env


def children_of(pid: int) -> list[int]:
    """Direct children of a process, read from /proc (Linux)."""
    from pathlib import Path

    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def is_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    from pathlib import Path

    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def input_key(job_id: str, name: str) -> str:
    """The Redis key of an editing job's stored input with ``DIFFQ_STORE=redis`` (the default)."""
    from diffq.app.contract import keys
    from diffq.app.storage import objects

    return keys.stored_object(objects.job_input(job_id, name))


def stored_objects(redis: Redis, job_id: str) -> list[str]:
    """Keys of a job's objects (images, journeys, inputs) in the ``redis`` result store."""
    from diffq.app.contract import keys

    return sorted(key.decode() for key in redis.scan_iter(match=keys.stored_object(f"{job_id}/*")))
