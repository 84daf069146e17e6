"""Does a worker's memory stay flat over many jobs? `python bench/worker_memory.py --jobs 1000`.

Starts `diffq api` and one `diffq worker` (the bundled model, DIFFQ_TORCH_THREADS=`--threads`,
every other setting at its default: batching, previews, progress) on the embedded redis-server,
POSTs `--jobs` short jobs (`--steps` denoising steps each, distinct prompts and seeds), keeping
at most `--in-flight` of them unfinished so that the queue never runs dry, and samples the
worker process's resident set size (VmRSS) as jobs finish.

Prints RSS at every tenth of the jobs and the growth from the end of the warm-up (the first
`--warmup` jobs: first-call allocations, caches, allocator pools) to the end, and to the
largest sample after it. Target: growth < 5 %.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
from _stack import HEADERS, Stack, rss_bytes, wait_for_end

PROMPTS = [
    "a small red circle on the left, blue background",
    "a large yellow star at the top, black background",
    "a green square on the right, white background",
    "a small blue triangle at the bottom, orange background",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="DIFFQ_NAME=VALUE",
                        help="a setting for the worker (repeatable), e.g. DIFFQ_BATCH_MAX=1")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)

    with Stack(DIFFQ_TORCH_THREADS=str(args.threads)) as stack:
        url = stack.api()
        worker = stack.worker(**overrides)
        stack.wait_models(url, {"shapes"})
        samples: list[tuple[int, int]] = [(0, rss_bytes(worker.pid))]  # (jobs finished, RSS)
        started = time.perf_counter()

        async def drive() -> None:
            finished = 0
            next_job = 0
            gate = asyncio.Semaphore(args.in_flight)

            async def one(http: httpx.AsyncClient, n: int) -> None:
                nonlocal finished
                try:
                    body = {"prompt": PROMPTS[n % len(PROMPTS)], "seed": n, "steps": args.steps}
                    response = await http.post("/v1/jobs", json=body)
                    assert response.status_code == 202, response.text
                    job_id = response.json()["id"]
                    job = await wait_for_end(http, job_id)
                    assert job["status"] == "succeeded", job
                    finished += 1
                    if finished % 10 == 0 or finished == args.jobs:
                        samples.append((finished, rss_bytes(worker.pid)))
                finally:
                    gate.release()

            limits = httpx.Limits(max_connections=args.in_flight + 4)
            async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=HEADERS) as http:
                tasks = []
                while next_job < args.jobs:
                    await gate.acquire()
                    tasks.append(asyncio.create_task(one(http, next_job)))
                    next_job += 1
                await asyncio.gather(*tasks)

        asyncio.run(drive())
        elapsed = time.perf_counter() - started
        stack.check_alive()

    mib = 2**20
    print(f"model=shapes steps={args.steps} threads={args.threads} jobs={args.jobs} in {elapsed:.0f} s "
          f"({args.jobs / elapsed:.1f} jobs/s), in flight <= {args.in_flight}, settings: {' '.join(args.set) or 'defaults'}")
    print(f"{'jobs done':>10} {'worker RSS MiB':>15}")
    marks = sorted({0, args.warmup, *range(args.jobs // 10, args.jobs + 1, args.jobs // 10)})
    for mark in marks:
        done, rss = min(samples, key=lambda sample: abs(sample[0] - mark))
        print(f"{done:>10} {rss / mib:>15.1f}")
    warm = min(samples, key=lambda sample: abs(sample[0] - args.warmup))[1]
    after = [rss for done, rss in samples if done >= args.warmup]
    end = samples[-1][1]
    print(f"growth after warm-up ({args.warmup} jobs, {warm / mib:.1f} MiB): to the end {100 * (end - warm) / warm:+.1f} %, "
          f"to the peak {100 * (max(after) - warm) / warm:+.1f} %   (target < 5 %)")


if __name__ == "__main__":
    main()
