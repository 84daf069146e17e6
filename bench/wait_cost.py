"""What waiting for a replica costs `POST /v1/jobs`: `python bench/wait_cost.py --seconds 5`.

One embedded redis-server as the primary and a second `redis-server --replicaof` it (both on
this machine), the bundled model announced as a live worker would (no worker process: jobs
only queue), and two `diffq api` processes on that same primary, side by side:

- `no WAIT`: `DIFFQ_REDIS_WAIT_REPLICAS=0`, a `202` as soon as the primary has the job;
- `WAIT 1`: `DIFFQ_REDIS_WAIT_REPLICAS=1`, a `202` once the replica has it too
  (docs/high-availability.md).

Both are driven in alternating rounds by an httpx asyncio load generator in this process,
with one connection (latency: each request waits for the one before) and with
`--connections` (throughput). Medians of the rounds are printed with the ratio WAIT / no WAIT.
The replica is on loopback: a replica in another zone adds its network round trip to WAIT.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import httpx
from _stack import HEADERS, Stack, wait_for
from enqueue_rate import BODY, register_model, run_httpx
from redis import Redis

from diffq.app.embedded_redis import find_redis_server, free_port


def start_replica(primary_port: int, directory: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", directory, "--replicaof", "127.0.0.1", str(primary_port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def synced() -> bool:
        try:
            with Redis(port=primary_port) as primary:
                replica = primary.info("replication").get("slave0")
            return isinstance(replica, dict) and replica.get("state") == "online"
        except Exception:
            return False

    wait_for(synced, timeout=30)
    return process, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()

    with Stack() as stack:
        replica, _ = start_replica(stack.redis.port, str(stack.log_dir))
        try:
            urls = {"no WAIT": stack.api("api-plain", DIFFQ_REDIS_WAIT_REPLICAS="0"),
                    "WAIT 1": stack.api("api-wait", DIFFQ_REDIS_WAIT_REPLICAS="1")}
            register_model(stack.redis.url)
            for url in urls.values():
                response = httpx.post(f"{url}/v1/jobs", json=BODY, timeout=10, headers=HEADERS)
                assert response.status_code == 202, response.text
            cases = [(name, connections) for connections in (1, args.connections) for name in urls]
            for name, connections in cases:  # warm-up
                run_httpx(f"{urls[name]}/v1/jobs", "POST", 1, connections)
            results: dict[tuple[str, int], list[dict[str, float]]] = {case: [] for case in cases}
            for round_ in range(args.rounds):
                for case in cases if round_ % 2 == 0 else list(reversed(cases)):
                    result = run_httpx(f"{urls[case[0]]}/v1/jobs", "POST", args.seconds, case[1])
                    results[case].append(result)
                    print(f"  round {round_ + 1}: {case[0]}, {case[1]} connection(s): {result['rate']:.0f}/s, "
                          f"p50 {result['p50']:.1f} ms", flush=True)
                    time.sleep(0.2)
        finally:
            replica.terminate()
            replica.wait()

    print(f"POST /v1/jobs on one primary with one replica (loopback), one `diffq api` per case, {args.seconds} s x "
          f"{args.rounds} rounds; load generator, APIs and both Redis share this machine's CPUs")
    print(f"{'case':>8} {'conns':>6} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'not 2xx':>8}")
    medians: dict[tuple[str, int], dict[str, float]] = {}
    for (name, connections), runs in results.items():
        medians[(name, connections)] = {key: statistics.median(run[key] for run in runs) for key in ("rate", "p50", "p99")}
        figure = medians[(name, connections)]
        print(f"{name:>8} {connections:>6} {figure['rate']:>8.0f} {figure['p50']:>7.2f} {figure['p99']:>7.2f} "
              f"{sum(run['bad'] for run in runs):>8.0f}")
    for connections in (1, args.connections):
        waited, plain = medians[("WAIT 1", connections)], medians[("no WAIT", connections)]
        print(f"WAIT 1 / no WAIT at {connections} connection(s): req/s x{waited['rate'] / plain['rate']:.2f}, "
              f"p50 latency x{waited['p50'] / plain['p50']:.2f} (+{waited['p50'] - plain['p50']:.2f} ms)")


if __name__ == "__main__":
    main()
