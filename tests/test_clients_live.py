"""The clients people already run, unchanged, against real `diffq api` and `diffq worker` processes on the
shipped shapes model: `webuiapi` (A1111's /sdapi/v1, HTTP Basic), the official `openai` client (image
edits and variations), and the requests Open WebUI and SillyTavern send (tests/client_requests.py).

The images must follow their prompts: the shapes model paints the colours it is asked for, read
the way `diffq.model.training.evaluate` reads them (nearest palette colour per pixel). Few steps, 64×64, one
module-scoped stack (two API keys) for every test here.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image
from redis import Redis

from diffq.app.auth.apikeys import KeyStore
from diffq.app.embedded_redis import EmbeddedRedis
from diffq.model.training.shapes_data import COLOURS, _palette_labels
from tests import client_requests
from tests.conftest import SHAPES
from tests.helpers import wait_for
from tests.services import Services, services

pytestmark = pytest.mark.slow

STEPS = 8
CENTRE = (16, 16, 48, 48)


def share(image: Image.Image, colour: str, box: tuple[int, int, int, int] = (0, 0, 64, 64)) -> float:
    """Share of the pixels in `box` whose nearest palette colour is `colour`."""
    labels = _palette_labels(np.asarray(image.convert("RGB").crop(box)))
    return float((labels == list(COLOURS).index(colour)).mean())


def flat(colour: str) -> Image.Image:
    return Image.new("RGB", (64, 64), COLOURS[colour])


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


#: The two API keys' tokens by name, made by the `stack` fixture.
TOKENS: dict[str, str] = {}


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """`diffq api` (API keys on) and `diffq worker` on the shapes model; two keys, alice and bob."""
    redis = Redis.from_url(redis_server.url)
    redis.flushall()
    store = KeyStore(redis)
    TOKENS.update({name: store.create(name)[1] for name in ("alice", "bob")})
    with services(redis_server.url, tmp_path_factory.mktemp("clients"), worker=SHAPES, ready="/readyz",
                  DIFFQ_AUTH="keys") as started:
        yield started
    redis.close()


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def a1111(stack: Services, name: str) -> webuiapi.WebUIApi:
    """webuiapi as its README configures it behind auth: user name and password (the diffq key)."""
    return webuiapi.WebUIApi(baseurl=f"{stack.url}/sdapi/v1", username=name, password=TOKENS[name],
                             sampler="DPM++ 2M", steps=STEPS)


def test_webuiapi_txt2img_img2img_and_inpainting_follow_their_prompts(stack: Services) -> None:
    api = a1111(stack, "alice")

    blue = api.txt2img(prompt="a large yellow square in the center, blue background", width=64, height=64,
                       seed=3, batch_size=2, cfg_scale=5)
    assert len(blue.images) == 2 and blue.info["all_seeds"] == [3, 4] and blue.info["sampler_name"] == "DPM++ 2M"
    assert all(share(image, "blue") >= 0.5 for image in blue.images)
    assert blue.parameters["steps"] == STEPS and blue.parameters["init_images"] is None
    red = api.txt2img(prompt="a small white circle on the left, red background", width=64, height=64, seed=3,
                      sampler_name="Euler a", cfg_scale=5)
    assert share(red.image, "red") >= 0.5 and share(red.image, "blue") < 0.1

    close = api.img2img(images=[flat("yellow")], prompt="a large white circle in the center, green background",
                        denoising_strength=0.3, width=64, height=64, seed=2, cfg_scale=5)
    full = api.img2img(images=[flat("yellow")], prompt="a large white circle in the center, green background",
                       denoising_strength=1.0, width=64, height=64, seed=2, cfg_scale=5)
    assert share(close.image, "yellow") >= 0.8  # stays close to its input at low strength
    assert share(full.image, "green") >= 0.5

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, CENTRE)
    inpainted = api.img2img(images=[flat("yellow")], mask_image=mask, denoising_strength=1.0, width=64, height=64,
                            prompt="a large blue square in the center, yellow background", seed=1, cfg_scale=5,
                            inpainting_fill=1, mask_blur=4)
    out = np.asarray(inpainted.image.convert("RGB"))
    assert share(inpainted.image, "blue", CENTRE) >= 0.3
    outside = np.asarray(mask) == 0
    assert np.array_equal(out[outside], np.asarray(flat("yellow"))[outside])  # only the mask was repainted


def test_webuiapi_models_and_options_with_basic_auth(stack: Services) -> None:
    api = a1111(stack, "alice")
    assert [model["title"] for model in api.get_sd_models()] == ["shapes"]
    assert api.set_options({"sd_model_checkpoint": "shapes"}) is None
    assert api.get_options()["sd_model_checkpoint"] == "shapes"
    assert api.util_get_current_model() == "shapes"
    answer = api.session.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "sdxl"})  # its own session
    assert answer.status_code == 422 and "served models: shapes" in answer.json()["detail"]
    refused = webuiapi.WebUIApi(baseurl=f"{stack.url}/sdapi/v1", username="alice", password="dq_wrong")
    assert refused.session.get(f"{refused.baseurl}/options").status_code == 401


def test_interrupt_from_one_key_never_touches_another_keys_job(stack: Services) -> None:
    alice, bob = a1111(stack, "alice"), a1111(stack, "bob")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(answer=alice.txt2img(
        prompt="a red circle", width=64, height=64, steps=100, seed=1)), daemon=True)
    thread.start()

    def running() -> dict | None:
        progress = alice.get_progress()
        return progress if progress["state"]["sampling_step"] > 0 and progress["current_image"] else None

    progress = wait_for(running, timeout=60, interval=0.2)
    assert progress["state"]["job_count"] == 1 and 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    assert decode(progress["current_image"]).size == (64, 64)  # the running job's latest preview
    assert bob.get_progress()["state"]["job_count"] == 0  # bob sees none of alice's jobs

    assert bob.interrupt() is None and bob.skip() is None
    time.sleep(1.0)
    assert alice.get_progress()["state"]["job_count"] == 1  # still running
    assert alice.interrupt() is None
    thread.join(timeout=60)

    answer = result["answer"]
    assert answer.images == []  # A1111 answers an interrupted job normally, without finished images
    job_id = answer.info["diffq_job_id"]
    job = httpx.get(f"{stack.url}/v1/jobs/{job_id}", auth=("alice", TOKENS["alice"])).json()
    assert job["status"] == "canceled"
    assert alice.get_progress()["state"]["job_count"] == 0


def test_openai_images_generate_edit_and_variation(stack: Services) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=TOKENS["bob"], max_retries=0, timeout=120)
    extra = {"steps": STEPS, "seed": 2, "guidance_scale": 5}

    made = client.images.generate(prompt="a large yellow square in the center, blue background", size="64x64",
                                  response_format="b64_json", extra_body=extra)
    generated = base64.b64decode(made.data[0].b64_json)
    assert share(decode(made.data[0].b64_json), "blue") >= 0.5
    linked = client.images.generate(prompt="a large yellow square in the center, blue background", size="64x64",
                                    response_format="url", extra_body=extra)
    assert httpx.get(linked.data[0].url, headers=bearer("bob")).content \
        == generated  # the same request and seed: the same bytes

    # OpenAI's mask: the fully transparent pixels are the ones to edit.
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), CENTRE)
    raw = client.images.with_raw_response.edit(image=("in.png", png(flat("yellow")), "image/png"),
                                               mask=("mask.png", png(mask), "image/png"),
                                               prompt="a large blue square in the center, yellow background",
                                               extra_body=extra)
    edited = raw.parse()
    job = httpx.get(f"{stack.url}/v1/jobs/{raw.headers['x-diffq-job-id']}",
                    headers=bearer("bob")).json()
    assert job["request"]["mode"] == "inpaint" and job["request"]["steps"] == STEPS  # extras arrive as form fields
    out = decode(edited.data[0].b64_json)
    assert out.size == (64, 64) and share(out, "blue", CENTRE) >= 0.3 and share(out, "yellow") >= 0.5
    assert edited.size == "64x64"

    whole = client.images.edit(image=[("in.png", png(flat("yellow")), "image/png")], n=1, response_format="url",
                               prompt="a large white circle in the center, green background",
                               extra_body={**extra, "strength": 1.0})
    download = httpx.get(whole.data[0].url, headers=bearer("bob"))
    assert share(Image.open(io.BytesIO(download.content)), "green") >= 0.5  # no mask: image-to-image

    # A variation of an image diffq made: image-to-image under the prompt its PNG carries.
    variation = client.images.create_variation(image=("made.png", generated, "image/png"), n=2,
                                               extra_body={**extra, "strength": 0.6})
    assert len(variation.data) == 2
    assert all(share(decode(image.b64_json), "blue") >= 0.5 for image in variation.data)
    with pytest.raises(openai.BadRequestError) as no_prompt:
        client.images.create_variation(image=("flat.png", png(flat("red")), "image/png"), extra_body=extra)
    assert no_prompt.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as opaque_mask:
        client.images.edit(image=("in.png", png(flat("yellow")), "image/png"),
                           mask=("mask.png", png(flat("red")), "image/png"), prompt="x", extra_body=extra)
    assert opaque_mask.value.param == "mask"


def test_sillytavern_and_open_webui_requests_get_every_field_they_read(stack: Services) -> None:
    auth = f"sillytavern:{TOKENS['alice']}"
    header = {"Authorization": client_requests.basic_header(auth)}
    for path, field in client_requests.SILLYTAVERN_READS.items():
        answer = httpx.get(f"{stack.url}{path}", headers=header)
        assert answer.status_code == 200, (path, answer.text)
        listed = answer.json()
        assert field in listed if isinstance(listed, dict) else all(field in item for item in listed), path
    set_model = httpx.post(f"{stack.url}/sdapi/v1/options", headers={**header, "Content-Type": "application/json"},
                           content=client_requests.SILLYTAVERN_SET_MODEL.format(model="shapes").encode())
    assert set_model.status_code == 200
    progress = httpx.get(f"{stack.url}/sdapi/v1/progress", headers=header).json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0  # its "model loaded" check

    body, headers = client_requests.sillytavern_txt2img(stack.url, auth, "a small white circle on the left, red "
                                                        "background")
    answer = httpx.post(f"{stack.url}/sdapi/v1/txt2img", content=body, headers=headers, timeout=120)
    assert answer.status_code == 200, answer.text
    assert share(decode(answer.json()["images"][0]), "red") >= 0.5  # sampler DDIM, schedule "normal"

    owui = f"admin:{TOKENS['bob']}"
    owui_header = {"authorization": client_requests.basic_header(owui)}
    options = httpx.get(f"{stack.url}/sdapi/v1/options", headers=owui_header).json()
    assert all({"title", "model_name"} <= set(m) for m in httpx.get(f"{stack.url}/sdapi/v1/sd-models",
                                                                  headers=owui_header).json())
    options["sd_model_checkpoint"] = "shapes"
    assert httpx.post(f"{stack.url}/sdapi/v1/options", json=options, headers=owui_header).status_code == 200
    body, headers = client_requests.open_webui_txt2img(owui, "a large yellow square in the center, blue background",
                                                       2, "64x64", STEPS)
    answer = httpx.post(f"{stack.url}/sdapi/v1/txt2img", content=body, headers=headers, timeout=120)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert len(result["images"]) == 2 and json.loads(result["info"])["all_seeds"]
    assert all(share(decode(image), "blue") >= 0.5 for image in result["images"])

    fields = client_requests.open_webui_edit_fields("dall-e-2", "a large white circle in the center, green "
                                                    "background", 1, "64x64")
    edit = httpx.post(f"{stack.url}/v1/images/edits", data={**fields, "strength": "1.0", "steps": str(STEPS)},
                      files=[("image[]", ("a.png", png(flat("yellow")), "image/png"))],
                      headers=bearer("bob"), timeout=120)
    assert edit.status_code == 200, edit.text
    assert share(decode(edit.json()["data"][0]["b64_json"]), "green") >= 0.5
