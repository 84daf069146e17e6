"""app/client.py and the client commands (`diffq generate`, `jobs`, `cancel`) against a real `diffq api`
process; jobs run on a real diffq worker in this process (tests.helpers.work, the tiny model)."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from redis import Redis

from diffq.app.client import APIError, AsyncClient, Client, Event, JobFailed, WaitTimeout
from diffq.app.contract import keys
from diffq.app.contract.records import ModelRecord
from diffq.app.contract.tasks import queue_name
from diffq.app.embedded_redis import EmbeddedRedis, free_port
from diffq.app.settings import Settings
from tests.helpers import clean_environment, diffq_command, wait_for, work
from tests.services import Services, services

STEPS = 8


@pytest.fixture(scope="module")
def api(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """One `diffq api` process for the module (stateless: the per-test Redis flush does not matter to it)."""
    with services(redis_server.url, tmp_path_factory.mktemp("api"), DIFFQ_JOB_LISTING="true",
                  DIFFQ_OPENAI_TIMEOUT="60") as started:
        yield started


@pytest.fixture
def diffq(api: Services, served: ModelRecord) -> Iterator[Client]:
    with Client(api.url) as client:
        yield client


def queued(redis: Redis, model: str, count: int = 1) -> Callable[[], bool]:
    return lambda: redis.llen(f"rq:queue:{queue_name(model)}") >= count


def run_beside(target: Callable[[], Any], redis: Redis, settings: Settings, engine: Any, model: str) -> Any:
    """Run ``target`` (a client call that submits one job and waits) in a thread while a real
    worker here takes the job once it is queued; return what ``target`` returned."""
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["value"] = target()
        except BaseException as error:  # re-raised in the test's thread
            result["error"] = error

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    wait_for(lambda: queued(redis, model)() or not thread.is_alive(), timeout=30)
    work(settings, engine)
    thread.join(timeout=60)
    if "error" in result:
        raise result["error"]
    return result["value"]


def is_png(data: bytes, size: tuple[int, int] | None = None) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        return image.format == "PNG" and (size is None or image.size == size)


def test_generate_submits_waits_and_downloads(diffq: Client, redis: Redis, settings: Settings, engine,
                                              served: ModelRecord) -> None:
    result = run_beside(lambda: diffq.generate("a red circle", steps=STEPS, seed=7, num_images=2, timeout=60),
                        redis, settings, engine, served.name)

    assert result.job.status == "succeeded" and result.job["seeds"] == [7, 8]
    assert len(result.images) == 2 and all(is_png(png, (16, 16)) for png in result.images)
    assert diffq.download(result.job["images"][0]) == result.images[0]  # an image object works too


def test_events_stream_live_then_resume_after_an_event_id(diffq: Client, redis: Redis, settings: Settings,
                                                          engine, served: ModelRecord) -> None:
    job = diffq.submit(prompt="a red circle", steps=STEPS, seed=1)
    live: list[Event] = []
    reader = threading.Thread(target=lambda: live.extend(diffq.events(job, timeout=60)), daemon=True)
    reader.start()
    work(settings, engine)
    reader.join(timeout=60)

    types = [event.type for event in live]
    assert types[0] == "queued" and types[-1] == "succeeded" and "running" in types
    last = [e.data for e in live if e.type == "progress"][-1]
    assert last["step"] == last["total"] >= STEPS  # the tiny model's PNDM scheduler may add a step
    assert live[-1].data["images"] == 1
    resumed = list(diffq.events(job.id, last_event_id=live[1].id))
    assert [e.id for e in resumed] == [e.id for e in live[2:]]


class DropsOnce(httpx.HTTPTransport):
    """Cuts the first event stream after two events; records the Last-Event-ID of each stream request."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if not request.url.path.endswith("/events"):
            return response
        self.streams.append(request.headers.get("last-event-id"))
        if len(self.streams) > 1:
            return response

        def two_events_then_drop() -> Iterator[bytes]:
            buffer = b""
            for chunk in response.stream:
                buffer += chunk
                if buffer.count(b"\n\n") >= 2:
                    yield buffer[: _nth(buffer, b"\n\n", 2) + 2]
                    break
            response.close()
            raise httpx.ReadError("connection dropped (test)")

        return httpx.Response(response.status_code, headers=response.headers, stream=_Stream(two_events_then_drop()))


