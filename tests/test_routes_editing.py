"""Editing jobs through the API and a real in-process worker (tiny model, 16×16, two steps).

Inputs as base64 JSON, data: URLs, multipart files and `job:<id>/<n>` references;
the size, mask and transparency rules; what is stored and what the worker makes of it.
"""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from diffq.app.contract.records import JobMode
from diffq.app.contract.store import JobStore
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB, input_key, png_text, work

pytestmark = pytest.mark.usefixtures("served")

SIZE = 16  # the tiny model's default; it accepts multiples of 8 in 8..32


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def square(size: tuple[int, int] = (SIZE, SIZE), colour=(200, 40, 40)) -> bytes:
    return png(Image.new("RGB", size, colour))


def half_mask(size: tuple[int, int] = (SIZE, SIZE)) -> bytes:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))  # repaint the left half
    return png(mask)


def image_of(png_bytes: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png_bytes))
    image.load()
    return image


def error_fields(response) -> dict[str, str]:
    return {field["field"]: field["message"] for field in response.json()["fields"]}


def run_job(client: TestClient, settings: Settings, engine, body: dict) -> dict:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.json()
    work(settings, engine)
    job = client.get(f"/v1/jobs/{response.json()['id']}").json()
    assert job["status"] == "succeeded", job
    return job


# -- modes end to end on a real worker -----------------------------------------------------------


def test_img2img_from_base64_runs_and_records_its_parameters(client, settings, engine) -> None:
    job = run_job(client, settings, engine, {**TINY_JOB, "image": b64(square()), "strength": 0.5, "steps": 4, "scheduler": "ddim"})

    request = job["request"]
    assert request["mode"] == "img2img" and request["strength"] == 0.5
    assert request["image"]["source"] == "upload" and (request["image"]["width"], request["image"]["height"]) == (16, 16)
    assert (job["progress"]["step"], job["progress"]["total"]) == (2, 2)  # int(4 steps × 0.5)
    text = png_text(client.get(job["images"][0]["url"]).content)
    assert text["mode"] == "img2img" and text["strength"] == "0.5"
    assert text["image_sha256"] == request["image"]["sha256"] and text["image_source"] == "upload"


