"""Catalog batches: how fast 10,000 items are accepted, side by side with single POSTs, and the
API's memory while it streams a 1,000-image archive: `python bench/batches.py`.

Starts one `diffq api` process (API keys on, as deployed) on an embedded redis-server and
registers the bundled model as a live worker would (no worker process: jobs only queue up).

1. Accept: `--singles` single `POST /v1/jobs` (16 connections at once, an httpx asyncio load
   generator in this process), then `POST /v1/batches` with `--items` items in one request,
   `--rounds` times each; prints the medians, the CPU seconds the API process and redis-server
   spent per batch (less moved by the machine's load than the wall time), and how long the same
   items would take as single POSTs at the measured rate.
2. Zip: a batch of `--zip-items` items, each ended `succeeded` with one `--image-kb` KiB PNG of
   noise written as a worker writes it (claimed, then finished through ``JobStore``, the image
   in Redis), then `GET .../images.zip` read by a streaming client while the RSS of a second,
   fresh API process (it served only this batch's submit and reads) is sampled every 10 ms:
   the growth is printed beside the archive's size. `--zip-items 0` skips it.

The load generator, Redis and the API share this machine's CPUs, so every figure is a lower
bound of what the API process alone could do.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import threading
import time
import uuid

import httpx
from _stack import HEADERS, Stack, cpu_seconds, rss_bytes
from enqueue_rate import register_model

JOB = {"prompt": "a small red circle on the left, blue background", "steps": 4}


async def singles(url: str, count: int, connections: int = 16) -> float:
    """Seconds to POST ``count`` single jobs over ``connections`` connections."""
    remaining = iter(range(count))
    async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=60,
                                 limits=httpx.Limits(max_connections=connections)) as http:
        async def one() -> None:
            for n in remaining:
                response = await http.post("/v1/jobs", json={**JOB, "seed": n})
                assert response.status_code == 202, response.text

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(connections)))
        return time.perf_counter() - started


def batch(url: str, count: int, api_pid: int, redis_pid: int) -> tuple[float, float, float]:
    """Seconds to answer one ``POST /v1/batches`` of ``count`` items, and the CPU seconds the API
    process and redis-server spent meanwhile (which the machine's load moves less than the wall time)."""
    items = [{**JOB, "seed": n, "custom_id": f"sku-{n}"} for n in range(count)]
    body = json.dumps({"items": items}).encode()
    with httpx.Client(base_url=url, headers={**HEADERS, "Content-Type": "application/json"}, timeout=120) as http:
        cpu, redis_cpu, started = cpu_seconds(api_pid), cpu_seconds(redis_pid), time.perf_counter()
        response = http.post("/v1/batches", content=body)
        took, cpu, redis_cpu = (time.perf_counter() - started, cpu_seconds(api_pid) - cpu,
                                cpu_seconds(redis_pid) - redis_cpu)
    assert response.status_code == 202, response.text
    return took, cpu, redis_cpu


def noise_png(kib: int) -> bytes:
    from PIL import Image

    side = int((kib * 1024 / 3) ** 0.5)
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=0)
    return out.getvalue()


def finish_all(redis_url: str, job_ids: list[str], png: bytes) -> None:
    """End every job ``succeeded`` with ``png`` as a worker would (claim, then one guarded finish)."""
    import hashlib

    from redis import Redis

    from diffq.app.contract.records import ImageRecord, utcnow
    from diffq.app.contract.store import JobStore, StoredImage

    redis = Redis.from_url(redis_url)
    store = JobStore(redis)
    digest = hashlib.sha256(png).hexdigest()
    for job_id in job_ids:
        token = uuid.uuid4().hex
        store.claim(job_id, "bench-worker", token)
        image = ImageRecord(index=0, seed=1, width=64, height=64, sha256=digest, size_bytes=len(png))
        values = {"status": "succeeded", "finished_at": utcnow().isoformat(), "seeds": [1],
                  "images": [image.model_dump(mode="json")]}
        store.finish(job_id, token, values, [StoredImage(0, png)], 3600, 3600)


def zip_rss(stack: Stack, count: int, kib: int) -> tuple[int, int, int]:
    """(archive bytes, API RSS before, highest API RSS while streaming it), on a fresh API process."""
    url = stack.api("zip-api")
    items = [{**JOB, "seed": n, "custom_id": f"sku-{n}"} for n in range(count)]
    with httpx.Client(base_url=url, headers=HEADERS, timeout=300) as http:
        batch_id = http.post("/v1/batches", json={"items": items}).json()["id"]
        ids = [i["job_id"] for i in http.get(f"/v1/batches/{batch_id}/items", params={"limit": count}).json()["items"]]
        finish_all(stack.redis.url, ids, noise_png(kib))
        assert http.get(f"/v1/batches/{batch_id}").json()["status"] == "completed"
        pid = stack.processes["zip-api"].pid
        before, peak, done = rss_bytes(pid), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes(pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        size = 0
        with http.stream("GET", f"/v1/batches/{batch_id}/images.zip") as response:
            for chunk in response.iter_bytes():
                size += len(chunk)
        done.set()
        sampler.join()
    return size, before, peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--singles", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--zip-items", type=int, default=1_000, help="0: skip the archive")
    parser.add_argument("--image-kb", type=int, default=100)
    args = parser.parse_args()
    with Stack() as stack:
        url = stack.api()
        register_model(stack.redis.url)
        single_times, batch_times, batch_cpu, redis_cpu = [], [], [], []
        for _ in range(args.rounds):
            single_times.append(asyncio.run(singles(url, args.singles)))
            took, cpu, in_redis = batch(url, args.items, stack.processes["api"].pid, stack.redis.process.pid)
            batch_times.append(took)
            batch_cpu.append(cpu)
            redis_cpu.append(in_redis)
        rate = args.singles / statistics.median(single_times)
        took = statistics.median(batch_times)
        print(f"single POST /v1/jobs: {rate:,.0f} jobs/s (median of {args.rounds} x {args.singles:,}, 16 connections)")
        print(f"POST /v1/batches, {args.items:,} items: {took:.2f} s (median; runs {', '.join(f'{t:.2f}' for t in batch_times)})"
              f" = {args.items / took:,.0f} items/s")
        print(f"  CPU per batch: API process {statistics.median(batch_cpu):.2f} s (runs "
              f"{', '.join(f'{t:.2f}' for t in batch_cpu)}), redis-server {statistics.median(redis_cpu):.2f} s (runs "
              f"{', '.join(f'{t:.2f}' for t in redis_cpu)}); load average {os.getloadavg()[0]:.1f}")
        print(f"the same {args.items:,} items as single POSTs: {args.items / rate:.1f} s -> batch is "
              f"{args.items / rate / took:.1f}x faster")
        if not args.zip_items:
            return
        size, before, peak = zip_rss(stack, args.zip_items, args.image_kb)
        print(f"images.zip of {args.zip_items:,} images: {size / 2**20:.1f} MiB streamed; API RSS {before / 2**20:.1f} MiB "
              f"before, {peak / 2**20:.1f} MiB at most while streaming (+{(peak - before) / 2**20:.1f} MiB = "
              f"{(peak - before) / size:.1%} of the archive)")


if __name__ == "__main__":
    main()
