"""What the result store costs and saves, side by side in one run: `python bench/storage.py`.

For each backend (``redis``, ``file``, ``s3``: moto's S3 server on loopback), on one real
embedded redis-server and the real API (in process) and worker code (``run_worker``):

1. Redis bytes per finished job: ``used_memory`` after ``--jobs`` jobs minus before, per job,
   and the job's own keys (``MEMORY USAGE``), right after the end and once its preview has
   lapsed (``diffq.worker.runner.PREVIEW_AFTER_END``), for the bundled default model and for a 512×512
   image (a tiny random pipeline whose native size is 512); previews at their default.
2. Image bytes that pass through the API process per image, in each ``DIFFQ_IMAGE_URLS`` mode
   (``proxy``, ``signed``, ``public``): a client follows the job resource's URLs; bytes that
   came from the API are counted, bytes fetched straight from the store are not.
3. The store write's latency per image (``ResultStore.put`` of one 512×512 PNG, ``--writes``
   times): p50 and p99 per backend, and what ``file`` and ``s3`` add over ``redis``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from redis import Redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffq.app.contract import keys  # noqa: E402
from diffq.app.contract.records import WorkerRecord, utcnow  # noqa: E402
from diffq.app.contract.registry import Registry  # noqa: E402
from diffq.app.contract.tasks import queue_name  # noqa: E402
from diffq.app.embedded_redis import EmbeddedRedis  # noqa: E402
from diffq.app.main import create_app  # noqa: E402
from diffq.app.settings import Settings  # noqa: E402
from diffq.app.storage import objects  # noqa: E402
from diffq.app.storage.factory import open_store  # noqa: E402

BUCKET = "diffq-bench"
LAPSE_SECONDS = 300  # diffq.worker.runner.PREVIEW_AFTER_END, diffq.app.contract.tasks.FINISHED_TTL
PROMPT = "a small red circle on the left, blue background"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(endpoint, timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return process, endpoint


def tiny_512(folder: Path) -> Path:
    """A tiny random SD-1.x pipeline whose native size is 512×512: tests/tiny_pipelines' text encoder
    and UNet (64×64 latents), and a narrow VAE with SD's 8× upsampling."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    from tests.tiny_pipelines import LATENT_CHANNELS, _text_config, _unet, write_tokenizer_files

    torch.manual_seed(0)
    tokenizer = write_tokenizer_files(folder.parent / f"{folder.name}-vocab")
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=LATENT_CHANNELS, norm_num_groups=8,
                        layers_per_block=1, sample_size=512)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(_text_config(tokenizer, hidden_act="quick_gelu")), tokenizer=tokenizer,
        unet=_unet(sample_size=64), scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def settings_for(backend: str, redis_url: str, root: Path, endpoint: str, **extra: object) -> Settings:
    store: dict[str, object] = {"store": backend}
    if backend == "file":
        store["store_dir"] = root
    if backend == "s3":
        store |= {"store_bucket": BUCKET, "store_endpoint_url": endpoint, "store_region": "us-east-1",
                  "store_addressing": "path"}
    return Settings(_env_file=None, redis_url=redis_url, auth="off", progress_interval=0.0, log_level="warning",
                    torch_threads=1, batch_max=1, **store, **extra)


def announce(redis: Redis, engine) -> None:  # noqa: ANN001
    from diffq.worker.service import model_record

    model = model_record(engine)
    now = utcnow()
    worker = WorkerRecord(id="bench", model=model.name, device=model.device, dtype=model.dtype, host="bench", pid=1,
                          queue=queue_name(model.name), started_at=now, heartbeat_at=now)
    Registry(redis, ttl=3600).announce(worker, model)


def run_jobs(settings: Settings, engine, jobs: int, body: dict) -> tuple[TestClient, list[dict]]:  # noqa: ANN001
    from diffq.worker.service import run_worker

    client = TestClient(create_app(settings))
    client.__enter__()
    ids = [client.post("/v1/jobs", json={**body, "seed": n}).json()["id"] for n in range(jobs)]
    run_worker(settings, engine=engine, burst=True)
    return client, [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]


def redis_bytes(settings: Settings, redis: Redis, engine, jobs: int, body: dict) -> dict[str, float]:  # noqa: ANN001
    redis.flushall()
    announce(redis, engine)
    before = redis.info("memory")["used_memory"]
    client, finished = run_jobs(settings, engine, jobs, body)
    after = redis.info("memory")["used_memory"]
    assert all(job["status"] == "succeeded" for job in finished), finished[0]
    own = [sum(redis.memory_usage(name) or 0 for name in redis.scan_iter(match=f"*{job['id']}*")) for job in finished]
    previews = [redis.memory_usage(keys.preview(job["id"])) or 0 for job in finished]
    # What lapses within 5 minutes of the end (preview, event stream, RQ's job and result) and what lasts.
    lasting = [sum(redis.memory_usage(name) or 0 for name in redis.scan_iter(match=f"*{job['id']}*")
                   if not 0 < redis.ttl(name) <= LAPSE_SECONDS) for job in finished]
    image = statistics.mean(len(client.get(job["images"][0]["url"]).content) if job["images"][0]["url"].startswith(
        "http://testserver") else len(httpx.get(job["images"][0]["url"]).content) for job in finished)
    client.__exit__(None, None, None)
    return {"used_memory": (after - before) / jobs, "own_keys": statistics.mean(own), "image": image,
            "preview": statistics.mean(previews), "lasting": statistics.mean(lasting)}


