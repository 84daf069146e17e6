"""`job:<id>/<n>` references obey the visibility rule of `GET /v1/jobs/{id}`: another key's job
answers exactly as a job that does not exist (image or mask, with or without a mask), and nothing of
the other tenant's image reaches the new job. Real API app, real Redis, a real in-process worker."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from diffq.app.auth.apikeys import KeyLimits, KeyStore
from diffq.app.main import create_app
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB, work

pytestmark = pytest.mark.usefixtures("served")

SIZE = 16


@pytest.fixture
def keyed(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"auth": "keys"}))) as client:
        yield client


def key(redis: Redis, name: str) -> dict[str, str]:
    _, token = KeyStore(redis).create(name, KeyLimits(rate_limit="10000/second"))
    return {"Authorization": f"Bearer {token}"}


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BLACK_MASK = b64_png(Image.new("L", (SIZE, SIZE), 0))  # keep every pixel: the output would be the input
PICTURE = b64_png(Image.new("RGB", (SIZE, SIZE), (10, 200, 30)))


@pytest.fixture
def finished(keyed: TestClient, redis: Redis, settings: Settings, engine) -> tuple[str, dict[str, str]]:
    """A succeeded job of key A, and A's headers."""
    owner = key(redis, "tenant-a")
    response = keyed.post("/v1/jobs", json=TINY_JOB, headers=owner)
    assert response.status_code == 202, response.text
    work(settings, engine)
    job = keyed.get(f"/v1/jobs/{response.json()['id']}", headers=owner).json()
    assert job["status"] == "succeeded", job
    return job["id"], owner


CASES = {
    "image with a black mask": lambda ref: {"image": ref, "mask": BLACK_MASK},
    "image, no mask": lambda ref: {"image": ref},
    "as the mask": lambda ref: {"image": PICTURE, "mask": ref},
    "image and mask": lambda ref: {"image": ref, "mask": ref},
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_another_keys_job_reference_answers_as_a_missing_job(keyed: TestClient, redis: Redis, finished, case) -> None:
    job_id, _ = finished
    intruder = key(redis, "tenant-b")
    missing_id = "f" * 32
    theirs = keyed.post("/v1/jobs", json={**TINY_JOB, **CASES[case](f"job:{job_id}/0")}, headers=intruder)
    missing = keyed.post("/v1/jobs", json={**TINY_JOB, **CASES[case](f"job:{missing_id}/0")}, headers=intruder)

    assert theirs.status_code == missing.status_code == 422, theirs.text
    assert theirs.text.replace(job_id, missing_id) == missing.text  # no oracle: the same body, id aside
    assert theirs.json()["fields"][0]["field"] in ("image", "mask")


def test_the_owner_may_still_chain_its_own_jobs(keyed: TestClient, finished) -> None:
    job_id, owner = finished
    response = keyed.post("/v1/jobs", json={**TINY_JOB, "image": f"job:{job_id}/0", "mask": BLACK_MASK}, headers=owner)
    assert response.status_code == 202, response.text
    assert response.json()["request"]["image"]["source"] == f"job:{job_id}/0"
