"""Whether clients polling in tight loops starve the worker: `nice -n 10 python bench/polling.py --jobs 32`.

One embedded Redis, one `diffq worker` on the bundled model (20 steps, the default, with
DIFFQ_TORCH_THREADS=`--threads`) and two `diffq api` processes on it, all on this machine: `paced`
with the default settings (plain reads of a job paced to DIFFQ_POLL_INTERVAL, diffq.app.api.polling)
and `unpaced` with DIFFQ_POLL_INTERVAL=0 (every read answered at once, as before pacing). Each
cell sends `--jobs` jobs from `--clients` concurrent clients; each client POSTs a job, waits for
it to end, then sends its next one:

- `long poll`: waits with `GET /v1/jobs/{id}?wait=4` (bench/_stack.py's `wait_for_end`), on `paced`;
- `10 ms polls`: `GET /v1/jobs/{id}` every `--interval` seconds (10 ms) after each answer, on
  `paced`, then on `unpaced`.

Images/s = jobs / wall time from the first POST to the last result. The cells alternate (their
order reversed every round) so that all see the same machine load. Printed: the table (images/s,
the GETs answered, the answering API process's CPU seconds per job), and each polling cell's
images/s over the long-poll cell's (target: >= 0.9 for the paced one).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx
from _stack import HEADERS, Stack, cpu_seconds, wait_for_end
from throughput import PROMPTS


async def cell(url: str, clients: int, jobs: int, seed0: int, interval: float | None) -> tuple[float, int]:
    """(images per second, GETs sent) for ``jobs`` jobs from ``clients`` clients; ``interval``
    None: long polls, else plain reads that far apart."""
    sent, gets = 0, 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent, gets
        while sent < jobs:
            n = sent
            sent += 1
            response = await http.post("/v1/jobs", json={"prompt": PROMPTS[n % len(PROMPTS)], "seed": seed0 + n})
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            if interval is None:
                job = await wait_for_end(http, job_id)
            else:
                while True:
                    answer = await http.get(f"/v1/jobs/{job_id}")
                    gets += 1
                    if answer.status_code == 429:  # polling_too_fast: as a tight loop would, come back soon
                        await asyncio.sleep(interval)
                        continue
                    assert answer.status_code == 200, answer.text
                    job = answer.json()
                    if job["status"] not in ("queued", "running"):
                        break
                    await asyncio.sleep(interval)
            assert job["status"] == "succeeded", job

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits, headers=HEADERS) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return jobs / (time.perf_counter() - started), gets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=32, help="jobs per cell")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between a poller's reads")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the worker")
    args = parser.parse_args()

    with Stack(DIFFQ_TORCH_THREADS=str(args.threads)) as stack:
        urls = {"paced": stack.api("api-paced"), "unpaced": stack.api("api-unpaced", DIFFQ_POLL_INTERVAL="0")}
        stack.worker()
        stack.wait_models(urls["paced"], {"shapes"})
        asyncio.run(cell(urls["paced"], 2, 4, 0, None))  # warm-up: the worker's first jobs
        cells = {"long poll": ("paced", None), f"{args.interval * 1000:g} ms polls, paced": ("paced", args.interval),
                 f"{args.interval * 1000:g} ms polls, unpaced": ("unpaced", args.interval)}
        pids = {name: stack.processes[f"api-{name}"].pid for name in urls}
        results: dict[str, list[tuple[float, int, float]]] = {name: [] for name in cells}
        seed = 1000
        for round_ in range(args.rounds):
            for name in (list(cells) if round_ % 2 == 0 else list(reversed(cells))):
                api, interval = cells[name]
                before = cpu_seconds(pids[api])
                rate, gets = asyncio.run(cell(urls[api], args.clients, args.jobs, seed, interval))
                cpu = (cpu_seconds(pids[api]) - before) / args.jobs
                seed += args.jobs
                results[name].append((rate, gets, cpu))
                print(f"  round {round_ + 1}: {name}: {rate:.3f} images/s, {gets} GETs, API CPU {cpu:.2f} s/job",
                      flush=True)

    print(f"model=shapes steps=20 threads={args.threads} clients={args.clients} jobs/cell={args.jobs} "
          f"rounds={args.rounds}; clients, API processes, worker and Redis share this machine's CPUs")
    print(f"{'clients wait by':>26} {'images/s':>9} {'GETs/job':>9} {'API CPU s/job':>14} {'/ long poll':>12}")
    base = statistics.median(rate for rate, _, _ in results["long poll"])
    for name, runs in results.items():
        rate = statistics.median(r for r, _, _ in runs)
        gets = statistics.median(g for _, g, _ in runs) / args.jobs
        cpu = statistics.median(c for _, _, c in runs)
        print(f"{name:>26} {rate:>9.3f} {gets:>9.1f} {cpu:>14.3f} {rate / base:>12.2f}")
    print("target: paced polling >= 0.9 x long polling")


if __name__ == "__main__":
    main()
