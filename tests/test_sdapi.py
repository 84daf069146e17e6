"""/sdapi/v1 in process: the A1111 → diffq mapping, its refusals, per-key options, HTTP Basic auth.

Jobs here never run (no worker): what runs end to end, with the real clients, is in
tests/test_clients_live.py.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from diffq.app.auth.apikeys import KeyStore
from diffq.app.contract import keys
from diffq.app.contract.records import ModelRecord
from diffq.app.contract.store import JobStore
from diffq.app.core import a1111
from diffq.app.core.errors import InvalidRequestError
from diffq.app.core.uploads import UploadLimits
from diffq.app.main import create_app
from diffq.app.settings import Settings

LIMITS = UploadLimits(max_bytes=1 << 20, max_pixels=1 << 16, max_side=256)


def png_b64(colour: str | int, size: tuple[int, int] = (16, 16), mode: str = "RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# -- the mapping ---------------------------------------------------------------------------------------


def test_a_webuiapi_txt2img_body_maps_onto_one_job_with_batch_size_times_n_iter_images() -> None:
    request = a1111.A1111Request.model_validate({
        "prompt": "a red circle", "negative_prompt": "blue", "seed": 7, "sampler_name": "Euler a",
        "scheduler": "automatic", "batch_size": 2, "n_iter": 2, "steps": 4, "cfg_scale": 6.5, "width": 32,
        "height": 48, "sampler_index": "Euler a", "eta": 1.0, "s_churn": 0, "send_images": True,
        "override_settings": {"sd_model_checkpoint": "shapes [abc123]"}, "alwayson_scripts": {},
        "url": "http://localhost:7860", "auth": "user:secret",  # SillyTavern's own fields ride in the body
    })

    fields = a1111.job_fields(request, False, None, LIMITS)

    assert fields == {"prompt": "a red circle", "negative_prompt": "blue", "num_images": 4, "model": "shapes",
                      "seed": 7, "scheduler": "euler_a", "steps": 4, "guidance_scale": 6.5, "width": 32,
                      "height": 48}
    assert "auth" not in a1111.A1111Request.model_validate({"auth": "u:p"}).model_dump()  # never echoed


def test_omitted_values_take_the_model_defaults_and_seed_minus_one_is_random() -> None:
    fields = a1111.job_fields(a1111.A1111Request(prompt="x", seed=-1), False, "keys-model", LIMITS)
    assert fields == {"prompt": "x", "negative_prompt": "", "num_images": 1, "model": "keys-model"}


@pytest.mark.parametrize(("name", "scheduler"), [("Euler a", "euler_a"), ("k_euler", "euler"),
                                                 ("DPM++ 2M", "dpmpp_2m"), ("dpm++ 2m", "dpmpp_2m"),
                                                 ("PLMS", "pndm"), ("unipc", "unipc"), ("DDIM", "ddim")])
def test_sampler_names_aliases_and_diffq_names_map_through_one_table(name: str, scheduler: str) -> None:
    sampler = a1111.sampler_for(name)
    assert sampler is not None and sampler.scheduler == scheduler
    assert a1111.sampler_label(scheduler) == sampler.name


def test_an_unknown_sampler_or_schedule_is_refused_naming_the_accepted_ones() -> None:
    with pytest.raises(InvalidRequestError) as sampler:
        a1111.job_fields(a1111.A1111Request(prompt="x", sampler_name="DPM++ SDE"), False, None, LIMITS)
    assert sampler.value.problems[0].field == "sampler_name" and "Euler a" in sampler.value.problems[0].message
    with pytest.raises(InvalidRequestError) as schedule:
        a1111.job_fields(a1111.A1111Request(prompt="x", scheduler="karras"), False, None, LIMITS)
    assert schedule.value.problems[0].field == "scheduler" and "Automatic" in schedule.value.problems[0].message


def test_what_diffq_cannot_do_is_refused_when_asked_for_and_accepted_at_its_do_nothing_value() -> None:
    off = a1111.A1111Request(prompt="x", enable_hr=False, restore_faces=False, tiling=False, styles=[],
                             override_settings={"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"})
    a1111.job_fields(off, False, None, LIMITS)

    on = a1111.A1111Request(prompt="x", enable_hr=True, restore_faces=True, styles=["cinematic"],
                            script_name="x/y/z plot", alwayson_scripts={"ControlNet": {"args": []}},
                            override_settings={"CLIP_stop_at_last_layers": 2, "sd_hypernetwork": "h"})
    with pytest.raises(InvalidRequestError) as refused:
        a1111.job_fields(on, False, None, LIMITS)
    assert {p.field for p in refused.value.problems} == {
        "enable_hr", "restore_faces", "styles", "script_name", "alwayson_scripts",
        "override_settings.CLIP_stop_at_last_layers", "override_settings.sd_hypernetwork"}


def test_img2img_maps_init_images_mask_and_denoising_strength_and_inverts_an_inverted_mask() -> None:
    image, mask = png_b64("yellow"), png_b64(255, mode="L")
    request = a1111.A1111Request(prompt="x", init_images=[image], mask=mask, denoising_strength=0.6, width=16,
                                 height=16, mask_blur=4, inpainting_fill=1, inpaint_full_res=False)
    fields = a1111.job_fields(request, True, None, LIMITS)
    assert fields["mode"] == "inpaint" and fields["image"] == image and fields["mask"] == mask
    assert fields["strength"] == 0.6 and fields["resize"] is True

    inverted = a1111.job_fields(request.model_copy(update={"inpainting_mask_invert": 1}), True, None, LIMITS)
    with Image.open(io.BytesIO(base64.b64decode(inverted["mask"]))) as repaint:
        assert repaint.getextrema() == (0, 0)  # all-white "keep" mask inverted: nothing is repainted

    plain = a1111.job_fields(a1111.A1111Request(prompt="x", init_images=[image]), True, None, LIMITS)
    assert plain["mode"] == "img2img" and plain["strength"] == 0.75 and "resize" not in plain

    with pytest.raises(InvalidRequestError) as missing:
        a1111.job_fields(a1111.A1111Request(prompt="x"), True, None, LIMITS)
    assert missing.value.problems[0].field == "init_images"


# -- the routes, auth on, two keys ------------------------------------------------------------------------


@pytest.fixture
def keyed(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"auth": "keys"}))) as test_client:
        yield test_client


def basic(token: str, user: str = "anyone") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


@pytest.fixture
def two_keys(redis: Redis) -> tuple[str, str]:
    store = KeyStore(redis)
    return store.create("alice")[1], store.create("bob")[1]


def test_http_basic_carries_the_api_key_as_password_or_user_name(keyed: TestClient, two_keys: tuple[str, str],
                                                                 served: ModelRecord) -> None:
    alice, _ = two_keys
    assert keyed.get("/sdapi/v1/sd-models", headers=basic(alice)).status_code == 200
    assert keyed.get("/sdapi/v1/sd-models", headers=basic("", user=alice)).status_code == 200
    assert keyed.get("/v1/models", headers=basic(alice)).status_code == 200  # every keyed route
    assert keyed.get("/sdapi/v1/sd-models", headers=basic("dq_wrong")).status_code == 401
    assert keyed.get("/sdapi/v1/sd-models", headers={"Authorization": "Basic "}).status_code == 401


def test_sillytaverns_empty_basic_header_passes_while_auth_is_off(client: TestClient, served: ModelRecord) -> None:
    response = client.get("/sdapi/v1/options", headers={"Authorization": "Basic "})  # its auth setting left empty
    assert response.status_code == 200 and response.json()["sd_model_checkpoint"] == served.name


def test_options_are_per_key_and_a_checkpoint_must_be_served(keyed: TestClient, two_keys: tuple[str, str],
                                                             served: ModelRecord, redis: Redis) -> None:
    alice, bob = two_keys
    before = keyed.get("/sdapi/v1/options", headers=basic(bob)).json()

    refused = keyed.post("/sdapi/v1/options", headers=basic(alice), json={"sd_model_checkpoint": "sdxl [123]"})
    assert refused.status_code == 422 and set(refused.json()) == {"error", "detail", "body", "errors"}
    assert "sd_model_checkpoint" in refused.json()["detail"] and "served models: tiny" in refused.json()["detail"]

    options = keyed.get("/sdapi/v1/options", headers=basic(alice)).json()
    options["sd_model_checkpoint"] = f"{served.name} [0123abcd]"  # Open WebUI posts back all it read
    assert keyed.post("/sdapi/v1/options", headers=basic(alice), json=options).status_code == 200

    alice_key = KeyStore(redis).verify(alice.split()[-1])
    assert alice_key is not None
    assert json.loads(redis.hget(keys.sdapi_options(alice_key.id), "sd_model_checkpoint")) == served.name
    assert keyed.get("/sdapi/v1/options", headers=basic(bob)).json() == before
    assert not redis.exists(keys.sdapi_options("-"))


def test_an_unmappable_txt2img_is_a_422_in_a1111s_error_shape_and_queues_nothing(
    client: TestClient, served: ModelRecord, redis: Redis
) -> None:
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "enable_hr": True, "width": 16, "height": 16})
    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"error", "detail", "body", "errors"} and "enable_hr" in body["detail"]

    too_many = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "batch_size": 3, "n_iter": 3})
    assert too_many.status_code == 422 and "batch_size" in too_many.json()["detail"]
    bad_size = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 13, "height": 16})
    assert bad_size.status_code == 422 and "width" in bad_size.json()["detail"]
    not_json = client.post("/sdapi/v1/txt2img", content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 422
    assert redis.zcard(keys.owner_jobs("-")) == 0


def test_no_live_worker_is_a_503(client: TestClient) -> None:
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle"})
    assert response.status_code == 503 and response.json()["error"] == "UnknownModelError"


def test_progress_and_interrupt_touch_only_the_callers_own_sdapi_jobs(
    keyed: TestClient, two_keys: tuple[str, str], served: ModelRecord, redis: Redis, settings: Settings
) -> None:
    """Two keys with a job each (queued through /sdapi/v1 as its route does) and a /v1/jobs job of alice's."""
    from diffq.app.auth.caller import Caller
    from diffq.app.core.a1111_session import A1111Session
    from diffq.app.core.jobs import JobService
    from diffq.app.schemas.jobs import JobCreate

    alice, bob = two_keys
    ids = {}
    for name, token in (("alice", alice), ("bob", bob)):
        caller = Caller(KeyStore(redis).verify(token), settings)
        view = JobService(redis, settings, caller).submit(JobCreate(prompt=name))
        A1111Session(redis, caller.scope, settings.job_ttl).track(view.record.id, 1.0)
        ids[name] = view.record.id
        if name == "alice":
            ids["alice-v1"] = JobService(redis, settings, caller).submit(JobCreate(prompt="catalog")).record.id

    progress = keyed.get("/sdapi/v1/progress", headers=basic(alice)).json()
    assert progress["state"]["job_count"] == 1 and progress["progress"] == 0.0
    assert {"eta_relative", "current_image"} <= set(progress)

    assert keyed.post("/sdapi/v1/interrupt", headers=basic(alice)).json() is None
    store = JobStore(redis)
    assert store.get(ids["alice"]).status.value == "canceled"
    assert store.get(ids["bob"]).status.value == "queued"  # another key's job: untouched
    assert store.get(ids["alice-v1"]).status.value == "queued"  # her /v1/jobs work: untouched
    assert keyed.get("/sdapi/v1/progress", headers=basic(bob)).json()["state"]["job_count"] == 1


