"""POST /v1/images/edits and /variations in process: what is refused, in OpenAI's error shape, before any
job is queued. (The official client against real processes: tests/test_clients_live.py.)"""

from __future__ import annotations

import io

import httpx
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from diffq.app.contract import keys
from diffq.app.contract.records import ModelRecord


def png(colour: str = "yellow", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def error_of(response: httpx.Response) -> dict:
    """The OpenAI error body of a 400."""
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_bad_edits_are_400s_naming_the_parameter_and_queue_nothing(client: TestClient, served: ModelRecord,
                                                                   redis: Redis) -> None:
    image = {"image": ("a.png", png(), "image/png")}
    gif = client.post("/v1/images/edits", data={"prompt": "x", "output_format": "gif"}, files=image)
    assert error_of(gif)["param"] == "output_format"  # png, webp and jpeg are made
    assert error_of(client.post("/v1/images/edits", data={"prompt": "x"}))["param"] == "image"
    assert error_of(client.post("/v1/images/edits", data={"prompt": "x", "quality": "high", "colour": "red"},
                                files=image))["param"] == "colour"
    two = [("image[]", ("a.png", png(), "image/png")), ("image[]", ("b.png", png(), "image/png"))]
    assert error_of(client.post("/v1/images/edits", data={"prompt": "x"}, files=two))["param"] == "image"
    opaque = client.post("/v1/images/edits", data={"prompt": "x"},
                         files={**image, "mask": ("m.png", png("white"), "image/png")})
    assert error_of(opaque)["param"] == "mask" and "transparent" in error_of(opaque)["message"]
    not_an_image = client.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", b"GIF89a", "x")})
    assert error_of(not_an_image)["param"] == "image"
    broken = client.post("/v1/images/edits", content=b"--b\r\n-9726416--b--\r\n",
                         headers={"content-type": "multipart/form-data; boundary=b"})
    assert error_of(broken)["type"] == "invalid_request_error"
    no_prompt = client.post("/v1/images/variations", files={"image": ("a.png", png(), "image/png")})
    assert error_of(no_prompt)["param"] == "prompt"
    assert client.post("/v1/images/variations", data={"prompt": "x"},
                       files={**image, "mask": ("m.png", png(), "image/png")}).status_code == 400
    assert redis.zcard(keys.owner_jobs("-")) == 0


def test_a_malformed_multipart_job_is_a_422_naming_the_body(client: TestClient, served: ModelRecord) -> None:
    response = client.post("/v1/jobs", content=b"--b\r\n-9726416--b--\r\n",
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 422 and response.json()["fields"][0]["field"] == "body"