class _Stream(httpx.SyncByteStream):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks


def _nth(data: bytes, needle: bytes, n: int) -> int:
    index = -1
    for _ in range(n):
        index = data.index(needle, index + 1)
    return index


def test_events_resume_with_last_event_id_after_a_dropped_connection(
    api: Services, redis: Redis, settings: Settings, engine, served: ModelRecord
) -> None:
    transport = DropsOnce()
    with Client(api.url, transport=transport) as diffq:
        job = diffq.submit(prompt="a red circle", steps=STEPS, seed=2)
        work(settings, engine)  # the whole stream is there to read: queued … succeeded
        events = list(diffq.events(job, timeout=60))
        everything = list(diffq.events(job))

    assert [e.id for e in events] == [e.id for e in everything]  # nothing lost, nothing twice
    assert transport.streams[0] is None and transport.streams[1] == events[1].id


def test_wait_times_out_then_cancel_and_errors(diffq: Client) -> None:
    job = diffq.submit(prompt="a red circle", steps=STEPS)
    with pytest.raises(WaitTimeout) as timeout:
        diffq.wait(job, timeout=0.5)
    assert timeout.value.job.status == "queued"

    assert diffq.cancel(job).status == "canceled"
    assert diffq.cancel(job.id).status == "canceled"  # again: harmless
    assert diffq.wait(job.id, timeout=5).status == "canceled"
    with pytest.raises(APIError) as refused:
        diffq.submit(prompt=" ", steps=10_000)
    assert refused.value.status == 422 and refused.value.code == "invalid_request"
    assert {field["field"] for field in refused.value.fields} == {"prompt", "steps"}
    with pytest.raises(APIError) as missing:
        diffq.get("0" * 32)
    assert (missing.value.status, missing.value.code) == (404, "job_not_found")
    assert diffq.preview(job) is None


def test_generate_raises_job_failed_for_a_canceled_job(diffq: Client, api: Services) -> None:
    def cancel_soon() -> None:
        wait_for(lambda: diffq.jobs(limit=1), timeout=10)
        diffq.cancel(diffq.jobs(limit=1)[0])

    canceler = threading.Thread(target=cancel_soon, daemon=True)
    canceler.start()
    with pytest.raises(JobFailed) as failed:
        diffq.generate("a red circle", steps=STEPS, timeout=30, on_event=lambda event: None)
    canceler.join()
    assert failed.value.job.status == "canceled"


def test_uploads_bytes_and_paths_as_multipart(diffq: Client, redis: Redis, settings: Settings, engine,
                                              tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="PNG")
    (tmp_path / "input.png").write_bytes(buffer.getvalue())

    from_path = diffq.submit(prompt="blue background", image=tmp_path / "input.png", strength=0.5, steps=STEPS)
    product = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    product.paste((200, 30, 30, 255), (4, 4, 12, 12))
    cutout = io.BytesIO()
    product.save(cutout, format="PNG")
    from_bytes = diffq.submit(prompt="blue background", image=cutout.getvalue(), mask="alpha", steps=STEPS)
    work(settings, engine)

    assert from_path["request"]["mode"] == "img2img" and from_path["request"]["strength"] == 0.5
    assert from_bytes["request"]["mode"] == "inpaint"
    assert diffq.get(from_path).status == "succeeded"
    assert diffq.get(from_bytes).status == "succeeded"


def test_jobs_lists_the_newest_first_and_skips_deleted_ones(diffq: Client, redis: Redis) -> None:
    ids = [diffq.submit(prompt=f"job {n}", steps=STEPS).id for n in range(3)]
    assert [job.id for job in diffq.jobs(limit=2)] == [ids[2], ids[1]]

    diffq.delete(ids[1])

    assert [job.id for job in diffq.jobs(limit=5)] == [ids[2], ids[0]]
    assert redis.zcard(keys.owner_jobs("-")) == 2  # the deleted job's entry was dropped as the list met it


