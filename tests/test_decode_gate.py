"""Input images cannot stall other tenants' uploads (issue 19, finding 3): every cheap check comes
before any decode, the default pixel caps fit what the models make, and decodes are bounded per key
and per process, against the real app (in-process) and a real `diffq api` process."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

import diffq.app.core.inputs as inputs
from diffq.app.auth.apikeys import KeyLimits, KeyStore
from diffq.app.embedded_redis import EmbeddedRedis
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB
from tests.services import services

pytestmark = pytest.mark.usefixtures("served")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def big_photo(width: int = 4096, height: int = 3072) -> str:
    """A few tens of KB that cost about a second to decode and re-encode: gradients compress well."""
    ramp = Image.linear_gradient("L").resize((width, height))
    image = Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_180), ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    return base64.b64encode(png(image)).decode()


SMALL = base64.b64encode(png(Image.new("RGB", (16, 16), (200, 40, 40)))).decode()


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fields decoded by the API (a spy around the real decoder)."""
    seen: list[str] = []
    real = inputs.decode_image

    def spy(data: bytes, field: str, limits):  # type: ignore[no-untyped-def]
        seen.append(field)
        return real(data, field, limits)

    monkeypatch.setattr(inputs, "decode_image", spy)
    return seen


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"resize": True, "strength": 0.2, "steps": 2}, "strength"),  # leaves no denoising step
        ({"resize": True, "steps": 1000}, "steps"),
        ({"resize": True, "width": 20}, "width"),  # not a size the model makes
        ({"resize": True, "scheduler": "nope"}, "scheduler"),
        ({"mask": SMALL[:-8] + "!!!!!!!!"}, "mask"),  # a broken mask: refused before the image is decoded
        ({}, "image"),  # larger than the model makes, without resize: refused from the header
    ],
)
def test_cheap_checks_refuse_before_any_decode(client: TestClient, decodes: list[str], extra: dict, field: str) -> None:
    response = client.post("/v1/jobs", json={**TINY_JOB, "image": big_photo(), **extra})
    assert response.status_code == 422, response.text
    assert field in [problem["field"] for problem in response.json()["fields"]]
    assert decodes == []


def test_an_input_larger_than_the_model_makes_is_refused_from_its_header_naming_resize(client, decodes) -> None:
    response = client.post("/v1/jobs", json={**TINY_JOB, "image": big_photo(64, 64)})
    assert response.status_code == 422
    message = response.json()["fields"][0]["message"]
    assert "64×64" in message and "resize: true" in message and decodes == []


def test_default_pixel_caps_fit_the_models_and_a_phone_photo() -> None:
    defaults = Settings(_env_file=None)
    assert defaults.max_upload_pixels <= 2048 * 2048  # the largest image of SDXL-class models, with room to outpaint
    assert 4032 * 3024 <= defaults.max_resize_pixels < 4096 * 4096  # a 12 MP photo fits; the report's 16 MP does not


def key(redis: Redis, name: str) -> dict[str, str]:
    _, token = KeyStore(redis).create(name, KeyLimits(rate_limit="100000/second"))
    return {"Authorization": f"Bearer {token}"}


ATTACK = 30


async def attack_and_upload(url: str, attacker: dict[str, str], other: dict[str, str]) -> dict[str, list]:
    big = {**TINY_JOB, "image": big_photo(), "resize": True}
    limits = httpx.Limits(max_connections=ATTACK + 5, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        flood = [asyncio.create_task(client.post("/v1/jobs", json=big, headers=attacker)) for _ in range(ATTACK)]
        await asyncio.sleep(1.0)  # the attacker's uploads are in and decoding
        started = time.monotonic()
        small = await client.post("/v1/jobs", json={**TINY_JOB, "image": SMALL}, headers=other)
        waited = time.monotonic() - started
        attacked = await asyncio.gather(*flood)
    return {"small": [(small.status_code, waited, small.text)], "attack": [(r.status_code, r.text) for r in attacked]}


@pytest.mark.slow
def test_one_keys_big_uploads_do_not_hold_another_keys_small_one(
    redis_server: EmbeddedRedis, redis: Redis, tmp_path: Path
) -> None:
    attacker, other = key(redis, "attacker"), key(redis, "bystander")
    with services(redis_server.url, tmp_path, DIFFQ_AUTH="keys", DIFFQ_DECODE_CONCURRENCY="2",
                  DIFFQ_DECODE_CONCURRENCY_PER_KEY="1") as api:
        result = asyncio.run(attack_and_upload(api.url, attacker, other))

    status, waited, text = result["small"][0]
    statuses = [status for status, _ in result["attack"]]
    print(f"\ndecode gate: {ATTACK} 4096×3072 uploads from one key -> "
          f"{ {s: statuses.count(s) for s in sorted(set(statuses))} }; another key's 16×16 upload: {status} in {waited:.2f} s")
    assert status == 202, text
    assert waited < 3.0, f"the small upload waited {waited:.1f} s behind another key's"
    assert statuses.count(202) <= 9 and statuses.count(429) >= ATTACK - 9, statuses  # 1 decoding + 8 waiting
    assert all("too_many_uploads" in text for status, text in result["attack"] if status == 429)
