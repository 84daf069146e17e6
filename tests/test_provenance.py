"""Every output says it was generated: the IPTC label (XMP), C2PA content credentials signed last,
an invisible watermark, and ``diffq verify`` / ``POST /v1/verify`` reading them back."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import c2pa
import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from diffq.app.contract.records import JobMode, JobParams
from diffq.app.provenance import credentials, labels, watermark
from diffq.app.provenance.credentials import ContentSigner, CredentialsError
from diffq.app.provenance.verify import verify
from diffq.app.settings import Settings
from tests.certificates import make_chain
from tests.helpers import TINY_JOB, clean_environment, diffq_command, post, work
from tests.pngchunks import change_one_pixel, rewrite_text
from tests.services import services
from diffq.worker.marking import Marker, SigningFailedError

PAYLOAD = "diffq-test"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_chain(tmp_path_factory.mktemp("c2pa"))


def _params(**changes: object) -> JobParams:
    base = dict(prompt="a red circle", width=64, height=64, steps=2, guidance_scale=5.0, scheduler="ddim", seed=3)
    return JobParams(**{**base, **changes})


def _picture(size: int = 64) -> Image.Image:
    """Something with edges and gradients, like a generated image (not flat: JPEG and watermarks care)."""
    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    image.paste((200, 30, 40), (size // 4, size // 4, size // 2, size // 2))
    return image


def _iptc_by_pillow(data: bytes) -> str | None:
    """The digital source type as Pillow's own XMP reader (not diffq's) sees it."""
    with Image.open(io.BytesIO(data)) as image:
        xmp = image.getxmp()
    description = xmp["xmpmeta"]["RDF"]["Description"]
    return description.get("DigitalSourceType")


def test_every_output_carries_the_iptc_label_even_with_metadata_off(
    client: TestClient, settings: Settings, engine, served
) -> None:
    kept, stripped = post(client, TINY_JOB), post(client, {**TINY_JOB, "metadata": False})
    work(settings, engine)

    for job_id, parameters in ((kept, True), (stripped, False)):
        png = client.get(f"/v1/jobs/{job_id}/images/0.png").content
        assert _iptc_by_pillow(png) == labels.GENERATED
        assert ("prompt" in Image.open(io.BytesIO(png)).text) is parameters
        report = verify(png)
        assert report["iptc"] == {"digital_source_type": labels.GENERATED, "ai_generated": True}
        assert report["c2pa"]["present"] is False  # no certificate configured here


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool (Debian: libimage-exiftool-perl) not installed")
def test_exiftool_reads_the_label(tmp_path: Path) -> None:
    marked = Marker().finish(_picture(), _params(), 3, _model())
    path = tmp_path / "out.png"
    path.write_bytes(marked.data)
    found = subprocess.run(["exiftool", "-s3", "-XMP-iptcExt:DigitalSourceType", str(path)],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found == labels.GENERATED


def test_an_edit_is_labelled_composite_and_signed_as_edited_with_its_input(chain: tuple[Path, Path]) -> None:
    source = io.BytesIO()
    _picture().save(source, format="PNG")
    signer = ContentSigner.from_files(*chain)
    params = _params(mode=JobMode.IMG2IMG, strength=0.6)
    marked = Marker(signer=signer).finish(_picture(), params, 3, _model(), {"image": source.getvalue()})

    assert _iptc_by_pillow(marked.data) == labels.EDITED
    found = credentials.read(marked.data, "image/png")
    assert found["valid"] and found["failures"] == ["signingCredential.untrusted"]
    assert found["actions"] == ["c2pa.opened", "c2pa.edited"] and found["digital_source_type"] == labels.EDITED
    assert found["ingredients"] == ["input.png"]


def test_signing_is_last_so_one_pixel_or_one_text_chunk_changed_fails_validation(chain: tuple[Path, Path]) -> None:
    marked = Marker(signer=ContentSigner.from_files(*chain)).finish(_picture(), _params(), 3, _model())
    found = credentials.read(marked.data, "image/png")
    assert found["valid"], found
    assert found["actions"] == ["c2pa.created"] and found["digital_source_type"] == labels.GENERATED
    assert found["generator"][0].startswith("diffq ")
    assert found["parameters"]["model"] == "shapes" and found["parameters"]["weights_hash"] == "ab" * 32
    assert found["signer"]["common_name"] == "diffq test signer"

    for tampered in (change_one_pixel(marked.data), rewrite_text(marked.data, "seed", "4")):
        assert tampered != marked.data
        broken = credentials.read(tampered, "image/png")
        assert broken["present"] and not broken["valid"]
        assert "assertion.dataHash.mismatch" in broken["failures"]


def test_policy_off_and_optional_without_signer_leave_images_unsigned(chain: tuple[Path, Path]) -> None:
    signer = ContentSigner.from_files(*chain)
    off = Marker(signer=signer).finish(_picture(), _params(content_credentials="off"), 3, _model())
    assert credentials.read(off.data)["present"] is False
    assert labels.label_of(off.data) == labels.GENERATED
    unsigned = Marker().finish(_picture(), _params(), 3, _model())
    assert credentials.read(unsigned.data)["present"] is False
    with pytest.raises(SigningFailedError, match="DIFFQ_C2PA_CERT"):
        Marker().finish(_picture(), _params(content_credentials="required"), 3, _model())


def test_a_key_that_requires_credentials_is_refused_at_submit_when_nothing_signs(settings: Settings, served) -> None:
    from diffq.app.main import create_app

    strict = settings.model_copy(update={"content_credentials": "required"})
    with TestClient(create_app(strict)) as client:
        answer = client.post("/v1/jobs", json=TINY_JOB)
    assert answer.status_code == 503
    assert answer.json()["code"] == "content_credentials_unavailable"
    assert "DIFFQ_C2PA_CERT" in answer.json()["message"]


def test_a_certificate_the_library_refuses_stops_the_worker_at_start(tmp_path: Path, tiny_model: Path) -> None:
    cert, key = make_chain(tmp_path / "bad", usable=False)
    with pytest.raises(CredentialsError, match="DIFFQ_C2PA_CERT"):
        ContentSigner.from_files(cert, key)
    ran = subprocess.run([*diffq_command(), "worker", "--model", str(tiny_model)], capture_output=True, text=True,
                         timeout=60, env=clean_environment(DIFFQ_C2PA_CERT=str(cert), DIFFQ_C2PA_KEY=str(key),
                                                           DIFFQ_REDIS_URL="redis://127.0.0.1:1/0"))
    assert ran.returncode == 2 and "DIFFQ_C2PA_CERT" in ran.stderr
    only_cert = Settings(_env_file=None, c2pa_cert=cert)
    with pytest.raises(CredentialsError, match="DIFFQ_C2PA_KEY"):
        Marker.from_settings(only_cert)


def test_the_watermark_outlives_jpeg_80_and_half_size() -> None:
    """On a picture with flat areas and edges, as generated images have (a tiny random pipeline's
    noise does not survive JPEG: bench/provenance.py reports both)."""
    payload = PAYLOAD.encode()
    image = Image.open(io.BytesIO(Marker(payload=payload).finish(_picture(512), _params(), 3, _model()).data))
    assert watermark.read(image, payload)["bit_accuracy"] == 1.0
    jpeg = io.BytesIO()
    image.convert("RGB").save(jpeg, format="JPEG", quality=80)
    assert watermark.read(Image.open(jpeg), payload)["bit_accuracy"] == 1.0
    half = image.resize((256, 256), Image.Resampling.BICUBIC)
    assert watermark.read(half, payload)["found"]
    assert not watermark.read(_picture(512), payload)["found"]  # and an unmarked picture has none


def test_small_images_get_no_watermark_and_the_job_says_so() -> None:
    marked = Marker(payload=PAYLOAD.encode()).finish(_picture(64), _params(), 3, _model())
    assert marked.warnings and "256×256" in marked.warnings[0]


@pytest.mark.slow
def test_signed_labelled_watermarked_jobs_through_real_processes(
    redis_server, tiny_model: Path, chain: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    cert, key = chain
    model = tmp_path_factory.mktemp("models") / "tiny-256"
    shutil.copytree(tiny_model, model)
    (model / "diffq.json").write_text(json.dumps({"max_size": 256}))  # the watermark needs 256×256
    with services(redis_server.url, tmp_path_factory.mktemp("marks"), worker=model, ready="/readyz",
                  DIFFQ_C2PA_CERT=str(cert), DIFFQ_C2PA_KEY=str(key), DIFFQ_WATERMARK_PAYLOAD=PAYLOAD,
                  DIFFQ_BATCH_MAX="1") as running:
        api = httpx.Client(base_url=running.url, timeout=60)
        created = _run(api, {**TINY_JOB, "width": 256, "height": 256})
        png = api.get(created["images"][0]["url"]).content
        edited = _run(api, {**TINY_JOB, "width": 256, "height": 256, "image": f"job:{created['id']}/0",
                            "strength": 0.6})
        edit_png = api.get(edited["images"][0]["url"]).content
        small = _run(api, TINY_JOB)
        answer = api.post("/v1/verify", files=[("file", ("a.png", png, "image/png")),
                                               ("file", ("b.png", edit_png, "image/png"))])

    report = verify(png, PAYLOAD.encode())
    assert report["c2pa"]["valid"] and report["c2pa"]["actions"] == ["c2pa.created"]
    assert report["iptc"]["ai_generated"] and report["parameters"]["prompt"] == "a red circle"
    assert report["watermark"] == {"checked": True, "found": True, "bit_accuracy": 1.0, "payload": PAYLOAD}
    edit = verify(edit_png)
    assert edit["c2pa"]["valid"] and edit["c2pa"]["actions"] == ["c2pa.opened", "c2pa.edited"]
    assert edit["c2pa"]["ingredients"] == ["input.png"] and edit["iptc"]["digital_source_type"] == labels.EDITED
    assert any("watermark" in warning for warning in small["warnings"])

    assert answer.status_code == 200, answer.text
    first, second = answer.json()["images"]
    assert first["c2pa"]["valid"] and first["c2pa"]["signer"]["common_name"] == "diffq test signer"
    assert second["iptc"]["digital_source_type"] == labels.EDITED
    assert first["watermark"]["checked"] is False  # the API process never imports torch



def test_diffq_verify_reports_each_file_and_fails_on_a_tampered_one(chain: tuple[Path, Path], tmp_path: Path) -> None:
    marked = Marker(signer=ContentSigner.from_files(*chain)).finish(_picture(), _params(), 3, _model())
    good, bad, plain = tmp_path / "good.png", tmp_path / "bad.png", tmp_path / "plain.png"
    good.write_bytes(marked.data)
    bad.write_bytes(change_one_pixel(marked.data))
    _picture().save(plain)

    ok = subprocess.run([*diffq_command(), "verify", str(good)], capture_output=True, text=True, timeout=60,
                        env=clean_environment())
    assert ok.returncode == 0, ok.stderr
    assert "valid, signed by 'diffq test signer'" in ok.stdout and labels.GENERATED in ok.stdout
    for path in (bad, plain):
        failed = subprocess.run([*diffq_command(), "verify", str(path)], capture_output=True, text=True, timeout=60,
                                env=clean_environment())
        assert failed.returncode == 1, failed.stdout


def test_verify_refuses_what_is_not_an_image(client: TestClient) -> None:
    answer = client.post("/v1/verify", files={"file": ("x.png", b"not an image", "image/png")})
    assert answer.status_code == 422 and answer.json()["fields"][0]["field"] == "file[0]"


def _run(api: httpx.Client, body: dict) -> dict:
    job_id = api.post("/v1/jobs", json=body).json()["id"]
    job = api.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
    assert job["status"] == "succeeded", job
    return job


def _model():
    from tests.test_png import MODEL

    return MODEL


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_jpeg_and_webp_carry_the_label_and_validate_when_signed(chain: tuple[Path, Path], output_format: str) -> None:
    signer = ContentSigner.from_files(*chain)
    for metadata in (True, False):
        marked = Marker(signer=signer).finish(_picture(), _params(output_format=output_format, metadata=metadata),
                                              3, _model())
        assert marked.content_type == f"image/{output_format}"
        assert _iptc_by_pillow(marked.data) == labels.GENERATED
        report = verify(marked.data)
        assert report["format"] == output_format and report["iptc"]["ai_generated"]
        assert report["c2pa"]["valid"] and report["c2pa"]["actions"] == ["c2pa.created"], report["c2pa"]