def api_bytes(settings: Settings, redis: Redis, engine, jobs: int, body: dict) -> float:  # noqa: ANN001
    """Image bytes per image that came through the API when a client fetched every image."""
    redis.flushall()
    announce(redis, engine)
    client, finished = run_jobs(settings, engine, jobs, body)
    through_api = images = 0
    for job in finished:
        for image in job["images"]:
            images += 1
            if image["url"].startswith("http://testserver"):
                through_api += len(client.get(image["url"]).content)
            else:
                response = httpx.get(image["url"])
                assert response.status_code == 200, response.text
    client.__exit__(None, None, None)
    return through_api / images


def write_latency(settings: Settings, redis: Redis, png: bytes, writes: int) -> list[float]:
    store = open_store(settings, redis)
    seconds = []
    for n in range(writes):
        key = objects.image(f"{n:032x}", "b" * 32, 0, "png")
        start = time.perf_counter()
        store.put(key, png, "image/png", 600)
        seconds.append(time.perf_counter() - start)
    return seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=5, help="jobs per backend and model")
    parser.add_argument("--writes", type=int, default=200, help="store writes per backend for the latency")
    args = parser.parse_args()

    import os

    import torch
    from PIL import Image

    from diffq.model.engine import Engine
    from diffq.worker.encoding import encode_image

    torch.set_num_threads(1)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    work = Path(tempfile.mkdtemp(prefix="diffq-bench-storage-"))
    server = EmbeddedRedis()
    server.start()
    moto, endpoint = start_moto()
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        # Public reads of diffq's prefix, as a bucket behind a CDN has (DIFFQ_IMAGE_URLS=public).
        s3.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/diffq/*"}]}))
        redis = Redis.from_url(server.url)
        engines = {
            "default model (shapes, 64×64, 4 steps)": (Engine.load(ROOT / "model" / "shapes", device="cpu",
                                                                   dtype="float32"), {"prompt": PROMPT, "steps": 4}),
            "512×512 (tiny pipeline, 2 steps)": (Engine.load(tiny_512(work / "tiny512"), device="cpu",
                                                             dtype="float32"),
                                                 {"prompt": PROMPT, "steps": 2, "scheduler": "ddim"}),
        }
        print(f"diffq result store, {args.jobs} jobs per backend and model, {args.writes} writes; redis-server "
              f"{redis.info('server')['redis_version']}, moto's S3 server on loopback\n")
        print("1. Redis bytes per finished job: used_memory delta per job | the job's own keys | the same once its "
              "preview, event stream and RQ's keys lapse (5 min)")
        for label, (engine, body) in engines.items():
            for backend in ("redis", "file", "s3"):
                root = work / f"store-{backend}-{abs(hash(label))}"
                root.mkdir()
                measured = redis_bytes(settings_for(backend, server.url, root, endpoint), redis, engine, args.jobs,
                                       body)
                lasting = measured["lasting"]
                print(f"   {label:40s} {backend:6s} {measured['used_memory']:>9,.0f} B | {measured['own_keys']:>9,.0f} B"
                      f" | {lasting:>9,.0f} B   (image {measured['image']:,.0f} B, preview {measured['preview']:,.0f} B)")
        print("\n2. Image bytes through the API process per image (s3 store, 512×512)")
        engine, body = engines["512×512 (tiny pipeline, 2 steps)"]
        modes = {"proxy": {}, "signed": {"image_urls": "signed"},
                 "public": {"image_urls": "public", "public_base_url": f"{endpoint}/{BUCKET}"}}
        for mode, extra in modes.items():
            per_image = api_bytes(settings_for("s3", server.url, work, endpoint, **extra), redis, engine, args.jobs,
                                  body)
            print(f"   {mode:7s} {per_image:>10,.0f} B")
        print(f"\n3. Store write per image (one 512×512 PNG), {args.writes} writes")
        png = encode_image(Image.effect_noise((512, 512), 40).convert("RGB"), "png", None, {"prompt": PROMPT}).data
        latencies = {}
        for backend in ("redis", "file", "s3"):
            root = work / f"latency-{backend}"
            root.mkdir()
            latencies[backend] = write_latency(settings_for(backend, server.url, root, endpoint), redis, png,
                                               args.writes)
        base50, base99 = percentile(latencies["redis"], 0.5), percentile(latencies["redis"], 0.99)
        print(f"   PNG of {len(png):,} B")
        for backend, seconds in latencies.items():
            p50, p99 = percentile(seconds, 0.5), percentile(seconds, 0.99)
            added = "" if backend == "redis" else f"   added over redis: p50 {1000 * (p50 - base50):+.2f} ms, " \
                                                   f"p99 {1000 * (p99 - base99):+.2f} ms"
            print(f"   {backend:6s} p50 {1000 * p50:7.2f} ms  p99 {1000 * p99:7.2f} ms{added}")
    finally:
        moto.terminate()
        moto.wait()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