def test_inpaint_keeps_the_unmasked_pixels_exactly(client, settings, engine) -> None:
    source = Image.new("RGB", (SIZE, SIZE), (10, 200, 30))
    source.putpixel((12, 3), (255, 255, 0))  # detail in the kept half
    body = {**TINY_JOB, "image": b64(png(source)), "mask": b64(half_mask())}
    job = run_job(client, settings, engine, body)

    assert job["request"]["mode"] == "inpaint" and job["request"]["strength"] == 1.0
    result = image_of(client.get(job["images"][0]["url"]).content)
    kept = (SIZE // 2, 0, SIZE, SIZE)
    assert result.crop(kept).tobytes() == source.crop(kept).tobytes()
    assert result.crop((0, 0, SIZE // 2, SIZE)).tobytes() != source.crop((0, 0, SIZE // 2, SIZE)).tobytes()


def test_outpaint_grows_the_image_and_keeps_the_original(client, settings, engine) -> None:
    source = Image.new("RGB", (8, 16), (30, 60, 220))
    body = {**TINY_JOB, "image": b64(png(source)), "outpaint": {"left": 8, "right": 8}}
    job = run_job(client, settings, engine, body)

    assert job["request"]["mode"] == "outpaint" and job["request"]["outpaint"]["left"] == 8
    assert (job["request"]["width"], job["request"]["height"]) == (24, 16)
    result = image_of(client.get(job["images"][0]["url"]).content)
    assert result.size == (24, 16)
    assert result.crop((8, 0, 16, 16)).tobytes() == source.tobytes()
    assert png_text(client.get(job["images"][0]["url"]).content)["outpaint"] == '{"left":8,"top":0,"right":8,"bottom":0}'


def test_edits_chain_through_job_references(client, settings, engine, redis: Redis) -> None:
    first = run_job(client, settings, engine, TINY_JOB)
    reference = f"job:{first['id']}/0"
    second = run_job(client, settings, engine, {**TINY_JOB, "image": reference, "mask": b64(half_mask())})

    assert second["request"]["image"]["source"] == reference
    original = image_of(client.get(first["images"][0]["url"]).content)
    edited = image_of(client.get(second["images"][0]["url"]).content)
    kept = (SIZE // 2, 0, SIZE, SIZE)
    assert edited.crop(kept).tobytes() == original.crop(kept).tobytes()
    # The input was copied: deleting the first job does not break a rerun of the second's inputs.
    assert client.delete(f"/v1/jobs/{first['id']}").status_code == 204
    assert redis.exists(input_key(second["id"], "image"))


def test_multipart_upload_with_form_fields(client, settings, engine) -> None:
    files = {"image": ("photo.jpg", png(Image.new("RGB", (SIZE, SIZE), (90, 90, 200)), "JPEG"), "image/jpeg"),
             "mask": ("mask.png", half_mask(), "image/png")}
    data = {"prompt": "a red circle", "steps": "2", "seed": "3", "strength": "0.9"}
    response = client.post("/v1/jobs", data=data, files=files)

    assert response.status_code == 202, response.json()
    job = response.json()
    assert job["request"]["mode"] == "inpaint" and job["request"]["strength"] == 0.9 and job["request"]["seed"] == 3
    work(settings, engine)
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


def test_multipart_outpaint_takes_a_json_object(client) -> None:
    files = {"image": ("a.png", square((8, 16)), "image/png")}
    response = client.post("/v1/jobs", data={"prompt": "sky", "outpaint": '{"top": 0, "left": 8}'}, files=files)
    assert response.status_code == 202, response.json()
    assert response.json()["request"]["outpaint"]["left"] == 8

    bad = client.post("/v1/jobs", data={"prompt": "sky", "outpaint": "left=8"}, files=files)
    assert bad.status_code == 422 and "outpaint" in error_fields(bad)


def test_product_shot_alpha_becomes_the_mask(client, settings, engine, redis: Redis) -> None:
    product = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    product.paste((250, 140, 20, 255), (4, 4, 12, 12))  # an opaque product in the middle
    body = {**TINY_JOB, "image": b64(png(product)), "mask": "alpha", "num_images": 2}
    job = run_job(client, settings, engine, body)

    assert job["request"]["mask"]["source"] == "alpha"
    mask = image_of(redis.get(input_key(job["id"], "mask")))
    assert mask.getpixel((8, 8)) == 0 and mask.getpixel((0, 0)) == 255
    first, second = (image_of(client.get(image["url"]).content) for image in job["images"])
    for result in (first, second):
        assert result.crop((4, 4, 12, 12)).getcolors() == [(64, (250, 140, 20))]  # the product, untouched
    assert first.tobytes() != second.tobytes()  # two different backgrounds


def test_transparency_without_alpha_mask_is_composited_onto_white_with_a_warning(client, redis: Redis) -> None:
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    response = client.post("/v1/jobs", json={**TINY_JOB, "image": b64(png(image))})

    assert response.status_code == 202
    job = response.json()
    assert any("transparency" in warning for warning in job["warnings"])
    stored = image_of(redis.get(input_key(job["id"], "image")))
    assert stored.mode == "RGB" and stored.getpixel((0, 0)) == (255, 255, 255)


def test_data_url_and_exif_orientation(client, redis: Redis) -> None:
    landscape = Image.new("RGB", (16, 8), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: the stored pixels are 16×8, shown 8×16
    buffer = io.BytesIO()
    landscape.save(buffer, format="JPEG", exif=exif)
    body = {**TINY_JOB, "image": "data:image/jpeg;base64," + b64(buffer.getvalue())}
    response = client.post("/v1/jobs", json=body)

    assert response.status_code == 202, response.json()
    assert (response.json()["request"]["width"], response.json()["request"]["height"]) == (8, 16)


# -- sizes -------------------------------------------------------------------------------------------


def test_size_must_fit_the_model_unless_resize(client) -> None:
    odd = b64(square((20, 20)))
    refused = client.post("/v1/jobs", json={**TINY_JOB, "image": odd})
    assert refused.status_code == 422
    assert "multiples of 8" in error_fields(refused)["image"] and "resize" in error_fields(refused)["image"]

    resized = client.post("/v1/jobs", json={**TINY_JOB, "image": odd, "resize": True, "width": 24})
    assert resized.status_code == 202, resized.json()
    assert (resized.json()["request"]["width"], resized.json()["request"]["height"]) == (24, 16)


def test_width_must_agree_with_the_image_unless_resize(client) -> None:
    response = client.post("/v1/jobs", json={**TINY_JOB, "image": b64(square()), "width": 24})
    assert response.status_code == 422 and "resize" in error_fields(response)["width"]


def test_mask_size_mismatch_is_refused_unless_resize(client, redis: Redis) -> None:
    body = {**TINY_JOB, "image": b64(square()), "mask": b64(half_mask((8, 8)))}
    refused = client.post("/v1/jobs", json=body)
    assert refused.status_code == 422 and "8×8" in error_fields(refused)["mask"]

    accepted = client.post("/v1/jobs", json={**body, "resize": True})
    assert accepted.status_code == 202
    assert image_of(redis.get(input_key(accepted.json()["id"], "mask"))).size == (SIZE, SIZE)


def test_outpaint_size_is_checked(client) -> None:
    response = client.post("/v1/jobs", json={**TINY_JOB, "image": b64(square()), "outpaint": {"left": 4}})
    assert response.status_code == 422 and "20×16" in error_fields(response)["outpaint"]


# -- fields per mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ({"mode": "img2img"}, "image", "required"),
        ({"mode": "inpaint", "image": "IMAGE"}, "mask", "required"),
        ({"mode": "outpaint", "image": "IMAGE"}, "outpaint", "required"),
        ({"strength": 0.5}, "strength", "only used"),
        ({"mask": "MASK", "mode": "img2img", "image": "IMAGE"}, "mask", "only used"),
        ({"image": "IMAGE", "outpaint": {}}, "outpaint", "adds no pixels"),
        ({"resize": True}, "resize", "input image"),
        ({"image": "IMAGE", "strength": 0}, "strength", "greater than 0"),
        ({"image": "IMAGE", "strength": 1.5}, "strength", "less than or equal to 1"),
        ({"image": "IMAGE", "strength": 0.2, "steps": 2}, "strength", "no denoising step"),
        ({"image": "IMAGE", "mask": "alpha"}, "mask", "transparency"),
        ({"image": "job:nothing"}, "image", "job reference"),
        ({"image": "job:" + "0" * 32 + "/0"}, "image", "has no image 0"),
        ({"mode": "paint", "image": "IMAGE"}, "mode", "txt2img"),
        ({"image": "IMAGE", "outpaint": {"left": -1}}, "outpaint.left", "greater than or equal"),
    ],
)
def test_bad_editing_fields_name_the_field(client, extra: dict, field: str, words: str) -> None:
    body = {**TINY_JOB, **extra}
    for name, placeholder in (("image", "IMAGE"), ("mask", "MASK")):
        if body.get(name) == placeholder:
            body[name] = b64(square() if name == "image" else half_mask())
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.json()
    assert words in error_fields(response)[field]


def test_a_model_without_editing_refuses_edit_modes(client, redis: Redis, served) -> None:
    from diffq.app.contract.registry import Registry

    text_only = served.model_copy(update={"modes": [JobMode.TXT2IMG]})
    worker = Registry(redis, ttl=60).live_workers()[0]
    Registry(redis, ttl=60).announce(worker, text_only)
    response = client.post("/v1/jobs", json={**TINY_JOB, "image": b64(square())})
    assert response.status_code == 422 and "not offered" in error_fields(response)["mode"]


# -- what is stored -----------------------------------------------------------------------------------


def test_inputs_are_stored_normalised_and_deleted_with_the_job(client, redis: Redis, settings: Settings) -> None:
    body = {**TINY_JOB, "image": b64(png(Image.new("P", (SIZE, SIZE)), "PNG")), "mask": b64(half_mask())}
    job = client.post("/v1/jobs", json=body).json()
    image_key, mask_key = input_key(job["id"], "image"), input_key(job["id"], "mask")

    assert image_of(redis.get(image_key)).mode == "RGB" and image_of(redis.get(mask_key)).mode == "L"
    assert 0 < redis.ttl(image_key) <= settings.job_ttl + 60  # the job's retention and a minute (objects.OBJECT_TTL_MARGIN)
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert not redis.exists(image_key) and not redis.exists(mask_key)
    assert JobStore(redis).get(job["id"]) is None


def test_expired_input_fails_the_job_clearly(client, redis: Redis, settings: Settings, engine) -> None:
    job = client.post("/v1/jobs", json={**TINY_JOB, "image": b64(square())}).json()
    redis.delete(input_key(job["id"], "image"))
    work(settings, engine)

    failed = client.get(f"/v1/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_request"
    assert "expired" in failed["error"]["message"]


def test_decoding_runs_off_the_event_loop(client, monkeypatch) -> None:
    import asyncio

    import diffq.app.core.inputs as inputs

    real_decode = inputs.decode_image
    loops = []

    def spying_decode(*args, **kwargs):
        try:
            loops.append(asyncio.get_running_loop())
        except RuntimeError:  # no loop running in this thread: the event loop is free meanwhile
            loops.append(None)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(inputs, "decode_image", spying_decode)
    response = client.post("/v1/jobs", json={**TINY_JOB, "image": b64(square()), "mask": b64(half_mask())})
    assert response.status_code == 202
    assert loops == [None, None]
