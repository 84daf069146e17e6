"""Batches against real processes: `diffq api`, `diffq worker` and `diffq webhooks` on the test
Redis; the bundled shapes model where the pictures must follow their rows' prompts, the tiny
model where only order and counts matter. The CLI (`diffq batch ...`) drives the first test."""

from __future__ import annotations

import io
import json
import subprocess
import time
import zipfile
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import standardwebhooks
from redis import Redis

from diffq.app.auth.apikeys import KeyLimits, KeyStore
from diffq.app.embedded_redis import EmbeddedRedis
from diffq.app.webhooks.signing import generate_secret
from tests.helpers import TINY_JOB, clean_environment, diffq_command, wait_for
from tests.services import services
from tests.test_e2e import SHAPES, dominant_colour
from tests.test_webhooks import Receiver

pytestmark = pytest.mark.slow


def batch_of(http: httpx.Client, batch_id: str, headers: dict[str, str] | None = None) -> dict:
    return http.get(f"/v1/batches/{batch_id}", headers=headers).json()


@pytest.mark.skipif(not (SHAPES / "model_index.json").exists(), reason="the bundled shapes model is not built")
def test_a_csv_template_batch_runs_end_to_end_and_each_image_follows_its_row(
    redis_server: EmbeddedRedis, redis: Redis, tmp_path: Path
) -> None:
    csv = tmp_path / "products.csv"
    csv.write_text("custom_id,bg\nsku-blue,blue\nsku-green,green\nsku-yellow,yellow\n")
    with services(redis_server.url, tmp_path, worker=SHAPES, ready="/readyz") as api:
        env = clean_environment(DIFFQ_URL=api.url)

        def diffq(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*diffq_command(), "batch", *args], capture_output=True, text=True, env=env,
                                  timeout=600)

        submitted = diffq("submit", str(csv), "--template", "a red circle, {bg} background", "--defaults",
                          '{"seed": 1234}', "--no-progress")
        assert submitted.returncode == 0, submitted.stderr
        batch_id = submitted.stdout.strip()
        results = diffq("results", batch_id)
        folder = diffq("download", batch_id, "-o", str(tmp_path / "images"))
        archive = diffq("download", batch_id, "-o", str(tmp_path / "all.zip"))
        assert folder.returncode == archive.returncode == 0, folder.stderr + archive.stderr
        with httpx.Client(base_url=api.url) as http:
            batch = batch_of(http, batch_id)

    assert batch["status"] == "completed" and batch["counts"]["succeeded"] == 3 and batch["progress"] == 1
    lines = [json.loads(line) for line in results.stdout.splitlines()]
    assert [(line["custom_id"], line["status"], line["seeds"]) for line in lines] == [
        ("sku-blue", "succeeded", [1234]), ("sku-green", "succeeded", [1234]), ("sku-yellow", "succeeded", [1234])]
    for colour in ("blue", "green", "yellow"):
        assert dominant_colour((tmp_path / "images" / f"sku-{colour}.png").read_bytes()) == colour
    with zipfile.ZipFile(tmp_path / "all.zip") as zipped:
        assert sorted(zipped.namelist()) == ["sku-blue.png", "sku-green.png", "sku-yellow.png"]
        assert zipped.read("sku-green.png") == (tmp_path / "images" / "sku-green.png").read_bytes()


def test_cancel_mid_batch_stops_it_and_the_zip_holds_exactly_the_succeeded_items(
    redis_server: EmbeddedRedis, redis: Redis, tiny_model: Path, tmp_path: Path
) -> None:
    items = [{**TINY_JOB, "steps": 40, "seed": n, "custom_id": f"item-{n}"} for n in range(12)]
    with services(redis_server.url, tmp_path, worker=tiny_model, ready="/readyz", DIFFQ_BATCH_MAX="1") as api, \
            httpx.Client(base_url=api.url, timeout=30) as http:
        batch_id = http.post("/v1/batches", json={"items": items}).json()["id"]
        wait_for(lambda: batch_of(http, batch_id)["counts"]["succeeded"] >= 2, timeout=240, interval=0.1)

        canceled = http.post(f"/v1/batches/{batch_id}/cancel").json()
        ended = wait_for(lambda: (b := batch_of(http, batch_id))["status"] == "canceled" and b, timeout=60)
        time.sleep(1.5)  # an item that ran on would end now
        final = batch_of(http, batch_id)
        lines = [json.loads(line) for line in http.get(f"/v1/batches/{batch_id}/results.jsonl").text.splitlines()]
        archive = zipfile.ZipFile(io.BytesIO(http.get(f"/v1/batches/{batch_id}/images.zip").content))

    counts = final["counts"]
    assert canceled["status"] in ("canceling", "canceled") and final["counts"] == ended["counts"]
    assert counts["succeeded"] >= 2 and counts["canceled"] >= 1 and counts["queued"] == counts["running"] == 0
    assert counts["succeeded"] + counts["canceled"] == 12, counts
    succeeded = sorted(line["custom_id"] for line in lines if line["status"] == "succeeded")
    assert len(succeeded) == counts["succeeded"]
    assert sorted(archive.namelist()) == [f"{name}.png" for name in succeeded]


