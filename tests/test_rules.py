"""app/contract/rules.py: the API refuses at submit exactly what the worker's engine would refuse.

One table of requests goes to both checks: the API's (``POST /v1/jobs`` against the models'
records, as workers publish them) and the engine's (``Engine.validate`` on the loaded models).
Each row must get the same verdict from both: accepted, or refused naming the same field.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from diffq.app.contract.records import JobRecord, ModelRecord, WorkerRecord, utcnow
from diffq.app.contract.registry import Registry
from diffq.app.contract.rules import MAX_SEED, Outpaint
from diffq.app.contract.store import JobStore
from diffq.app.contract.tasks import queue_name
from diffq.model.engine import Engine, GenerationRequest, InvalidRequestError
from diffq.worker.runner import generation_request
from diffq.worker.service import model_record

TINY, LCM = "tiny", "tiny-lcm"


@pytest.fixture(scope="module")
def lcm_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """A tiny LCM-distilled pipeline: its "lcm" scheduler takes at most the 50 steps
    (original_inference_steps) it was distilled on, and it takes no negative prompt."""
    from tests.tiny_pipelines import build_lcm

    folder = build_lcm(tmp_path_factory.mktemp("models") / LCM)
    return Engine.load(folder, device="cpu", dtype="float32", max_steps=100, max_images=4)


@pytest.fixture
def engines(redis: Redis, engine: Engine, lcm_engine: Engine) -> dict[str, Engine]:
    """Both models registered as one live worker serving them would register them."""
    served = {TINY: engine, LCM: lcm_engine}
    records = [model_record(e) for e in served.values()]
    now = utcnow()
    worker = WorkerRecord(id="rules-worker", model=TINY, device="cpu", dtype="float32", host="localhost", pid=1,
                          queue=queue_name(TINY), started_at=now, heartbeat_at=now, models=list(served))
    Registry(redis, ttl=60).announce(worker, records)
    return served


def picture(size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, (200, 40, 40))


PIC, PIC12 = "PIC", "PIC12"  # stand-ins for an input image, 16×16 (fits) or 12×12 (not a multiple of 8)

#: (model, request fields, the field refused or None). The expectation is checked too, so the
#: table cannot drift into rows both checks happen to get wrong.
TABLE: list[tuple[str, dict[str, Any], str | None]] = [
    (TINY, {}, None),
    (TINY, {"steps": 100}, None),
    (TINY, {"steps": 101}, "steps"),
    (TINY, {"steps": 0}, "steps"),
    (LCM, {}, None),
    (LCM, {"steps": 50}, None),
    (LCM, {"steps": 51}, "steps"),  # over the LCM's cap: accepted with 202, then failed, before
    (LCM, {"steps": 51, "scheduler": "ddim"}, None),  # the cap is the lcm scheduler's, not the model's
    (TINY, {"scheduler": "lcm"}, "scheduler"),  # a known name, not offered by this model
    (TINY, {"scheduler": "k_lms"}, "scheduler"),
    (TINY, {"seed": MAX_SEED}, None),
    (TINY, {"seed": MAX_SEED, "num_images": 4}, None),  # image k uses seed + k, past MAX_SEED: fine
    (TINY, {"seed": MAX_SEED + 1}, "seed"),
    (TINY, {"seed": -1}, "seed"),
    (TINY, {"guidance_scale": 50.0}, None),
    (TINY, {"guidance_scale": 50.5}, "guidance_scale"),
    (TINY, {"guidance_scale": -1.0}, "guidance_scale"),
    (TINY, {"width": 24, "height": 8}, None),
    (TINY, {"width": 20}, "width"),
    (TINY, {"height": 40}, "height"),
    (TINY, {"num_images": 4}, None),
    (TINY, {"num_images": 5}, "num_images"),
    (TINY, {"prompt": "   "}, "prompt"),
    (TINY, {"negative_prompt": "blurry"}, None),
    (LCM, {"negative_prompt": "blurry"}, "negative_prompt"),  # accepted, then failed, before
    (LCM, {"negative_prompt": ""}, None),
    (TINY, {"mode": "img2img", "image": PIC}, None),
    (TINY, {"mode": "img2img", "image": PIC, "strength": 0.5, "steps": 2}, None),
    (TINY, {"mode": "img2img", "image": PIC, "strength": 0.2, "steps": 2}, "strength"),  # int(0.4) = 0 steps
    (TINY, {"mode": "img2img", "image": PIC12}, "image"),
    (TINY, {"mode": "inpaint", "image": PIC}, "mask"),
    (TINY, {"mode": "txt2img", "strength": 0.5}, "strength"),
    (TINY, {"mode": "outpaint", "image": PIC, "outpaint": {"left": 8}}, None),
    (TINY, {"mode": "outpaint", "image": PIC, "outpaint": {}}, "outpaint"),
    (TINY, {"mode": "outpaint", "image": PIC, "outpaint": {"left": 24}}, "outpaint"),  # 40 wide: too large
]


def _image(value: Any) -> Any:
    return {PIC: picture(), PIC12: picture((12, 12))}.get(value, value) if isinstance(value, str) else value


def api_verdict(client: TestClient, model: str, fields: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the field the API refuses or None, the id of the job it accepted)."""
    body: dict[str, Any] = {"prompt": "a red circle", "model": model, **fields}
    if "image" in body:
        buffer = io.BytesIO()
        _image(body["image"]).save(buffer, format="PNG")
        body["image"] = base64.b64encode(buffer.getvalue()).decode()
    response = client.post("/v1/jobs", json=body)
    if response.status_code == 202:
        return None, response.json()["id"]
    assert response.status_code == 422, response.text
    refused = {problem["field"] for problem in response.json()["fields"]}
    assert len(refused) == 1, response.text  # each row has one problem
    return refused.pop(), None


