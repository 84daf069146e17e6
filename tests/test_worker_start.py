"""A worker started while Redis is down (a restart, a rolling deploy) waits for it instead of exiting."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from redis import Redis

from diffq.app.contract.registry import Registry
from diffq.app.embedded_redis import EmbeddedRedis, free_port
from tests.helpers import clean_environment, diffq_command, wait_for


@pytest.mark.slow
def test_a_worker_started_before_redis_waits_and_then_serves(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([*diffq_command(), "worker", "--model", str(tiny_model)], stdout=log,
                              stderr=subprocess.STDOUT,
                              env=clean_environment(DIFFQ_REDIS_URL=f"redis://127.0.0.1:{port}/0",
                                                    DIFFQ_TORCH_THREADS="1", DIFFQ_HEARTBEAT_INTERVAL="1"))
    server = EmbeddedRedis(port=port)
    try:
        deadline = time.monotonic() + 60
        while "Redis unreachable at start" not in (tmp_path / "worker.log").read_text() and time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(0.5)
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
        server.start()
        redis = Redis.from_url(server.url)
        wait_for(lambda: Registry(redis, 10).served_models(), timeout=60)
        assert worker.poll() is None
    finally:
        worker.terminate()
        worker.wait(30)
        server.stop()
