"""A Python client for diffq's REST API: ``Client`` (sync) and ``AsyncClient`` (asyncio), on httpx.

Needs only httpx (no torch, no diffq server code)::

    from diffq.app.client import Client

    with Client("http://127.0.0.1:8000", api_key="dq_...") as diffq:           # or $DIFFQ_URL, $DIFFQ_API_KEY
        result = diffq.generate("a red circle, blue background", seed=42)      # submit, wait, download
        open("circle.png", "wb").write(result.images[0])

        job = diffq.submit(prompt="a blue square", steps=30)                   # or step by step
        for event in diffq.events(job):                                        # server-sent events
            print(event.type, event.data)                                      # queued, running, progress, …
        job = diffq.wait(job, timeout=60)                                      # long poll
        pngs = [diffq.download(url) for url in job.image_urls]

``submit`` takes the fields of ``POST /v1/jobs``; ``image``/``mask`` given as ``bytes`` or a
``pathlib.Path`` are uploaded as files (multipart), a ``str`` is sent as is (base64, a data: URL,
``job:<id>/<n>``). Errors from the API raise ``APIError`` (``status``, ``code``, ``message``,
``fields``); ``wait`` past its timeout raises ``WaitTimeout``; ``generate`` raises ``JobFailed`` for
a job that failed or was canceled. ``events`` reconnects after a dropped connection, resuming with
``Last-Event-ID``, and ends after the job's terminal event.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from diffq.app.client_batches import BatchMethods

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
#: Event types after which a job's stream ends.
FINAL_EVENTS = TERMINAL | {"deleted"}
#: Longest single long poll the API accepts (``GET /v1/jobs/{id}?wait=``).
MAX_WAIT = 60.0
#: Read timeout of an event stream: the API sends a keep-alive comment every 15 s.
STREAM_READ_TIMEOUT = 45.0
RECONNECTS = 5


class APIError(Exception):
    """A non-2xx answer: its HTTP status and diffq's error body ``{code, message, fields}``."""

    def __init__(self, status: int, code: str, message: str, fields: list[dict[str, str]] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.fields = status, code, message, fields or []


class WaitTimeout(TimeoutError):
    """The job had not ended when the wait's timeout passed; ``job`` is how it was then."""

    def __init__(self, job: Job, timeout: float) -> None:
        super().__init__(f"job {job.id} still {job.status} after {timeout:g} s")
        self.job = job


class JobFailed(Exception):
    """The job ended ``failed`` or ``canceled``; ``job.error`` says why."""

    def __init__(self, job: Job) -> None:
        error = job.error or {}
        super().__init__(
            f"job {job.id} {job.status}" + (f": {error.get('code')}: {error.get('message')}" if error else "")
        )
        self.job = job


class Job:
    """The job resource (``GET /v1/jobs/{id}``) with shortcuts; ``job["field"]`` reads any field."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = dict(data)

    def __getitem__(self, name: str) -> Any:
        return self.data[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.data.get(name, default)

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def status(self) -> str:
        return self.data["status"]

    @property
    def done(self) -> bool:
        """Whether the job has ended (succeeded, failed or canceled)."""
        return self.status in TERMINAL

    @property
    def progress(self) -> dict[str, Any] | None:
        return self.data.get("progress")

    @property
    def error(self) -> dict[str, Any] | None:
        return self.data.get("error")

    @property
    def image_urls(self) -> list[str]:
        return [image["url"] for image in self.data.get("images", [])]

    @property
    def preview_url(self) -> str | None:
        return self.data.get("preview_url")

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, status={self.status!r})"


@dataclass(frozen=True)
class Event:
    """One server-sent event of a job: ``queued``, ``running``, ``progress``, ``preview``, then one of
    ``succeeded``, ``failed``, ``canceled`` (or ``deleted``). ``id`` resumes the stream after it."""

    type: str
    data: Any
    id: str | None = None

    @property
    def is_final(self) -> bool:
        return self.type in FINAL_EVENTS


@dataclass
class Generation:
    """What ``generate`` made: the finished job and its PNGs (bytes), in order."""

    job: Job
    images: list[bytes] = field(default_factory=list)


JobRef = Job | str


def _job_id(job: JobRef) -> str:
    return job.id if isinstance(job, Job) else job


def _base_url(url: str | None) -> str:
    url = (url or os.environ.get("DIFFQ_URL") or DEFAULT_URL).rstrip("/")
    return url.removesuffix("/v1")


def _headers(headers: Mapping[str, str] | None, api_key: str | None) -> dict[str, str]:
    """``headers``, with ``Authorization: Bearer`` for ``api_key`` (default: ``$DIFFQ_API_KEY``, if set)."""
    api_key = api_key or os.environ.get("DIFFQ_API_KEY")
    return {**({"Authorization": f"Bearer {api_key}"} if api_key else {}), **(headers or {})}


def _request_body(params: Mapping[str, Any]) -> dict[str, Any]:
    """httpx keyword arguments for ``POST /v1/jobs``: JSON, or multipart when a file is uploaded."""
    params = {name: value for name, value in params.items() if value is not None}
    files: dict[str, tuple[str, bytes, str]] = {}
    for name in ("image", "mask"):
        value = params.get(name)
        if isinstance(value, os.PathLike):
            files[name] = (Path(value).name, Path(value).read_bytes(), "application/octet-stream")
        elif isinstance(value, bytes | bytearray):
            files[name] = (f"{name}.png", bytes(value), "application/octet-stream")
    if not files:
        return {"json": params}
    data = {}
    for name, value in params.items():
        if name in files:
            continue
        if isinstance(value, bool):
            data[name] = "true" if value else "false"
        elif isinstance(value, dict | list):
            data[name] = json.dumps(value)
        else:
            data[name] = str(value)
    return {"data": data, "files": files}


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    raise APIError(
        response.status_code,
        str(body.get("code", "http_error")),
        str(body.get("message", response.text[:500] or response.reason_phrase)),
        body.get("fields"),
    )


def _no_image_yet(response: httpx.Response) -> bool:
    """A 404 that means "the job exists, its image does not (yet)"."""
    if response.status_code != 404:
        return False
    try:
        return response.json().get("code") == "image_not_found"
    except ValueError:
        return False


class _SSEParser:
    """Server-sent events from lines, per the WHATWG parsing rules (comments and retry ignored)."""

    def __init__(self) -> None:
        self._type = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> Event | None:
        if line == "":
            if not self._data:
                self._type = ""
                return None
            raw = "\n".join(self._data)
            try:
                data = json.loads(raw)
            except ValueError:
                data = raw
            event = Event(type=self._type or "message", data=data, id=self._id)
            self._type, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value or None
        return None


class Client(BatchMethods):
    """Synchronous client (with the batch methods of ``diffq.app.client_batches``). ``base_url``
    defaults to ``$DIFFQ_URL`` or ``http://127.0.0.1:8000``, ``api_key`` (sent as
    ``Authorization: Bearer``) to ``$DIFFQ_API_KEY``."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        self.base_url = _base_url(base_url)
        self.timeout = timeout
        self.http = httpx.Client(
            base_url=self.base_url, timeout=timeout, headers=_headers(headers, api_key), transport=transport
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, *, idempotency_key: str | None = None, **params: Any) -> Job:
        """``POST /v1/jobs`` with the given fields (``prompt`` required); the queued job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return Job(_check(self.http.post("/v1/jobs", headers=headers, **_request_body(params))).json())

    def get(self, job: JobRef) -> Job:
        return Job(_check(self.http.get(f"/v1/jobs/{_job_id(job)}")).json())

    def wait(self, job: JobRef, timeout: float | None = None) -> Job:
        """Long-poll until the job ends; ``WaitTimeout`` after ``timeout`` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        current = job if isinstance(job, Job) else self.get(job)
        while not current.done:
            remaining = MAX_WAIT if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(current, timeout or 0)
            wait = min(remaining, MAX_WAIT)
            response = self.http.get(
                f"/v1/jobs/{current.id}", params={"wait": f"{wait:.3f}"}, timeout=wait + self.timeout
            )
            current = Job(_check(response).json())
        return current

    def events(
        self, job: JobRef, last_event_id: str | None = None, *, timeout: float | None = None, reconnect: bool = True
    ) -> Iterator[Event]:
        """The job's server-sent events from the start (or after ``last_event_id``), until its final
        one. A dropped connection is resumed with ``Last-Event-ID`` (up to 5 times in a row);
        ``WaitTimeout`` after ``timeout`` seconds."""
        job_id = _job_id(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            read = (
                STREAM_READ_TIMEOUT
                if deadline is None
                else max(0.1, min(STREAM_READ_TIMEOUT, deadline - time.monotonic()))
            )
            try:
                with self.http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(self.timeout, read=read)
                ) as response:
                    if not response.is_success:
                        response.read()
                        _check(response)
                    parser = _SSEParser()
                    for line in response.iter_lines():
                        event = parser.feed(line)
                        if event is None:
                            continue
                        failures = 0
                        if event.id:
                            last_event_id = event.id
                        yield event
                        if event.is_final:
                            return
                        if deadline is not None and time.monotonic() > deadline:
                            raise WaitTimeout(self.get(job_id), timeout or 0)
            except httpx.TransportError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(self.get(job_id), timeout or 0) from None
                failures += 1
                if not reconnect or failures > RECONNECTS:
                    raise
                time.sleep(min(0.2 * 2**failures, 3.0))
                continue
            if not reconnect:
                return
            # The server closed the stream before a final event: resume after the last one.

    def cancel(self, job: JobRef) -> Job:
        """Cancel: a queued job never runs; a running one ends ``canceled`` within a step."""
        return Job(_check(self.http.post(f"/v1/jobs/{_job_id(job)}/cancel")).json())

    def delete(self, job: JobRef) -> None:
        _check(self.http.delete(f"/v1/jobs/{_job_id(job)}"))

    def jobs(self, limit: int = 20) -> list[Job]:
        """The newest jobs, newest first (the API must have ``DIFFQ_JOB_LISTING`` on)."""
        return [Job(data) for data in _check(self.http.get("/v1/jobs", params={"limit": limit})).json()["jobs"]]

    def models(self) -> list[dict[str, Any]]:
        return _check(self.http.get("/v1/models")).json()["models"]

    def download(self, url: str | Mapping[str, Any]) -> bytes:
        """The bytes at an image URL (absolute, or a path on the API), or of an image object ``{"url"}``."""
        target = url["url"] if isinstance(url, Mapping) else url
        return _check(self.http.get(target)).content

    def preview(self, job: JobRef) -> bytes | None:
        """The latest preview PNG, or None while there is none."""
        response = self.http.get(f"/v1/jobs/{_job_id(job)}/preview.png")
        return None if _no_image_yet(response) else _check(response).content

    def generate(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[Event], None] | None = None,
        **params: Any,
    ) -> Generation:
        """Submit, wait (watching the events if ``on_event`` is given), download the images.
        Raises ``JobFailed`` if the job failed or was canceled, ``WaitTimeout`` after ``timeout`` s."""
        job = self.submit(prompt=prompt, **params)
        if on_event is None:
            job = self.wait(job, timeout)
        else:
            for event in self.events(job, timeout=timeout):
                on_event(event)
            job = self.get(job)
        if job.status != "succeeded":
            raise JobFailed(job)
        return Generation(job=job, images=[self.download(url) for url in job.image_urls])