def engine_verdict(engine: Engine, fields: dict[str, Any]) -> str | None:
    """The field the engine refuses (at the first problem it finds), or None."""
    values = {name: _image(value) for name, value in fields.items()}
    if "outpaint" in values:
        values["outpaint"] = Outpaint.model_construct(**values["outpaint"])
    try:
        engine.validate(GenerationRequest(**{"prompt": "a red circle", **values}))
    except InvalidRequestError as error:
        return error.field
    return None


@pytest.mark.parametrize("model, fields, expected", TABLE, ids=[f"{m}-{json.dumps(f)}" for m, f, _ in TABLE])
def test_the_api_and_the_engine_give_the_same_verdict(
    client: TestClient, redis: Redis, engines: dict[str, Engine], model: str, fields: dict[str, Any],
    expected: str | None,
) -> None:
    api_refused, job_id = api_verdict(client, model, fields)
    assert (api_refused, engine_verdict(engines[model], fields)) == (expected, expected)
    if job_id is not None and "image" not in fields:
        # And what the worker will run, defaults resolved by the API, passes the engine's check.
        record: JobRecord | None = JobStore(redis).get(job_id)
        assert record is not None
        engines[model].validate(generation_request(record.request))


def test_an_lcm_models_job_over_its_step_cap_is_refused_at_submit(
    client: TestClient, engines: dict[str, Engine]
) -> None:
    response = client.post("/v1/jobs", json={"prompt": "a red circle", "model": LCM, "steps": 51})

    assert response.status_code == 422
    [problem] = response.json()["fields"]
    assert problem == {"field": "steps",
                       "message": f"must be between 1 and 50 for model {LCM!r} with scheduler 'lcm'; got 51"}
    # The cap is published with the model, for clients to read before they ask.
    [listed] = [m for m in client.get("/v1/models").json()["models"] if m["name"] == LCM]
    assert listed["scheduler_max_steps"] == {"lcm": 50} and listed["negative_prompt"] is False


def test_the_openai_and_a1111_endpoints_refuse_it_at_submit_too(client: TestClient, engines: dict[str, Engine]) -> None:
    openai = client.post("/v1/images/generations", json={"prompt": "a red circle", "model": LCM, "steps": 51})
    assert openai.status_code == 400
    assert (openai.json()["error"]["param"], openai.json()["error"]["code"]) == ("steps", "invalid_value")
    assert "between 1 and 50" in openai.json()["error"]["message"]

    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 51,
                                                    "override_settings": {"sd_model_checkpoint": LCM}})
    assert a1111.status_code == 422 and "steps: must be between 1 and 50" in a1111.json()["detail"]
    unsupported = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "negative_prompt": "blurry",
                                                          "override_settings": {"sd_model_checkpoint": LCM}})
    assert unsupported.status_code == 422 and "takes no negative prompt" in unsupported.json()["detail"]


def test_the_worker_publishes_what_the_rules_need_of_its_model(engines: dict[str, Engine]) -> None:
    lcm = ModelRecord.model_validate(model_record(engines[LCM]).model_dump())
    assert lcm.scheduler_max_steps == {"lcm": 50}
    assert model_record(engines[TINY]).scheduler_max_steps == {}  # no scheduler caps it below max_steps
    assert (lcm.negative_prompt, model_record(engines[TINY]).negative_prompt) == (False, True)


def test_a_record_from_an_older_worker_assumes_no_scheduler_cap_and_a_negative_prompt() -> None:
    older = {"name": "old", "pipeline_class": "StableDiffusionPipeline", "weights_hash": "0" * 64, "device": "cpu",
             "dtype": "float32", "default_width": 64, "default_height": 64, "min_size": 32, "max_size": 128,
             "size_multiple": 8, "default_steps": 20, "max_steps": 50, "default_guidance_scale": 5.0,
             "default_scheduler": "ddim", "schedulers": ["ddim"]}
    record = ModelRecord.model_validate(older)
    assert (record.scheduler_max_steps, record.negative_prompt) == ({}, True)
