"""Hostile uploads through the real API: every one is a 4xx naming the field, and nothing is stored.

The corpus is `tests/hostile_images.py` (also run against the decoder alone in
`test_uploads.py`); here each file is sent both ways a client can send it, as
a multipart file part and as base64 in JSON, and the valid ones must be accepted.
"""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from diffq.app.main import create_app
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB
from tests.hostile_images import hostile_cases, valid_cases

pytestmark = pytest.mark.usefixtures("served")

MAX_BYTES, MAX_PIXELS, MAX_SIDE = 1_000_000, 4_000_000, 4096
HOSTILE = hostile_cases(MAX_BYTES, MAX_PIXELS, MAX_SIDE)


@pytest.fixture
def limited(settings: Settings) -> TestClient:
    limits = dict(max_upload_bytes=MAX_BYTES, max_upload_pixels=MAX_PIXELS, max_upload_side=MAX_SIDE,
                  max_request_bytes=4 * MAX_BYTES)
    with TestClient(create_app(settings.model_copy(update=limits))) as client:
        yield client


def diffq_keys(redis: Redis) -> list[bytes]:
    return sorted(key for key in redis.keys("*") if not key.startswith((b"diffq:worker", b"diffq:model")))


@pytest.mark.parametrize("case", HOSTILE, ids=[case.name for case in HOSTILE])
def test_hostile_upload_is_refused_both_ways_and_nothing_is_stored(limited: TestClient, redis: Redis, case) -> None:
    before = diffq_keys(redis)
    as_file = limited.post("/v1/jobs", data={"prompt": "x", "steps": "2"},
                           files={"image": ("upload.png", case.data, "image/png")})
    as_json = limited.post("/v1/jobs", json={**TINY_JOB, "image": base64.b64encode(case.data).decode()})

    for response in (as_file, as_json):
        assert response.status_code == case.status, response.text
        body = response.json()
        assert body["code"] in ("invalid_request", "upload_too_large") and "image" in body["message"]
    assert diffq_keys(redis) == before  # no record, no input, no queue entry


def test_there_are_at_least_thirty_hostile_cases() -> None:
    assert len(HOSTILE) >= 30 and {case.status for case in HOSTILE} == {413, 422}


@pytest.mark.parametrize("name, data, size, alpha", valid_cases(), ids=[case[0] for case in valid_cases()])
def test_valid_uploads_are_accepted_with_resize(limited: TestClient, name, data, size, alpha) -> None:
    response = limited.post("/v1/jobs", data={"prompt": "x", "steps": "2", "resize": "true"},
                            files={"image": ("upload", data, "application/octet-stream")})
    assert response.status_code == 202, response.text
    assert response.json()["request"]["mode"] == "img2img"


def test_a_body_over_the_request_cap_is_refused_before_it_is_read(limited: TestClient, redis: Redis) -> None:
    before = diffq_keys(redis)
    response = limited.post("/v1/jobs", content=b"{" + b" " * (4 * MAX_BYTES) + b"}",
                            headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["code"] == "request_too_large"
    assert diffq_keys(redis) == before


def test_a_streamed_body_without_length_is_cut_off_at_the_cap(limited: TestClient) -> None:
    def chunks():
        for _ in range(5):
            yield b" " * MAX_BYTES

    response = limited.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_an_oversized_file_part_is_a_413_naming_the_field(limited: TestClient) -> None:
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_BYTES
    response = limited.post("/v1/jobs", data={"prompt": "x"}, files={"mask": ("m.png", big, "image/png")})
    assert response.status_code == 413 and "mask" in response.json()["message"]


@pytest.mark.parametrize(
    "text, words",
    [("not base64!!", "base64"), ("", "empty"), ("data:text/plain;base64,aGVsbG8=", "image")],
)
def test_bad_base64_is_a_422(limited: TestClient, text: str, words: str) -> None:
    response = limited.post("/v1/jobs", json={**TINY_JOB, "image": text})
    assert response.status_code == 422 and words in response.json()["message"]


def test_file_parts_only_for_image_and_mask(limited: TestClient) -> None:
    response = limited.post("/v1/jobs", data={"prompt": "x"}, files={"prompt_file": ("p.txt", b"hi", "text/plain")})
    assert response.status_code == 422 and "prompt_file" in response.json()["message"]
