"""LoRA adapters at the API: GET /v1/loras, `loras` and `<lora:name:weight>` on jobs (and the OpenAI
endpoint), refused with a 422 naming what is available; the job resource records name, weight, hash."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from diffq.app.contract.adapters import list_adapters, parse_prompt
from diffq.app.contract.records import ModelRecord
from diffq.app.main import create_app
from diffq.app.settings import Settings
from tests.tiny_loras import write_tiny_lora


@pytest.fixture(scope="module")
def lora_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    write_tiny_lora(tiny_model, folder, "ink", base_model="tiny", seed=1)
    write_tiny_lora(tiny_model, folder, "paper", base_model=None, seed=2)  # base not recorded: fits any model
    write_tiny_lora(tiny_model, folder, "xl-style", base_model="sdxl", seed=3)
    return folder


@pytest.fixture
def api(settings: Settings, lora_dir: Path, served: ModelRecord) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"lora_dir": lora_dir}))) as client:
        yield client


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lists_every_adapter_with_its_base_model_hash_and_size(api: TestClient, lora_dir: Path) -> None:
    listed = {lora["name"]: lora for lora in api.get("/v1/loras").json()["loras"]}
    assert sorted(listed) == ["ink", "paper", "xl-style"]
    ink = lora_dir / "ink.safetensors"
    assert listed["ink"] == {"name": "ink", "base_model": "tiny", "sha256": sha(ink), "size_bytes": ink.stat().st_size}
    assert listed["paper"]["base_model"] is None
    assert [a.name for a in list_adapters(lora_dir)] == ["ink", "paper", "xl-style"]  # the plain function


def test_a_job_records_each_adapter_by_name_weight_and_hash(api: TestClient, lora_dir: Path) -> None:
    body = {"prompt": "a red circle", "steps": 2, "loras": [{"name": "ink", "weight": 0.8}, {"name": "paper"}]}
    job = api.post("/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    assert job.json()["request"]["loras"] == [
        {"name": "ink", "weight": 0.8, "sha256": sha(lora_dir / "ink.safetensors")},
        {"name": "paper", "weight": 1.0, "sha256": sha(lora_dir / "paper.safetensors")},
    ]


def test_a1111_prompt_tags_mean_the_same_and_leave_the_prompt(api: TestClient) -> None:
    tagged = api.post("/v1/jobs", json={"prompt": "a red circle <lora:ink:0.8>, <lora:paper>", "steps": 2}).json()
    listed = api.post("/v1/jobs", json={"prompt": "a red circle", "steps": 2,
                                        "loras": [{"name": "ink", "weight": 0.8}, {"name": "paper"}]}).json()
    assert tagged["request"]["prompt"] == "a red circle"
    assert tagged["request"]["loras"] == listed["request"]["loras"]


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"loras": [{"name": "nope"}]}, "loras[0]", "unknown adapter 'nope'; available for model 'tiny': ink, paper"),
    ({"loras": [{"name": "xl-style"}]}, "loras[0]", "is for base model 'sdxl'"),
    ({"prompt": "a red circle <lora:nope:1>"}, "prompt", "unknown adapter 'nope'"),
    ({"prompt": "a red circle <lora:ink:9>"}, "prompt", "from -2 to 2"),
    ({"loras": [{"name": "ink"}, {"name": "ink"}]}, "loras[1]", "asked for twice"),
])
def test_unknown_incompatible_or_out_of_range_adapters_are_a_422_naming_what_is_available(
    api: TestClient, body: dict, field: str, words: str
) -> None:
    response = api.post("/v1/jobs", json={"prompt": "a red circle", "steps": 2, **body})
    assert response.status_code == 422, response.text
    text = response.text
    assert field in text and words in text


def test_a_weight_out_of_range_in_the_list_is_a_422(api: TestClient) -> None:
    response = api.post("/v1/jobs", json={"prompt": "a red circle", "loras": [{"name": "ink", "weight": 3}]})
    assert response.status_code == 422
    assert "loras" in response.text and "2" in response.text


def test_the_openai_endpoint_takes_loras_as_an_extra_field(api: TestClient) -> None:
    response = api.post("/v1/images/generations", json={"prompt": "a red circle", "loras": [{"name": "nope"}]})
    assert response.status_code == 400, response.text
    assert "unknown adapter 'nope'" in response.json()["error"]["message"]


def test_parse_prompt_reads_tags_with_and_without_weights() -> None:
    assert parse_prompt("a cat <lora:ink:0.5> <lora:paper>") == ("a cat", [("ink", "0.5"), ("paper", "")])
    assert parse_prompt("no tags here") == ("no tags here", [])


def test_a1111_clients_see_the_same_adapters_in_sdapi_loras(api: TestClient, lora_dir: Path) -> None:
    listed = api.get("/sdapi/v1/loras").json()
    assert [lora["name"] for lora in listed] == ["ink", "paper", "xl-style"]
    ink = listed[0]
    assert ink["alias"] == "ink" and ink["path"] == "ink.safetensors"  # the file's name, never a server path
    assert ink["metadata"]["sha256"] == sha(lora_dir / "ink.safetensors")