def test_another_keys_single_job_waits_about_one_job_behind_a_big_batch(
    redis_server: EmbeddedRedis, redis: Redis, tiny_model: Path, tmp_path: Path
) -> None:
    store = KeyStore(redis)
    a, b = ({"Authorization": f"Bearer {store.create(name, KeyLimits(rate_limit='10000/second', priority='low'))[1]}"}
            for name in ("shop-a", "shop-b"))
    items = [{**TINY_JOB, "steps": 20, "seed": n} for n in range(40)]
    with services(redis_server.url, tmp_path, worker=tiny_model, ready="/readyz", DIFFQ_AUTH="keys",
                  DIFFQ_BATCH_MAX="1") as api, httpx.Client(base_url=api.url, timeout=30) as http:
        batch_id = http.post("/v1/batches", json={"items": items}, headers=a).json()["id"]
        wait_for(lambda: batch_of(http, batch_id, a)["counts"]["succeeded"] >= 3, timeout=240, interval=0.1)
        single = http.post("/v1/jobs", json=TINY_JOB, headers=b).json()
        submitted_at = datetime.fromisoformat(single["timings"]["created_at"])
        job = wait_for(lambda: (j := http.get(f"/v1/jobs/{single['id']}", params={"wait": 10}, headers=b).json())
                       ["status"] == "succeeded" and j, timeout=240)
        b_started = datetime.fromisoformat(job["timings"]["started_at"])
        ids = [i["job_id"] for i in http.get(f"/v1/batches/{batch_id}/items", params={"limit": 40},
                                             headers=a).json()["items"]]
        http.post(f"/v1/batches/{batch_id}/cancel", headers=a)
        starts = [http.get(f"/v1/jobs/{job_id}", headers=a).json()["timings"]["started_at"] for job_id in ids]

    a_started = [datetime.fromisoformat(t) for t in starts if t is not None]
    in_between = [t for t in a_started if submitted_at < t < b_started]
    assert len(in_between) <= 2, (len(in_between), len(a_started))
    assert len(a_started) < len(items), "the whole batch ran before B's job: the test proved nothing"


def test_the_batch_webhook_is_delivered_once_and_verifies_beside_the_items_own(
    redis_server: EmbeddedRedis, redis: Redis, tiny_model: Path, tmp_path: Path
) -> None:
    secret = generate_secret()
    receiver = Receiver()
    hook = {"url": f"http://127.0.0.1:{receiver.port}/batches", "item_events": ["succeeded"]}
    try:
        with services(redis_server.url, tmp_path, worker=tiny_model, webhooks=True, ready="/readyz",
                      DIFFQ_WEBHOOK_SECRET=secret, DIFFQ_WEBHOOK_ALLOW_LOOPBACK="true") as api, \
                httpx.Client(base_url=api.url, timeout=30) as http:
            items = [{**TINY_JOB, "seed": n, "custom_id": f"p{n}"} for n in range(3)]
            response = http.post("/v1/batches", json={"items": items, "webhook": hook})
            assert response.status_code == 202, response.text
            batch_id = response.json()["id"]
            wait_for(lambda: api.check_alive() or len(receiver.requests) >= 4, timeout=240, interval=0.1)
            time.sleep(1.5)  # a duplicate would arrive now
            received = list(receiver.requests)
    finally:
        receiver.close()

    payloads = [(path, headers, standardwebhooks.Webhook(secret).verify(body, headers))
                for path, headers, body in received]
    assert sorted(p["type"] for _, _, p in payloads) == ["batch.completed"] + ["job.succeeded"] * 3
    [(path, headers, payload)] = [entry for entry in payloads if entry[2]["type"] == "batch.completed"]
    assert path == "/batches" and headers["webhook-id"] == f"msg_{batch_id}_batch_completed"
    assert payload["type"] == "batch.completed"
    data = payload["data"]
    assert (data["id"], data["total"], data["succeeded"], data["failed"], data["canceled"]) == (batch_id, 3, 3, 0, 0)
    assert data["results_url"] == f"/v1/batches/{batch_id}/results.jsonl"
