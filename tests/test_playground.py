"""The playground page at `/`, driven in a real headless Chromium (Playwright) against real `diffq api` and
`diffq worker` processes: type a prompt, watch progress and previews arrive, see the image, cancel, edit.

Needs a Chromium executable: `$DIFFQ_TEST_CHROMIUM`, else `chromium` (Debian: `apt-get install chromium`) or
Chrome on PATH, else a browser Playwright downloaded itself. Without one the test is skipped (pip cannot
install a browser). It saves a screenshot under its tmp dir and copies it to docs/playground.png.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from redis import Redis

from app.embedded_redis import EmbeddedRedis
from tests.services import Services, services

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "model" / "shapes"
SCREENSHOT = REPO / "docs" / "playground.png"

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


def chromium_executable() -> str | None:
    """A Chromium/Chrome to drive: the environment's choice, one on PATH, or Playwright's own download."""
    chosen = os.environ.get("DIFFQ_TEST_CHROMIUM")
    if chosen:
        return chosen
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    try:
        with sync_api.sync_playwright() as playwright:
            bundled = playwright.chromium.executable_path
    except Exception:
        return None
    return bundled if bundled and Path(bundled).exists() else None


CHROMIUM = chromium_executable()
if CHROMIUM is None:
    pytest.skip("no Chromium executable found (apt-get install chromium, or set DIFFQ_TEST_CHROMIUM)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Services]:
    """API and a worker on the bundled shapes model (real pictures; the tiny model if it is not there)."""
    Redis.from_url(redis_server.url).flushall()
    model = SHAPES if (SHAPES / "model_index.json").exists() else tiny_model
    with services(redis_server.url, tmp_path_factory.mktemp("playground"), worker=model, ready="/readyz",
                  DIFFQ_PREVIEW_INTERVAL="0", DIFFQ_PROGRESS_INTERVAL="0.05", DIFFQ_JOB_LISTING="true") as started:
        yield started


@pytest.fixture(scope="module")
def browser(stack: Services) -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


# Samples the page every 10 ms, so the test can tell what a person would have seen on the way.
WATCH = """() => {
  window.__seen = {progress: [], previews: new Set(), statuses: new Set()};
  setInterval(() => {
    const bar = document.getElementById("progress");
    window.__seen.progress.push(bar.value / bar.max);
    const preview = document.getElementById("preview");
    if (!document.getElementById("preview-box").hidden && preview.complete && preview.naturalWidth > 0) {
      window.__seen.previews.add(preview.src);
    }
    window.__seen.statuses.add(document.getElementById("status").textContent);
  }, 10);
}"""
SEEN = "() => ({progress: __seen.progress, previews: [...__seen.previews], statuses: [...__seen.statuses]})"
ENDED = "() => document.body.dataset.state === 'done' || document.body.dataset.state === 'failed'"
RESULT_SHOWN = """() => {
  const images = document.querySelectorAll(".result-image");
  return document.body.dataset.state === "done" && images.length > 0
    && [...images].every((img) => img.complete && img.naturalWidth > 0);
}"""


def newest_job(stack: Services) -> dict:
    return httpx.get(f"{stack.url}/v1/jobs", params={"limit": 1}).json()["jobs"][0]


def test_a_person_generates_watches_it_emerge_cancels_and_edits(browser, stack: Services, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(f"{stack.url}/")
    page.wait_for_function("() => document.getElementById('model').options.length > 0 && "
                           "document.getElementById('model').value !== ''")
    page.evaluate(WATCH)

    # 1. Text to image: progress and previews arrive while it runs, then the image.
    page.fill("#prompt", "a large red circle in the center, blue background")
    page.fill("#steps", "40")
    page.fill("#seed", "42")
    page.click("#generate")
    page.wait_for_function(ENDED, timeout=180_000)
    assert page.text_content("#status").startswith("Done"), page.text_content("#error")
    page.wait_for_function(RESULT_SHOWN)
    seen = page.evaluate(SEEN)
    assert any(0 < fraction < 1 for fraction in seen["progress"]), "no progress between start and end was shown"
    assert seen["previews"], "no preview image was shown while the image emerged"
    assert page.text_content("#status").startswith("Done: 1 image(s), seed 42")
    first = newest_job(stack)
    assert first["status"] == "succeeded" and first["request"]["steps"] == 40
    shown = page.get_attribute(".result-image", "src")
    png = httpx.get(shown).content
    assert Image.open(io.BytesIO(png)).format == "PNG"

    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shutil.copyfile(tmp_path / "playground.png", SCREENSHOT)

    # 2. Cancel a long job once it runs.
    page.fill("#steps", "100")
    page.click("#generate")
    page.wait_for_function("() => document.getElementById('progress').value > 0", timeout=120_000)
    page.click("#cancel")
    page.wait_for_function("() => document.getElementById('status').textContent === 'Canceled.'", timeout=60_000)
    canceled = newest_job(stack)
    assert canceled["status"] == "canceled" and canceled["images"] == []

    # 3. Edit the first image (a reference to it, no re-upload): img2img at strength 0.5.
    page.click(".result button")
    assert page.input_value("#mode") == "img2img"
    page.fill("#steps", "20")
    page.eval_on_selector("#strength", "(el) => { el.value = '0.5'; el.dispatchEvent(new Event('input')); }")
    page.click("#generate")
    page.wait_for_function(ENDED, timeout=180_000)
    assert page.text_content("#status").startswith("Done"), page.text_content("#error")
    edited = newest_job(stack)
    assert edited["status"] == "succeeded", edited
    assert edited["request"]["mode"] == "img2img" and edited["request"]["strength"] == 0.5
    assert edited["request"]["image"]["source"] == f"job:{first['id']}/0"

    # 4. Inpaint with an uploaded image and mask (multipart from the page).
    image_path, mask_path = tmp_path / "photo.png", tmp_path / "mask.png"
    Image.open(io.BytesIO(png)).convert("RGB").save(image_path)
    mask = Image.new("L", (64, 64) if first["request"]["width"] == 64 else (16, 16), 0)
    mask.paste(255, (0, 0, mask.width // 2, mask.height))
    mask.save(mask_path)
    page.set_input_files("#image", str(image_path))
    page.set_input_files("#mask", str(mask_path))
    page.select_option("#mode", "inpaint")
    page.click("#generate")
    page.wait_for_function(ENDED, timeout=180_000)
    assert page.text_content("#status").startswith("Done"), page.text_content("#error")
    inpainted = newest_job(stack)
    assert inpainted["status"] == "succeeded", inpainted
    assert inpainted["request"]["mode"] == "inpaint" and inpainted["request"]["mask"]["source"] == "upload"
    page.close()
