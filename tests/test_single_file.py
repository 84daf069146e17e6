"""Single-file checkpoints (diffq.model.single_file): a tiny SD 1.x pipeline written to the original
one-file layout loads offline and gives the folder's pixels, and a real worker serves it."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from diffq.app.embedded_redis import EmbeddedRedis
from diffq.model.engine import Engine, GenerationRequest, weights_hash
from tests.helpers import wait_for
from tests.services import services
from tests.single_file_layout import write_single_file


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any attempt to reach a hub fails the test


@pytest.fixture(scope="module")
def checkpoint(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoints")
    return write_single_file(tiny_model, folder / "tiny-single.safetensors", config=tiny_model)


def pixels(engine: Engine) -> np.ndarray:
    [result] = engine.generate([GenerationRequest(prompt="a red circle", steps=2, seed=3)])
    return np.asarray(result.images[0])


def test_a_single_file_gives_the_pixels_of_its_diffusers_folder(tiny_model: Path, checkpoint: Path) -> None:
    from_file = Engine.load(checkpoint, device="cpu", dtype="float32")
    assert from_file.info.name == "tiny-single"
    assert from_file.info.pipeline_class == "StableDiffusionPipeline"
    assert from_file.info.weights_hash == weights_hash(checkpoint) != weights_hash(tiny_model)
    assert np.array_equal(pixels(from_file), pixels(Engine.load(tiny_model, device="cpu", dtype="float32")))


def test_the_config_folder_can_come_from_the_setting_instead_of_a_sidecar(tiny_model: Path, checkpoint: Path,
                                                                            tmp_path: Path) -> None:
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(checkpoint.read_bytes())
    with pytest.raises(FileNotFoundError, match="DIFFQ_SINGLE_FILE_CONFIG"):
        Engine.load(bare, device="cpu")
    assert Engine.load(bare, device="cpu", single_file_config=tiny_model).info.name == "bare"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_serves_a_single_file_checkpoint(checkpoint: Path, redis_server: EmbeddedRedis,
                                                   tmp_path: Path) -> None:
    with services(redis_server.url, tmp_path, worker=checkpoint, ready="/readyz", HF_HUB_OFFLINE="1",
                  DIFFQ_DEVICE="cpu") as stack:
        http = httpx.Client(base_url=stack.url, timeout=30)
        wait_for(lambda: [m["name"] for m in http.get("/v1/models").json()["models"]] == ["tiny-single"], 120)
        job = http.post("/v1/jobs", json={"prompt": "a red circle", "steps": 2}).json()
        done = wait_for(lambda: (j := http.get(f"/v1/jobs/{job['id']}").json())["status"] in ("succeeded", "failed")
                        and j, 120)
        assert done["status"] == "succeeded", stack.logs()
        assert http.get(f"/v1/jobs/{job['id']}/images/0.png").status_code == 200
