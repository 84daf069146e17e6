"""The playground page at `/`, driven in a real headless Chromium (Playwright) against real `diffq api` and
`diffq worker` processes: type a prompt, watch progress and previews arrive, see the image, cancel, edit;
and against an API that needs keys: the page asks for one, then sends it with every request (events read
with fetch, images fetched as blobs), never in a URL.

Needs a Chromium executable: `$DIFFQ_TEST_CHROMIUM`, else `chromium` (Debian: `apt-get install chromium`) or
Chrome on PATH, else a browser Playwright downloaded itself. Without one the test is skipped (pip cannot
install a browser). It saves a screenshot under its tmp dir and copies it to docs/playground.png.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image
from redis import Redis

from diffq.app.auth.apikeys import KeyStore
from diffq.app.embedded_redis import EmbeddedRedis
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


@contextmanager
def started_stack(redis_url: str, tiny_model: Path, log_dir: Path, **environment: str) -> Iterator[Services]:
    """API and a worker on the bundled shapes model (real pictures; the tiny model if it is not there)."""
    Redis.from_url(redis_url).flushall()
    model = SHAPES if (SHAPES / "model_index.json").exists() else tiny_model
    with services(redis_url, log_dir, worker=model, ready="/readyz", DIFFQ_PREVIEW_INTERVAL="0",
                  DIFFQ_PROGRESS_INTERVAL="0.05", **environment) as started:
        yield started


@pytest.fixture
def stack(redis_server: EmbeddedRedis, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Services]:
    """Without keys (DIFFQ_AUTH=off), listing on."""
    with started_stack(redis_server.url, tiny_model, tmp_path_factory.mktemp("playground"),
                       DIFFQ_JOB_LISTING="true") as started:
        yield started


@pytest.fixture
def keyed_stack(redis_server: EmbeddedRedis, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Services]:
    """An API that needs keys (DIFFQ_AUTH=keys)."""
    with started_stack(redis_server.url, tiny_model, tmp_path_factory.mktemp("playground-keys"),
                       DIFFQ_AUTH="keys") as started:
        yield started


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def console_errors(page) -> list[str]:
    """The page's console errors and uncaught exceptions, as they happen."""
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    return errors


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
    errors = console_errors(page)
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
    assert errors == [], errors
    page.close()


# What Chromium logs for every response with status 401 (the key is missing or refused, as the test wants).
REFUSED = "Failed to load resource: the server responded with a status of 401"
KEY_STORAGE = "diffq.playground.apiKey"


def test_with_keys_the_page_asks_for_one_then_sends_it_everywhere(
    browser, keyed_stack: Services, redis_server: EmbeddedRedis
) -> None:
    stack = keyed_stack
    _, token = KeyStore(Redis.from_url(redis_server.url)).create("page")
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors = console_errors(page)
    requests: list[tuple[str, dict[str, str]]] = []
    page.on("request", lambda request: requests.append((request.url, request.headers)))
    page.goto(f"{stack.url}/")

    # 1. No key: the model list and a submission are refused, and the page says why, by the key field.
    page.wait_for_function("() => document.getElementById('key-message').textContent.includes('needs an API key')",
                           timeout=60_000)
    page.fill("#prompt", "a small red circle on the left, blue background")
    page.fill("#steps", "30")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_function(ENDED, timeout=60_000)
    assert page.evaluate("document.body.dataset.state") == "failed"
    assert "needs an API key" in page.text_content("#key-message")
    assert page.is_visible("#key-message")

    # 2. A wrong key: refused.
    page.fill("#api-key", "dq_000000000000_" + "A" * 43)
    page.evaluate("document.body.dataset.state = ''")
    page.click("#generate")
    page.wait_for_function(ENDED, timeout=60_000)
    assert page.evaluate("document.body.dataset.state") == "failed"
    page.wait_for_function("() => document.getElementById('key-message').textContent.includes('was refused')")

    # 3. The key: models load, the image is made; progress and previews arrive over the fetch-read stream.
    # The first event stream is cut after one event: the page reconnects with Last-Event-ID, as EventSource would.
    page.fill("#api-key", token)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("() => document.getElementById('model').value !== ''", timeout=60_000)
    assert page.is_hidden("#key-message")
    assert page.evaluate(f"localStorage.getItem('{KEY_STORAGE}')") == token
    cut: list[str] = []

    def cut_first_stream(route) -> None:
        if cut:
            route.continue_()
            return
        cut.append(route.request.url)
        route.fulfill(status=200, headers={"content-type": "text/event-stream", "cache-control": "no-store"},
                      body=': ping\n\nid: 0-0\nevent: queued\ndata: {"status": "queued"}\n\n')

    page.route("**/v1/jobs/*/events", cut_first_stream)
    page.evaluate(WATCH)
    page.click("#generate")
    page.wait_for_function(ENDED, timeout=180_000)
    assert page.text_content("#status").startswith("Done: 1 image(s), seed 7"), page.text_content("#error")
    page.wait_for_function(RESULT_SHOWN, timeout=30_000)
    seen = page.evaluate(SEEN)
    assert any(0 < fraction < 1 for fraction in seen["progress"]), "no progress between start and end was shown"
    assert seen["previews"] and all(src.startswith("blob:") for src in seen["previews"]), seen["previews"]
    assert page.get_attribute(".result-image", "src").startswith("blob:")
    assert page.get_attribute(".result a", "href").startswith("blob:")
    png = page.evaluate("""async () => {
      const blob = await (await fetch(document.querySelector('.result-image').src)).blob();
      return [...new Uint8Array(await blob.arrayBuffer()).slice(0, 8)];
    }""")
    assert bytes(png) == b"\x89PNG\r\n\x1a\n"

    streams = [headers for url, headers in requests if url.endswith("/events")]
    assert len(cut) == 1 and len(streams) >= 2, streams
    assert streams[1].get("last-event-id") == "0-0", streams[1]
    authorized = [(url, headers) for url, headers in requests if "/v1/" in url and not url.startswith("blob:")]
    with_key = [url for url, headers in authorized if headers.get("authorization") == f"Bearer {token}"]
    assert any(url.endswith("/events") for url in with_key) and any("/preview.png" in url for url in with_key)
    assert any("/images/0.png" in url for url in with_key)
    assert not any(token in url for url, _ in requests), "the key went into a URL"
    job = httpx.get(f"{stack.url}/v1/jobs", params={"limit": 1},
                    headers={"Authorization": f"Bearer {token}"}).json()["jobs"][0]
    assert job["status"] == "succeeded" and job["request"]["seed"] == 7

    # 4. The browser remembers the key; "forget" removes it.
    page.reload()
    assert page.input_value("#api-key") == token
    page.wait_for_function("() => document.getElementById('model').value !== ''", timeout=60_000)
    page.click("#forget-key")
    assert page.input_value("#api-key") == ""
    assert page.evaluate(f"localStorage.getItem('{KEY_STORAGE}')") is None
    page.wait_for_function("() => document.getElementById('key-message').textContent.includes('needs an API key')",
                           timeout=60_000)

    unexpected = [error for error in errors if not error.startswith(REFUSED)]
    assert unexpected == [], unexpected
    page.close()
