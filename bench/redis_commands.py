"""Redis commands per job: `python bench/redis_commands.py --jobs 20 --threads 1`.

`--jobs` jobs of the bundled model (`--steps` steps each, default 20), one at a time, through
real processes: a client POSTs each job to a `diffq api` process (API keys on, as deployed),
long-polls it (`GET /v1/jobs/{id}?wait=4`) until it has ended and downloads its PNG; a
`diffq worker` process (every setting at its default: progress, previews, cancel checks,
heartbeats, batching) runs it; all on the embedded redis-server of diffq.app.embedded_redis.

Counted two ways over the measured jobs (after two warm-up jobs):

- `INFO commandstats` before and after: every command Redis executed, commands run inside Lua
  scripts included (each `redis.call` counts, as does the EVALSHA around it);
- `MONITOR` during the run, each command attributed to the process that sent it (a client's
  port mapped to its process through psutil; a command run inside a script to the client whose
  EVAL/EVALSHA runs it): worker, api, or this benchmark.

Prints commands per job by command (the top ones) and in total, and per process. What the
processes issue with no job at all (heartbeats, sweeps, RQ's blocking dequeue: a rate per
second, measured first for `--idle` seconds) is counted in the jobs' figures too; the line
"per job less that rate" takes it out: what each further job costs a busy deployment.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import threading
import time
from collections import Counter

import httpx
import psutil
from _stack import HEADERS, Stack, one_job
from redis import Redis

PROMPT = "a small red circle on the left, blue background"
_LINE = re.compile(rb'^\+[\d.]+ \[\d+ (?P<client>[^\]]+)\] "(?P<command>[^"]+)"')


def command_counts(redis: Redis) -> Counter[str]:
    """Calls per command since the server started (``INFO commandstats``)."""
    return Counter({name.removeprefix("cmdstat_").upper(): stats["calls"]
                    for name, stats in redis.info("commandstats").items()})


class Attribution:
    """Reads ``MONITOR`` in a thread and counts each command under the process that sent it."""

    def __init__(self, redis: Redis, processes: dict[str, int], log: str | None = None) -> None:
        self.redis = redis
        self.log = open(log, "w") if log else None  # noqa: SIM115 (written by the thread until exit)
        self.port = redis.connection_pool.connection_kwargs["port"]
        self.processes = processes  # name -> pid; their children count as them (not this process's)
        self.owner: dict[str, str] = {}  # client "host:port" -> process name
        self.counts: dict[str, Counter[str]] = {}
        self.counting = False
        self._thread = threading.Thread(target=self._read, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _map_ports(self) -> None:
        for name, pid in self.processes.items():
            try:
                parent = psutil.Process(pid)
                family = [parent] if pid == os.getpid() else [parent, *parent.children(recursive=True)]
                for process in family:
                    for connection in process.net_connections(kind="tcp"):
                        if connection.raddr and connection.raddr.port == self.port:
                            self.owner[f"{connection.laddr.ip}:{connection.laddr.port}"] = name
            except psutil.Error:
                continue

    def _process_of(self, client: str) -> str:
        if client not in self.owner:
            self._map_ports()
        return self.owner.get(client, "unknown (closed before it was mapped)")

    def _read(self) -> None:
        # A plain socket: each MONITOR line is one "+<time> [<db> <client>] "<COMMAND>" ..." line
        # (binary arguments escaped), which redis-py's parser trips over for PNG bytes.
        scripted_by = "unknown"
        options = self.redis.connection_pool.connection_kwargs
        with socket.create_connection((options.get("host", "127.0.0.1"), self.port)) as connection:
            if options.get("password"):
                connection.sendall(f"AUTH {options['password']}\r\n".encode())
            connection.sendall(b"MONITOR\r\n")
            for raw in connection.makefile("rb"):
                match = _LINE.match(raw)
                if match is None:
                    continue
                client, command = match["client"].decode(), match["command"].decode().upper()
                if client == "lua":
                    process = scripted_by
                else:
                    process = self._process_of(client)
                    if command in ("EVAL", "EVALSHA"):
                        scripted_by = process
                if self.counting:
                    self.counts.setdefault(process, Counter())[command] += 1
                    if self.log is not None:
                        self.log.write(f"{process:>8} {raw.decode(errors='replace')[:300].rstrip()}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="measured jobs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in the worker")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=16, help="commands listed by name (the rest summed)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds without jobs measured first")
    parser.add_argument("--log", metavar="PATH", help="write every counted command, with its process, to PATH")
    parser.add_argument("--set", action="append", default=[], metavar="DIFFQ_NAME=VALUE",
                        help="a setting for the API and worker processes (repeatable)")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)

    with Stack(DIFFQ_TORCH_THREADS=str(args.threads), **overrides) as stack:
        url = stack.api()
        stack.worker()
        stack.wait_models(url, {"shapes"})
        client = httpx.Client(base_url=url, timeout=120, headers=HEADERS)

        for seed in range(2):  # warm-up: the worker's first job, script loading, connections
            one_job(client, PROMPT, seed, args.steps)
        redis = Redis.from_url(stack.redis.url)
        watcher = Attribution(Redis.from_url(stack.redis.url), {
            "worker": stack.processes["worker"].pid, "api": stack.processes["api"].pid, "bench": os.getpid()}, args.log)
        watcher.start()
        time.sleep(0.5)
        idle_before = command_counts(redis)
        time.sleep(args.idle)  # no job: heartbeats, sweeps, RQ's blocking dequeue
        idle = command_counts(redis) - idle_before
        idle["INFO"] -= 1
        watcher.counting = True
        before = command_counts(redis)
        started = time.perf_counter()
        for n in range(args.jobs):
            one_job(client, PROMPT, 1000 + n, args.steps)
        elapsed = time.perf_counter() - started
        after = command_counts(redis)
        time.sleep(0.3)  # MONITOR's feed catches up
        watcher.counting = False
        client.close()
        redis.close()

    total = after - before
    total["INFO"] -= 1  # the `after` call itself
    jobs = args.jobs
    print(f"model=shapes steps={args.steps} threads={args.threads} jobs={jobs} (one at a time, one long-polling "
          f"client, keys on) settings: {' '.join(args.set) or 'defaults'}; {elapsed / jobs:.2f} s/job")
    print(f"Redis commands per job (INFO commandstats, commands inside scripts included): "
          f"{sum(total.values()) / jobs:.1f}")
    idle_rate = sum(idle.values()) / args.idle
    print(f"idle (no job, {args.idle:.0f} s): {idle_rate:.1f} commands/s (worker heartbeats and sweeps, RQ's dequeue, "
          f"the API's own timers); per job less that rate over the job's {elapsed / jobs:.2f} s: "
          f"{sum(total.values()) / jobs - idle_rate * elapsed / jobs:.1f}")
    by_process = {name: counts for name, counts in sorted(watcher.counts.items()) if name != "bench"}
    names = [name for name, _ in total.most_common() if total[name] > 0]
    shown, rest = names[:args.top], names[args.top:]
    print(f"{'command':>18} {'per job':>8}  " + " ".join(f"{name[:10]:>10}" for name in by_process))
    for name in shown:
        print(f"{name:>18} {total[name] / jobs:>8.1f}  "
              + " ".join(f"{counts[name] / jobs:>10.1f}" for counts in by_process.values()))
    if rest:
        print(f"{'(others)':>18} {sum(total[name] for name in rest) / jobs:>8.1f}  "
              + " ".join(f"{sum(counts[name] for name in rest) / jobs:>10.1f}" for counts in by_process.values()))
    print(f"{'total':>18} {sum(total.values()) / jobs:>8.1f}  "
          + " ".join(f"{sum(counts.values()) / jobs:>10.1f}" for counts in by_process.values()))
    print("(per process: from MONITOR; a command run inside a script counts under the process that ran the script)")


if __name__ == "__main__":
    main()
