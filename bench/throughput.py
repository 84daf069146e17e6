"""Images per second with 1, 4 and 16 concurrent clients, batching on vs off:
`python bench/throughput.py --jobs 32 --threads 1`.

One `diffq api` process and a `diffq worker` process per configuration, all serving the bundled
model on one embedded Redis under different names: `batch1` (DIFFQ_BATCH_MAX=1, one job per
pipeline call, as before batching) and `batch4` (DIFFQ_BATCH_MAX=4, the default; `--batch-max`
adds or replaces batching configurations, e.g. `--batch-max 4 8`). All load the same weights
with DIFFQ_TORCH_THREADS=`--threads`; every other setting is the default (20 steps, DPM-Solver++,
previews, progress, batch_wait_ms 5). Only one of them works at a time.

Each cell sends `--jobs` jobs (distinct prompts and seeds, the model's defaults otherwise)
from N concurrent clients, each of which POSTs a job, long-polls it until it has ended, then
sends its next one; images/s = jobs / wall time from the first POST to the last result. The
configurations alternate cell by cell (their order flips from one client count to the next)
so that all see the same machine load. Prints the table and the ratios: batching / no batching
at each N, and 16 clients with batching / 1 client without (one job at a time). Target: >= 1.5.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx
from _stack import HEADERS, Stack, wait_for_end

PROMPTS = [
    "a small red circle on the left, blue background",
    "a large yellow star at the top, black background",
    "a green square on the right, white background",
    "a small blue triangle at the bottom, orange background",
]


async def cell(url: str, model: str, clients: int, jobs: int, seed0: int) -> float:
    """Images per second for ``jobs`` jobs sent by ``clients`` concurrent clients."""
    sent = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < jobs:
            n = sent
            sent += 1
            body = {"prompt": PROMPTS[n % len(PROMPTS)], "seed": seed0 + n, "model": model}
            response = await http.post("/v1/jobs", json=body)
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            job = await wait_for_end(http, job_id)
            assert job["status"] == "succeeded", job

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits, headers=HEADERS) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return jobs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=32, help="jobs per cell")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each worker")
    parser.add_argument("--batch-max", type=int, nargs="+", default=[4],
                        help="DIFFQ_BATCH_MAX of the batching worker(s), one worker each (default: 4, the default)")
    args = parser.parse_args()
    configs = {1: "batch1", **{size: f"batch{size}" for size in args.batch_max}}  # batch_max -> model name

    with Stack(DIFFQ_TORCH_THREADS=str(args.threads)) as stack:
        url = stack.api()
        for size, model in configs.items():
            stack.worker(f"worker-{model}", DIFFQ_MODEL_NAME=model, DIFFQ_BATCH_MAX=str(size))
        stack.wait_models(url, set(configs.values()))
        for model in configs.values():  # warm-up: each worker's first jobs
            asyncio.run(cell(url, model, 2, 4, 0))
        rates: dict[tuple[int, int], list[float]] = {}
        seed = 1000
        for round_ in range(args.rounds):
            for clients in args.clients:
                order = list(configs) if (round_ + clients) % 2 == 0 else list(reversed(configs))
                for size in order:
                    rate = asyncio.run(cell(url, configs[size], clients, args.jobs, seed))
                    rates.setdefault((size, clients), []).append(rate)
                    seed += args.jobs
                    print(f"  round {round_ + 1}: {clients:>2} clients, batch_max {size}: {rate:.3f} images/s",
                          flush=True)

    median = {key: statistics.median(values) for key, values in rates.items()}
    sizes = list(configs)
    print(f"model=shapes steps=20 threads={args.threads} jobs/cell={args.jobs} rounds={args.rounds} "
          f"batch_wait_ms 5; batch_max 1 = batching off")
    print(f"{'clients':>8}" + "".join(f" {f'img/s b={size}':>12}" for size in sizes)
          + "".join(f" {f'b={size}/off':>9}" for size in sizes[1:]))
    for clients in args.clients:
        off = median[(1, clients)]
        print(f"{clients:>8}" + "".join(f" {median[(size, clients)]:>12.3f}" for size in sizes)
              + "".join(f" {median[(size, clients)] / off:>9.2f}" for size in sizes[1:]))
    one_at_a_time = median[(1, min(args.clients))]
    most = max(args.clients)
    for size in sizes[1:]:
        print(f"batch_max {size}: {most} clients / {min(args.clients)} client without batching (one at a time): "
              f"{median[(size, most)] / one_at_a_time:.2f}   (target >= 1.5)")


if __name__ == "__main__":
    main()
