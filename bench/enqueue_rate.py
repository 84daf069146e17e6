"""How many jobs one API process accepts per second: `python bench/enqueue_rate.py --seconds 10`.

Starts one `diffq api` process (one uvicorn process, default settings) on the embedded
redis-server of diffq.app.embedded_redis, registers the bundled model as a live worker would
(tests/conftest.py's `served` fixture: the model's limits under a heartbeat key, no worker
process, so jobs only queue up), then drives it with a load generator for `--seconds` seconds
per measurement:

- `POST /v1/jobs` with a small JSON text-to-image request (validated against the model,
  written as a job record, an RQ job and a `queued` event in one MULTI): the figure asked for,
  target >= 2,000/s;
- `GET /healthz` (no Redis, no validation) on the same process: the ceiling of the HTTP stack
  itself on this machine, for scale.

API keys are on (`DIFFQ_AUTH=keys`, as `_stack.Stack` sets): every POST is checked and counted
against its key's rate. Besides requests/s, the API process's CPU time per request is printed
(from /proc): on a machine the load generator and other work share, it says what the API
process itself costs per request, and its ratio is what the rates' ratio would be with a core of
its own.

The two alternate for `--rounds` rounds; medians are printed, with p50/p99 latency and any
answer that is not 2xx. The load generator is `wrk` (Debian's `apt-get install wrk`) when it is
on PATH, else an httpx asyncio generator in this process (`--generator httpx`); either way it
runs on the same machine as the API and Redis and takes CPU from them: on a small machine the
figure is a lower bound of what the API process could serve.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from _stack import HEADERS, SHAPES, Stack, cpu_seconds, percentile

BODY = {"prompt": "a small red circle on the left, blue background", "seed": 42}


def register_model(redis_url: str) -> None:
    """Announce the bundled model as a live worker would, for an hour (no worker process)."""
    from redis import Redis

    from diffq.app.contract.records import WorkerRecord, utcnow
    from diffq.app.contract.registry import Registry
    from diffq.app.contract.tasks import queue_name
    from diffq.model.engine import Engine
    from diffq.worker.service import model_record

    model = model_record(Engine.load(SHAPES))
    now = utcnow()
    worker = WorkerRecord(id="bench-worker", model=model.name, device=model.device, dtype=model.dtype,
                          host="localhost", pid=1, queue=queue_name(model.name), started_at=now, heartbeat_at=now)
    Registry(Redis.from_url(redis_url), ttl=3600).announce(worker, model)


def run_wrk(url: str, method: str, seconds: int, connections: int, threads: int) -> dict[str, float]:
    script = ""
    if method == "POST":
        script = (f"wrk.method = 'POST'\nwrk.body = '{json.dumps(BODY)}'\n"
                  "wrk.headers['Content-Type'] = 'application/json'\n"
                  f"wrk.headers['Authorization'] = '{HEADERS['Authorization']}'\n")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(script)
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", lua.name, url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    Path(lua.name).unlink()

    def latency_ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    requests = int(re.search(r"(\d+) requests in", output).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {"rate": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)), "requests": requests,
            "p50": latency_ms("50"), "p99": latency_ms("99"),
            "bad": (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0)}


def run_httpx(url: str, method: str, seconds: int, connections: int) -> dict[str, float]:
    async def drive() -> dict[str, float]:
        latencies: list[float] = []
        bad = 0
        deadline = time.perf_counter() + seconds
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(timeout=30, limits=limits, headers=HEADERS) as http:

            async def one_connection() -> None:
                nonlocal bad
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    if method == "POST":
                        response = await http.post(url, json=BODY)
                    else:
                        response = await http.get(url)
                    latencies.append(1000 * (time.perf_counter() - started))
                    bad += not 200 <= response.status_code < 300

            started = time.perf_counter()
            await asyncio.gather(*(one_connection() for _ in range(connections)))
            elapsed = time.perf_counter() - started
        return {"rate": len(latencies) / elapsed, "requests": len(latencies), "p50": percentile(latencies, 50),
                "p99": percentile(latencies, 99), "bad": bad}

    return asyncio.run(drive())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--generator", choices=["wrk", "httpx"], default="wrk" if shutil.which("wrk") else "httpx")
    args = parser.parse_args()

    with Stack() as stack:
        url = stack.api()
        register_model(stack.redis.url)
        assert httpx.post(f"{url}/v1/jobs", json=BODY, timeout=10, headers=HEADERS).status_code == 202  # the model is served

        api_pid = stack.processes["api"].pid

        def measure(method: str, path: str, seconds: int) -> dict[str, float]:
            before = cpu_seconds(api_pid)
            if args.generator == "wrk":
                result = run_wrk(f"{url}{path}", method, seconds, args.connections, args.wrk_threads)
            else:
                result = run_httpx(f"{url}{path}", method, seconds, args.connections)
            # CPU the API process spent per request: what its rate would be on a core of its own.
            result["cpu_ms"] = 1000 * (cpu_seconds(api_pid) - before) / max(1, result["requests"])
            return result

        cases = {"POST /v1/jobs": ("POST", "/v1/jobs"), "GET /healthz": ("GET", "/healthz")}
        for method, path in cases.values():  # warm-up
            measure(method, path, 2)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
        for round_ in range(args.rounds):
            for name in (cases if round_ % 2 == 0 else reversed(list(cases))):
                result = measure(*cases[name], args.seconds)
                results[name].append(result)
                print(f"  round {round_ + 1}: {name}: {result['rate']:.0f}/s", flush=True)
        from redis import Redis

        queued = Redis.from_url(stack.redis.url).llen("rq:queue:diffq:shapes")

    print(f"one `diffq api` process (uvicorn, default settings), {args.connections} connections, "
          f"{args.generator}{f' -t{args.wrk_threads}' if args.generator == 'wrk' else ''}, {args.seconds} s x "
          f"{args.rounds} rounds; load generator, API and Redis share this machine's CPUs")
    print(f"{'request':>14} {'req/s (median)':>15} {'min':>7} {'max':>7} {'p50 ms':>7} {'p99 ms':>7} {'not 2xx':>8} "
          f"{'API CPU ms/req':>15}")
    for name, runs in results.items():
        rates = [run["rate"] for run in runs]
        print(f"{name:>14} {statistics.median(rates):>15.0f} {min(rates):>7.0f} {max(rates):>7.0f} "
              f"{statistics.median(run['p50'] for run in runs):>7.1f} "
              f"{statistics.median(run['p99'] for run in runs):>7.1f} {sum(run['bad'] for run in runs):>8.0f} "
              f"{statistics.median(run['cpu_ms'] for run in runs):>15.3f}")
    post = statistics.median(run["rate"] for run in results["POST /v1/jobs"])
    health = statistics.median(run["rate"] for run in results["GET /healthz"])
    post_cpu = statistics.median(run["cpu_ms"] for run in results["POST /v1/jobs"])
    health_cpu = statistics.median(run["cpu_ms"] for run in results["GET /healthz"])
    print(f"POST /v1/jobs / GET /healthz: {post / health:.2f} (requests/s, target >= 0.5); "
          f"{health_cpu / post_cpu:.2f} (by the API process's CPU per request); "
          f"jobs queued in Redis at the end: {queued}")


if __name__ == "__main__":
    main()
