"""Small helpers the service tests share (plain functions, no fixtures)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from PIL import Image

from app.settings import Settings

if TYPE_CHECKING:
    from model.engine import Engine

T = TypeVar("T")


def work(settings: Settings, engine: Engine) -> bool:
    """Run a real diffq worker in this process until its queue is empty."""
    from worker.service import run_worker

    return run_worker(settings, engine=engine, burst=True)


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
