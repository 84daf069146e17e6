"""LoRA adapters through a real RQ worker (this process), real Redis and the tiny model: applied,
recorded in the job and the PNG, batched only with equal adapters and weights, and removed so that
the next job's bytes equal a fresh worker's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from diffq.app.contract.records import ModelRecord
from diffq.app.main import create_app
from diffq.app.settings import Settings
from diffq.model.engine import Engine
from tests.helpers import TINY_JOB, job_of, png_text, post, work
from tests.tiny_loras import write_tiny_lora


@pytest.fixture(scope="module")
def lora_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    write_tiny_lora(tiny_model, folder, "ink", base_model="tiny", seed=1)
    return folder


def lora_engine(tiny_model: Path, lora_dir: Path) -> Engine:
    return Engine.load(tiny_model, device="cpu", dtype="float32", max_steps=100, max_images=4, lora_dir=lora_dir)


@pytest.fixture
def api(settings: Settings, lora_dir: Path, served: ModelRecord) -> Iterator[tuple[TestClient, Settings]]:
    settings = settings.model_copy(update={"lora_dir": lora_dir})
    with TestClient(create_app(settings)) as client:
        yield client, settings


def png(client: TestClient, job_id: str) -> bytes:
    return client.get(f"/v1/jobs/{job_id}/images/0.png").content


def test_a_job_after_an_adapter_job_gives_the_bytes_of_a_fresh_worker(api, tiny_model: Path, lora_dir: Path) -> None:
    client, settings = api
    plain = {**TINY_JOB, "seed": 11}
    first = post(client, plain)
    work(settings, lora_engine(tiny_model, lora_dir))  # a fresh worker
    fresh = png(client, first)

    used = lora_engine(tiny_model, lora_dir)
    styled = post(client, {**plain, "loras": [{"name": "ink", "weight": 1.0}]})
    work(settings, used)
    after = post(client, plain)
    work(settings, used)  # the same worker, its pipeline still holding the adapter

    assert job_of(client, styled)["status"] == job_of(client, after)["status"] == "succeeded"
    assert png(client, styled) != fresh
    assert png(client, after) == fresh


def test_the_job_and_its_png_record_each_adapters_name_weight_and_hash(api, tiny_model: Path, lora_dir: Path) -> None:
    import hashlib

    client, settings = api
    job_id = post(client, {**TINY_JOB, "prompt": "a red circle <lora:ink:0.6>"})
    work(settings, lora_engine(tiny_model, lora_dir))
    job = job_of(client, job_id)
    expected = [{"name": "ink", "weight": 0.6, "sha256": hashlib.sha256((lora_dir / "ink.safetensors").read_bytes()).hexdigest()}]
    assert job["status"] == "succeeded", job
    assert job["request"]["loras"] == expected
    assert job["request"]["prompt"] == "a red circle"
    assert json.loads(png_text(png(client, job_id))["loras"]) == expected


def test_only_jobs_with_equal_adapters_and_weights_share_a_batch(api, tiny_model: Path, lora_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    client, settings = api
    engine = lora_engine(tiny_model, lora_dir)
    calls: list[list] = []
    original = engine.generate

    def generate(requests, on_step=None):  # records each pipeline call's requests; the engine does the work
        calls.append(list(requests))
        return original(requests, on_step)

    monkeypatch.setattr(engine, "generate", generate)
    bodies = [{**TINY_JOB, "seed": 1, "loras": [{"name": "ink", "weight": 1.0}]},
              {**TINY_JOB, "seed": 2},
              {**TINY_JOB, "seed": 3, "loras": [{"name": "ink", "weight": 1.0}]},
              {**TINY_JOB, "seed": 4, "loras": [{"name": "ink", "weight": 0.5}]}]
    ids = [post(client, body) for body in bodies]
    work(settings, engine)
    assert [[r.seed for r in requests] for requests in calls] == [[1, 3], [2], [4]]
    assert all(job_of(client, job_id)["status"] == "succeeded" for job_id in ids)
