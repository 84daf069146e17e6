"""Scale-out as docker-compose.yml runs it, with local processes instead of containers.

What the containers would run is read from the files that define them, so this test and the
deployment cannot drift apart: the commands are the Dockerfiles' ENTRYPOINT + CMD (or the
service's `command`), the environment is what `docker-compose config` resolves for the
GPU-less variant (docker-compose.yml + docker-compose.cpu.yml) on top of the images' ENV,
and Redis gets the compose file's own redis-server arguments (AOF, noeviction, the password).
Only the addresses change: Redis and the API listen on free loopback ports, DIFFQ_REDIS_URL
points at that Redis with the same password, and the shared `results` volume (the result store,
DIFFQ_STORE_DIR=/results) is a folder of the test that the API and both workers share. Then one API and two workers on the bundled shapes
model take a burst of jobs; both workers must take part and every job must succeed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from redis import Redis
from redis.exceptions import AuthenticationError, ResponseError

from diffq.app.embedded_redis import find_redis_server, free_port
from tests.helpers import clean_environment, diffq_command, wait_for
from tests.containers import (
    API_DOCKERFILE,
    COMPOSE,
    COMPOSE_CPU,
    PASSWORD,
    WORKER_DOCKERFILE,
    exec_form,
    image_env,
    resolved,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

JOBS = 8
JOB = {"prompt": "a small red circle on the left, blue background", "steps": 20}


def container_command(service: dict, dockerfile: Path) -> list[str]:
    """The process a container of ``service`` runs: ENTRYPOINT + (the service's command, else CMD),
    with the image's `diffq` replaced by this venv's."""
    entrypoint = service.get("entrypoint") or exec_form(dockerfile, "ENTRYPOINT")
    command = service.get("command") or exec_form(dockerfile, "CMD")
    argv = [*entrypoint, *command]
    assert argv[0] == "diffq", argv
    return [*diffq_command(), *argv[1:]]


def container_environment(service: dict, dockerfile: Path, redis_url: str, **overrides: str) -> dict[str, str]:
    """The image's DIFFQ_* ENV, then the service's environment (unset pass-through keys left out),
    with DIFFQ_REDIS_URL moved from the compose network's `redis` to ``redis_url``."""
    env = {k: v for k, v in image_env(dockerfile).items() if k.startswith("DIFFQ_")}
    env.update({k: str(v) for k, v in service["environment"].items() if v is not None})
    compose_url = urlsplit(env["DIFFQ_REDIS_URL"])
    local = urlsplit(redis_url)
    assert compose_url.hostname == "redis" and compose_url.password == PASSWORD, env["DIFFQ_REDIS_URL"]
    env["DIFFQ_REDIS_URL"] = urlunsplit(compose_url._replace(netloc=f":{PASSWORD}@{local.hostname}:{local.port}"))
    env.update(overrides)
    return clean_environment(**env)


@pytest.fixture
def config() -> dict:
    return resolved(COMPOSE, COMPOSE_CPU)


@pytest.fixture
def compose_redis(config: dict, tmp_path: Path) -> Iterator[str]:
    """redis-server with the compose file's arguments (AOF everysec, noeviction, --requirepass),
    on a free loopback port; yields its URL (without the password)."""
    command = config["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()
    process = subprocess.Popen(
        [find_redis_server(), *command[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--logfile", str(tmp_path / "redis.log")],
        stdin=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(f"redis://:{PASSWORD}@127.0.0.1:{port}/0")

    def answers() -> bool:
        assert process.poll() is None, (tmp_path / "redis.log").read_text(errors="replace")[-2000:]
        try:
            return bool(client.ping())
        except Exception:
            return False

    try:
        wait_for(answers, timeout=15)
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=15)


def test_two_workers_share_a_burst_of_jobs_as_the_compose_file_runs_them(
    config: dict, compose_redis: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    services = config["services"]
    authed = Redis.from_url(f"redis://:{PASSWORD}@{urlsplit(compose_redis).netloc}/0")
    with pytest.raises((AuthenticationError, ResponseError)):  # --requirepass, as in the compose file
        Redis.from_url(compose_redis).set("diffq:probe", "1")
    assert authed.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert authed.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api_env = container_environment(
        services["api"], API_DOCKERFILE, compose_redis, DIFFQ_HOST="127.0.0.1", DIFFQ_PORT=str(port)
    )
    # One torch thread per worker: two workers on a 2-core machine shared with other work.
    worker_env = container_environment(services["worker"], WORKER_DOCKERFILE, compose_redis, DIFFQ_TORCH_THREADS="1")
    assert worker_env["DIFFQ_DEVICE"] == "cpu" and "DIFFQ_MODEL_PATH" not in worker_env  # the bundled model
    results = tmp_path / "results"  # the `results` volume, mounted at /results in the API and every worker
    results.mkdir()
    for name, env in (("api", api_env), ("worker", worker_env)):
        assert (env["DIFFQ_STORE"], env["DIFFQ_STORE_DIR"]) == ("file", "/results"), name
        assert {"type": "volume", "source": "results", "target": "/results"}.items() <= [
            v for v in services[name]["volumes"] if v["target"] == "/results"][0].items(), name
        env["DIFFQ_STORE_DIR"] = str(results)

    processes: dict[str, subprocess.Popen[bytes]] = {}

    def logs() -> str:
        return "\n".join(
            f"--- {name} ---\n" + (tmp_path / f"{name}.log").read_text(errors="replace")[-2500:] for name in processes
        )

    def spawn(name: str, command: list[str], env: dict[str, str]) -> None:
        with (tmp_path / f"{name}.log").open("wb") as log:
            processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    try:
        spawn("api", container_command(services["api"], API_DOCKERFILE), api_env)
        for n in (1, 2):
            spawn(f"worker{n}", container_command(services["worker"], WORKER_DOCKERFILE), worker_env)

        def two_workers_listen() -> bool:
            dead = {name: p.returncode for name, p in processes.items() if p.poll() is not None}
            assert not dead, f"exited: {dead}\n{logs()}"
            try:
                models = httpx.get(f"{url}/v1/models", timeout=2).json()["models"]
            except (httpx.HTTPError, KeyError, ValueError):
                return False
            # Registered with the API's view of the models, and both RQ workers on the queue.
            return (
                len(models) == 1 and len(models[0]["workers"]) == 2
                and authed.scard(f"rq:workers:diffq:{models[0]['name']}") == 2
            )

        wait_for(two_workers_listen, timeout=150, interval=0.3)
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        ready_after = time.monotonic() - started

        burst_at = time.monotonic()
        ids = []
        for seed in range(JOBS):
            response = httpx.post(f"{url}/v1/jobs", json={**JOB, "seed": seed}, timeout=10)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])

        def finished(job_id: str) -> dict:
            return wait_for(
                lambda: (job := httpx.get(f"{url}/v1/jobs/{job_id}", params={"wait": 10}, timeout=20).json())
                and job["status"] in ("succeeded", "failed", "canceled") and job,
                timeout=150, interval=0.1,
            )

        jobs = [finished(job_id) for job_id in ids]
        burst_took = time.monotonic() - burst_at
        assert [job["status"] for job in jobs] == ["succeeded"] * JOBS, [(j["status"], j["error"]) for j in jobs]
        assert all(len(job["images"]) == 1 for job in jobs)
        image = httpx.get(jobs[-1]["images"][0]["url"], timeout=10)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        assert len(list(results.rglob("*.png"))) == JOBS  # images in the shared store, written by both workers

        ran_on = [json.loads(authed.hget(f"diffq:job:{job_id}", "worker")) for job_id in ids]
        pids = {int(worker_id.split(".")[-2]) for worker_id in ran_on}
        assert pids == {processes["worker1"].pid, processes["worker2"].pid}, ran_on
        print(
            f"\n[scaleout] ready {ready_after:.1f} s; {JOBS} jobs x {JOB['steps']} steps in {burst_took:.1f} s; "
            f"per worker: {sorted(ran_on.count(w) for w in set(ran_on))}"
        )
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        authed.close()
