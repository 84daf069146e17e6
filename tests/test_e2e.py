"""End to end: real `diffq api` and `diffq worker` processes, the bundled shapes model, real pixels.

A client POSTs "a red circle, blue background", polls, downloads the PNG and
checks the background colour it asked for dominates; the same request and
seed, run again, gives the same bytes.
"""

from __future__ import annotations

import io
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from diffq.app.embedded_redis import EmbeddedRedis, free_port
from diffq.model.training.shapes_data import COLOURS
from tests.helpers import clean_environment, diffq_command, png_text, wait_for

SHAPES = Path(__file__).resolve().parent.parent / "model" / "shapes"

PALETTE = COLOURS  # the shapes world's colours, from the code that renders its training data

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (SHAPES / "model_index.json").exists(),
        reason="model/shapes/model_index.json does not exist yet (the bundled model is still being trained)",
    ),
]


def dominant_colour(png: bytes) -> str:
    """The palette colour most pixels are nearest to."""
    with Image.open(io.BytesIO(png)) as image:
        pixels = list(image.convert("RGB").getdata())

    def nearest(pixel: tuple[int, int, int]) -> str:
        return min(PALETTE, key=lambda name: sum((a - b) ** 2 for a, b in zip(pixel, PALETTE[name], strict=True)))

    return Counter(map(nearest, pixels)).most_common(1)[0][0]


@pytest.fixture
def service(redis_server: EmbeddedRedis, redis, tmp_path: Path) -> Iterator[str]:
    """`diffq api` and `diffq worker` as separate processes on the test Redis; yields the API's URL."""
    port = free_port()
    env = clean_environment(DIFFQ_REDIS_URL=redis_server.url, DIFFQ_TORCH_THREADS="1", DIFFQ_HEARTBEAT_INTERVAL="1")
    processes = []
    for name, args in (("api", ["api", "--port", str(port)]), ("worker", ["worker", "--model", str(SHAPES)])):
        log = (tmp_path / f"{name}.log").open("wb")
        processes.append(subprocess.Popen([*diffq_command(), *args], stdout=log, stderr=subprocess.STDOUT, env=env))
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if any(p.poll() is not None for p in processes):
                logs = "\n".join((tmp_path / f"{n}.log").read_text(errors="replace")[-3000:] for n in ("api", "worker"))
                raise AssertionError(f"a service process exited:\n{logs}")
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=240, interval=0.5)
        yield url
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                # uvicorn re-raises the SIGTERM it handled once shut down; RQ's worker exits 0.
                assert process.wait(timeout=30) in (0, -signal.SIGTERM)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise


def run(url: str, request: dict) -> tuple[dict, bytes]:
    """POST a job, poll it to the end, download its first image."""
    response = httpx.post(f"{url}/v1/jobs", json=request)
    assert response.status_code == 202, response.text
    location = response.headers["location"]

    def finished() -> dict | None:
        job = httpx.get(location).json()
        return job if job["status"] in ("succeeded", "failed", "canceled") else None

    job = wait_for(finished, timeout=180, interval=0.25)
    assert job["status"] == "succeeded", job
    image = httpx.get(job["images"][0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    return job, image.content


def test_the_picture_follows_the_prompt_and_is_reproducible(service: str) -> None:
    [model] = httpx.get(f"{service}/v1/models").json()["models"]
    assert model["name"] == "shapes"
    request = {"prompt": "a red circle, blue background", "seed": 1234}

    job, png = run(service, request)

    assert dominant_colour(png) == "blue"
    assert job["seeds"] == [1234] and job["attempt"] == 1
    text = png_text(png)
    assert (text["prompt"], text["model"], text["seed"]) == ("a red circle, blue background", "shapes", "1234")

    _, again = run(service, request)
    assert again == png


def test_an_edit_chains_from_an_earlier_job_through_a_multipart_upload_and_a_reference(service: str) -> None:
    """txt2img → outpaint it by reference → inpaint an uploaded mask over that: three real jobs."""
    first, first_png = run(service, {"prompt": "a small red circle in the center, blue background", "seed": 5})
    widened, widened_png = run(service, {"prompt": "blue background", "image": f"job:{first['id']}/0",
                                         "outpaint": {"left": 16, "right": 16}, "seed": 6})
    original = Image.open(io.BytesIO(first_png)).convert("RGB")
    wide = Image.open(io.BytesIO(widened_png)).convert("RGB")
    assert wide.size == (96, 64) and wide.crop((16, 0, 80, 64)).tobytes() == original.tobytes()
    assert dominant_colour(widened_png) == "blue"
    assert png_text(widened_png)["image_source"] == f"job:{first['id']}/0"

    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    response = httpx.post(
        f"{service}/v1/jobs",
        data={"prompt": "a large yellow square on the left, blue background", "image": f"job:{widened['id']}/0",
              "seed": "7"},
        files={"mask": ("mask.png", buffer.getvalue(), "image/png")},
    )
    assert response.status_code == 202, response.text
    job = wait_for(lambda: (j := httpx.get(response.headers["location"]).json())["status"] in ("succeeded", "failed")
                   and j, timeout=180, interval=0.25)
    assert job["status"] == "succeeded" and job["request"]["mode"] == "inpaint", job
    edited = Image.open(io.BytesIO(httpx.get(job["images"][0]["url"]).content)).convert("RGB")
    assert edited.crop((32, 0, 96, 64)).tobytes() == wide.crop((32, 0, 96, 64)).tobytes()
