"""app/api/routes/images.py: PNG downloads with ETag revalidation and cache headers."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient

from diffq.app.api.routes.images import etag_matches
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB, work

pytestmark = pytest.mark.usefixtures("served")


@pytest.fixture
def finished_job(client: TestClient, settings: Settings, engine) -> dict:
    job_id = client.post("/v1/jobs", json={**TINY_JOB, "num_images": 2}).json()["id"]
    work(settings, engine)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    return job


def test_image_is_a_png_with_etag_and_cache_headers(client: TestClient, finished_job: dict, settings: Settings) -> None:
    response = client.get(finished_job["images"][1]["url"])

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert response.headers["etag"] == f'"{hashlib.sha256(response.content).hexdigest()}"'
    assert response.headers["cache-control"] == f"private, max-age={settings.result_ttl}, immutable"


def test_if_none_match_gives_304_without_a_body(client: TestClient, finished_job: dict) -> None:
    url = finished_job["images"][0]["url"]
    etag = client.get(url).headers["etag"]

    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        response = client.get(url, headers={"If-None-Match": header})
        assert response.status_code == 304, header
        assert response.content == b""
        assert response.headers["etag"] == etag

    assert client.get(url, headers={"If-None-Match": '"stale"'}).status_code == 200


def test_images_differ_per_seed(client: TestClient, finished_job: dict) -> None:
    first, second = (client.get(image["url"]).content for image in finished_job["images"])
    assert first != second


def test_missing_images_are_404_with_an_error_body(client: TestClient, finished_job: dict) -> None:
    job_id = finished_job["id"]
    out_of_range = client.get(f"/v1/jobs/{job_id}/images/2.png")
    assert out_of_range.status_code == 404
    assert out_of_range.json()["code"] == "image_not_found"
    assert "images 0..1" in out_of_range.json()["message"]

    assert client.get("/v1/jobs/nope/images/0.png").json()["code"] == "job_not_found"
    assert client.get(f"/v1/jobs/{job_id}/images/-1.png").status_code == 422


def test_a_queued_job_has_no_images_yet(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
    response = client.get(f"/v1/jobs/{job_id}/images/0.png")
    assert response.status_code == 404
    assert "no images yet (status queued)" in response.json()["message"]


def test_etag_matching_follows_weak_comparison() -> None:
    assert etag_matches('W/"a"', '"a"')
    assert etag_matches('"b", "a"', '"a"')
    assert not etag_matches('"ab"', '"a"')