def test_listings_answer_the_shapes_clients_read(client: TestClient, served: ModelRecord) -> None:
    assert client.get("/sdapi/v1/sd-models").json()[0]["title"] == served.name
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in samplers}
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    assert {s["name"] for s in client.get("/sdapi/v1/schedulers").json()} == {"automatic", "normal"}
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").json()] == ["None"]
    for empty in ("latent-upscale-modes", "sd-vae"):
        assert client.get(f"/sdapi/v1/{empty}").json() == []
    assert "stripes" in [lora["name"] for lora in client.get("/sdapi/v1/loras").json()]  # the shipped adapter
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}


def test_each_keys_checkpoint_option_picks_the_model_its_own_requests_run_on(
    settings: Settings, two_keys: tuple[str, str], served: ModelRecord, redis: Redis
) -> None:
    """Two models served; alice picks the other one; bob's requests stay on the deployment's default.
    No worker runs, so each request answers its 504 after a short wait, naming its queued job."""
    from diffq.app.contract.records import WorkerRecord, utcnow
    from diffq.app.contract.registry import Registry
    from diffq.app.contract.tasks import queue_name

    other = served.model_copy(update={"name": "other"})
    now = utcnow()
    Registry(redis, ttl=60).announce(WorkerRecord(id="w2", model="other", device="cpu", dtype="float32",
                                                  host="localhost", pid=2, queue=queue_name("other"),
                                                  started_at=now, heartbeat_at=now), other)
    alice, bob = two_keys
    quick = settings.model_copy(update={"auth": "keys", "sdapi_timeout": 0.3, "default_model": served.name})
    with TestClient(create_app(quick)) as test_client:
        assert test_client.post("/sdapi/v1/options", headers=basic(alice),
                                json={"sd_model_checkpoint": "other"}).status_code == 200
        models = {}
        for name, token in (("alice", alice), ("bob", bob)):
            answer = test_client.post("/sdapi/v1/txt2img", headers=basic(token), json={"prompt": "a red circle"})
            assert answer.status_code == 504 and answer.json()["error"] == "TimeoutError"
            models[name] = JobStore(redis).get(answer.headers["x-diffq-job-id"]).model
            options = test_client.get("/sdapi/v1/options", headers=basic(token)).json()
            assert options["sd_model_checkpoint"] == models[name]
    assert models == {"alice": "other", "bob": served.name}
