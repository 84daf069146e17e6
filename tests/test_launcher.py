"""app/launcher.py: `diffq up` starts Redis, the API and a worker, serves jobs, and Ctrl-C stops them all."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from diffq.app.embedded_redis import free_port
from tests.helpers import children_of, clean_environment, diffq_command, is_alive, wait_for


@pytest.mark.slow
def test_up_serves_a_job_and_ctrl_c_stops_every_child(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "up.log"
    env = clean_environment(DIFFQ_MODEL_PATH=str(tiny_model), DIFFQ_TORCH_THREADS="1", DIFFQ_PORT="1")
    with log_path.open("wb") as log:
        up = subprocess.Popen([*diffq_command(), "up", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                              env=env)
    try:
        wait_for(lambda: b"diffq: ready at" in log_path.read_bytes() or up.poll() is not None, timeout=240,
                 interval=0.2)
        output = log_path.read_text(errors="replace")
        assert f"diffq: ready at http://127.0.0.1:{port}" in output, output
        assert "started embedded Redis at redis://127.0.0.1:" in output
        children = children_of(up.pid)
        assert len(children) == 4  # redis-server, the API, the webhook deliverer, the worker

        base = f"http://127.0.0.1:{port}"
        job = httpx.post(f"{base}/v1/jobs", json={"prompt": "a red circle", "steps": 2, "seed": 5}).json()
        done = wait_for(lambda: (j := httpx.get(f"{base}/v1/jobs/{job['id']}").json())["status"] == "succeeded" and j,
                        timeout=60, interval=0.2)
        png = httpx.get(done["images"][0]["url"])
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert not [pid for pid in children if is_alive(pid)]
    assert "diffq: stopped" in log_path.read_text(errors="replace")


def test_passwords_in_redis_urls_are_not_printed() -> None:
    from diffq.app.launcher import _without_password

    assert _without_password("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert _without_password("rediss://user:s3cret@redis:6380") == "rediss://user:***@redis:6380"
    assert _without_password("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
