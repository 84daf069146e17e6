"""app/logs.py: JSON (or text) log lines, with the job id on every line about a job."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from diffq.app.contract.records import ModelRecord
from diffq.app.logs import job_context, resolve_format, setup
from diffq.app.settings import Settings

JOB = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """Logging set up as JSON into a buffer; the root logger restored afterwards."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    stream = io.StringIO()
    setup(format="json", level="info", stream=stream)
    yield stream
    for handler in list(root.handlers):
        if handler not in before:
            root.removeHandler(handler)
    root.setLevel(level)


def parsed(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_job_id_from_extra_context_or_the_message(lines: io.StringIO) -> None:
    log = logging.getLogger("diffq.test")
    log.info("explicit", extra={"job_id": JOB, "attempt": 2})
    with job_context("f" * 32):
        log.warning("from the context")
        log.info("job %s: taken along in the batch", JOB)  # names another job: that one
    log.info("job %s: attempt %d started", JOB, 1)  # how worker/runner.py words its lines
    log.info("diffq:shapes: diffq.worker.task.run_job('%s') (%s)", JOB, JOB)  # RQ's line
    log.info("nothing about a job; a sha256 %s is not one", "ab" * 32)

    first, second, batch, third, fourth, fifth = parsed(lines)
    assert first["job_id"] == JOB and first["attempt"] == 2 and first["level"] == "info"
    assert first["logger"] == "diffq.test" and first["time"].endswith("Z") and isinstance(first["process"], int)
    assert second["job_id"] == "f" * 32 and second["level"] == "warning"
    assert batch["job_id"] == JOB
    assert third["job_id"] == JOB and third["message"] == f"job {JOB}: attempt 1 started"
    assert fourth["job_id"] == JOB
    assert "job_id" not in fifth


def test_exceptions_and_uvicorn_access_lines_are_structured(lines: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("diffq.test").exception("failed")
    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET",
                                             f"/v1/jobs/{JOB}?wait=5", "1.1", 200)

    failure, access = parsed(lines)
    assert "ValueError: boom" in failure["exception"]
    assert (access["method"], access["status"], access["job_id"]) == ("GET", 200, JOB)


def test_text_format_and_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handler = setup(format="text", level="info", stream=stream)
    try:
        logging.getLogger("diffq.test").info("claimed", extra={"job_id": JOB})
    finally:
        root.removeHandler(handler)
    assert stream.getvalue().rstrip().endswith(f"diffq.test: claimed [job={JOB}]")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", Terminal()) == "text"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("json", Terminal()) == "json"


def test_setup_twice_keeps_one_handler(lines: io.StringIO) -> None:
    setup(format="json", stream=lines)
    logging.getLogger("diffq.test").info("once")
    assert len(parsed(lines)) == 1


def test_the_api_logs_each_job_it_queues_and_requests_about_a_job_carry_its_id(
    lines: io.StringIO, client: TestClient, served: ModelRecord, settings: Settings
) -> None:
    job = client.post("/v1/jobs", json={"prompt": "a red circle", "steps": 2}).json()
    logging.getLogger("diffq.test").info("inside a request's context? no")
    client.post(f"/v1/jobs/{job['id']}/cancel")

    records = parsed(lines)
    queued = [r for r in records if r["message"].startswith(f"job {job['id']} queued")]
    assert queued and queued[0]["job_id"] == job["id"] and queued[0]["logger"] == "diffq.app.core.jobs"
    canceled = [r for r in records if "canceled while queued" in r["message"]]
    assert canceled and canceled[0]["job_id"] == job["id"]
    assert "job_id" not in [r for r in records if r["logger"] == "diffq.test"][0]


def test_requests_under_a_job_path_run_in_that_jobs_context() -> None:
    import asyncio

    from diffq.app.logs import JobContextMiddleware, job_id_var

    seen = []

    async def app(scope: dict, receive: object, send: object) -> None:
        seen.append(job_id_var.get())

    for path in (f"/v1/jobs/{JOB}/events", f"/v1/jobs/{JOB}", "/v1/models", "/v1/jobs"):
        asyncio.run(JobContextMiddleware(app)({"type": "http", "path": path}, None, None))
    assert seen == [JOB, JOB, None, None]