class AsyncClient:
    """asyncio client: the same methods as ``Client``, awaited (``events`` is an async iterator)."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        self.base_url = _base_url(base_url)
        self.timeout = timeout
        self.http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers=_headers(headers, api_key), transport=transport
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def submit(self, *, idempotency_key: str | None = None, **params: Any) -> Job:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return Job(_check(await self.http.post("/v1/jobs", headers=headers, **_request_body(params))).json())

    async def get(self, job: JobRef) -> Job:
        return Job(_check(await self.http.get(f"/v1/jobs/{_job_id(job)}")).json())

    async def wait(self, job: JobRef, timeout: float | None = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        current = job if isinstance(job, Job) else await self.get(job)
        while not current.done:
            remaining = MAX_WAIT if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(current, timeout or 0)
            wait = min(remaining, MAX_WAIT)
            response = await self.http.get(
                f"/v1/jobs/{current.id}", params={"wait": f"{wait:.3f}"}, timeout=wait + self.timeout
            )
            current = Job(_check(response).json())
        return current

    async def events(
        self, job: JobRef, last_event_id: str | None = None, *, timeout: float | None = None, reconnect: bool = True
    ) -> AsyncIterator[Event]:
        import asyncio

        job_id = _job_id(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            read = (
                STREAM_READ_TIMEOUT
                if deadline is None
                else max(0.1, min(STREAM_READ_TIMEOUT, deadline - time.monotonic()))
            )
            try:
                async with self.http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(self.timeout, read=read)
                ) as response:
                    if not response.is_success:
                        await response.aread()
                        _check(response)
                    parser = _SSEParser()
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if event is None:
                            continue
                        failures = 0
                        if event.id:
                            last_event_id = event.id
                        yield event
                        if event.is_final:
                            return
                        if deadline is not None and time.monotonic() > deadline:
                            raise WaitTimeout(await self.get(job_id), timeout or 0)
            except httpx.TransportError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(await self.get(job_id), timeout or 0) from None
                failures += 1
                if not reconnect or failures > RECONNECTS:
                    raise
                await asyncio.sleep(min(0.2 * 2**failures, 3.0))
                continue
            if not reconnect:
                return

    async def cancel(self, job: JobRef) -> Job:
        return Job(_check(await self.http.post(f"/v1/jobs/{_job_id(job)}/cancel")).json())

    async def delete(self, job: JobRef) -> None:
        _check(await self.http.delete(f"/v1/jobs/{_job_id(job)}"))

    async def jobs(self, limit: int = 20) -> list[Job]:
        response = await self.http.get("/v1/jobs", params={"limit": limit})
        return [Job(data) for data in _check(response).json()["jobs"]]

    async def models(self) -> list[dict[str, Any]]:
        return _check(await self.http.get("/v1/models")).json()["models"]

    async def download(self, url: str | Mapping[str, Any]) -> bytes:
        target = url["url"] if isinstance(url, Mapping) else url
        return _check(await self.http.get(target)).content

    async def preview(self, job: JobRef) -> bytes | None:
        response = await self.http.get(f"/v1/jobs/{_job_id(job)}/preview.png")
        return None if _no_image_yet(response) else _check(response).content

    async def generate(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[Event], Any] | None = None,
        **params: Any,
    ) -> Generation:
        job = await self.submit(prompt=prompt, **params)
        if on_event is None:
            job = await self.wait(job, timeout)
        else:
            async for event in self.events(job, timeout=timeout):
                result = on_event(event)
                if hasattr(result, "__await__"):
                    await result
            job = await self.get(job)
        if job.status != "succeeded":
            raise JobFailed(job)
        return Generation(job=job, images=[await self.download(url) for url in job.image_urls])