def test_async_client(api: Services, redis: Redis, settings: Settings, engine, served: ModelRecord) -> None:
    async def flow() -> tuple[Any, list[str]]:
        seen: list[str] = []
        async with AsyncClient(api.url) as diffq:
            result = await diffq.generate("a red circle", steps=STEPS, seed=3, timeout=60,
                                          on_event=lambda event: seen.append(event.type))
            again = await diffq.wait(result.job.id, timeout=5)
            events = [event async for event in diffq.events(result.job)]
            assert [e.type for e in events] == seen
            assert [job.id for job in await diffq.jobs(limit=1)] == [result.job.id]
            return (result, again, await diffq.models()), seen

    (result, again, models), seen = run_beside(lambda: asyncio.run(flow()), redis, settings, engine, served.name)

    assert result.job.status == again.status == "succeeded" and is_png(result.images[0])
    assert seen[0] == "queued" and seen[-1] == "succeeded" and "progress" in seen
    assert models[0]["name"] == served.name


def test_openai_endpoint_cancels_the_job_of_a_client_that_hangs_up(api: Services, redis: Redis,
                                                                   served: ModelRecord) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{api.url}/v1/images/generations", json={"prompt": "a red circle", "steps": STEPS}, timeout=1.5)
    job_id = wait_for(lambda: redis.zrange(keys.owner_jobs("-"), 0, 0), timeout=5)[0].decode()

    wait_for(lambda: httpx.get(f"{api.url}/v1/jobs/{job_id}").json()["status"] == "canceled", timeout=10)


# -- the diffq command ----------------------------------------------------------------------------


def diffq_cli(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([*diffq_command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_environment(), **kwargs)


def test_diffq_generate_shows_progress_and_writes_the_png(api: Services, redis: Redis, settings: Settings, engine,
                                                          served: ModelRecord, tmp_path: Path) -> None:
    out = tmp_path / "out" / "circle.png"
    process = diffq_cli("generate", "a red circle", "-o", str(out), "--steps", str(STEPS), "--seed", "5",
                        "--size", "16x16", "--n", "2", "--url", api.url)
    wait_for(lambda: queued(redis, served.name)() or process.poll() is not None, timeout=60)
    work(settings, engine)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stderr
    paths = [tmp_path / "out" / "circle-0.png", tmp_path / "out" / "circle-1.png"]
    assert stdout.split() == [str(path) for path in paths]
    assert all(is_png(path.read_bytes(), (16, 16)) for path in paths)
    assert "queued (seed 5)" in stderr
    assert "100%" in stderr and "succeeded" in stderr  # the progress bar, fed by the event stream


def test_diffq_jobs_and_cancel(diffq: Client, api: Services) -> None:
    job = diffq.submit(prompt="a blue square on the left", steps=STEPS)

    listing = diffq_cli("jobs", "--url", api.url)
    out, err = listing.communicate(timeout=60)
    assert listing.returncode == 0, err
    header, row = out.splitlines()[:2]
    assert header.split()[:3] == ["ID", "STATUS", "MODEL"]
    assert row.split()[:2] == [job.id, "queued"] and row.endswith("a blue square on the left")

    canceled = diffq_cli("cancel", job.id, "--url", api.url)
    out, err = canceled.communicate(timeout=60)
    assert (canceled.returncode, out.strip()) == (0, f"job {job.id} canceled"), err

    as_json = diffq_cli("jobs", "--json", "--limit", "1", "--url", api.url)
    out, _ = as_json.communicate(timeout=60)
    assert json.loads(out)[0]["status"] == "canceled"

    missing = diffq_cli("cancel", "0" * 32, "--url", api.url)
    _, err = missing.communicate(timeout=60)
    assert missing.returncode == 1 and "404 job_not_found" in err


def test_diffq_client_commands_say_when_the_api_is_unreachable() -> None:
    process = diffq_cli("jobs", "--url", f"http://127.0.0.1:{free_port()}")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2 and "cannot reach the API" in err


def test_the_api_process_logs_json_lines_with_job_ids(diffq: Client, api: Services) -> None:
    job = diffq.submit(prompt="a red circle", steps=STEPS)
    diffq.get(job)

    def logged() -> list[dict]:
        lines = [json.loads(line) for line in (api.log_dir / "api.log").read_text().splitlines()
                 if line.startswith("{")]
        return [line for line in lines if line.get("job_id") == job.id]

    about = wait_for(lambda: len(found := logged()) >= 2 and found, timeout=10)
    assert any(line["message"].startswith(f"job {job.id} queued") for line in about)
    assert any(line.get("path") == f"/v1/jobs/{job.id}" and line.get("status") == 200 for line in about)
