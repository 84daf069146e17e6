"""The batch half of the Python client (``diffq.app.client.Client`` has these methods)::

    with Client() as diffq:
        batch = diffq.submit_batch(file=Path("products.csv"), prompt_template="a {colour} mug, {bg} background")
        batch = diffq.wait_batch(batch["id"], on_progress=lambda b: print(b["progress"]))
        for line in diffq.batch_results(batch["id"]):      # custom_id, status, images, seeds, error
            print(line["custom_id"], line["status"])
        diffq.download_batch(batch["id"], Path("images"))  # a folder, resumable; or Path("all.zip")

Only httpx, like the rest of the client.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

#: Batch statuses after which nothing changes.
BATCH_DONE = frozenset({"completed", "canceled"})


class BatchMethods:
    """``/v1/batches`` for ``Client``: it provides ``http`` and the error check."""

    http: httpx.Client

    def submit_batch(
        self,
        items: list[Mapping[str, Any]] | None = None,
        *,
        file: Path | None = None,
        prompt_template: str | None = None,
        rows: list[Mapping[str, Any]] | None = None,
        defaults: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Path | bytes] | None = None,
        webhook: Mapping[str, Any] | None = None,
        priority: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/batches``: ``items`` (job requests with ``custom_id``), or ``file`` (JSONL; CSV
        or a JSON list of rows with ``prompt_template``), or ``prompt_template`` with ``rows``.
        ``inputs``: shared images by name, uploaded once (items say ``"image": "input:<name>"``)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        options = {"defaults": defaults, "webhook": webhook, "priority": priority}
        if file is None and not inputs:
            body = {"items": items, "prompt_template": prompt_template, "rows": rows, **options}
            response = self.http.post(
                "/v1/batches", json={k: v for k, v in body.items() if v is not None}, headers=headers
            )
            return self._checked(response).json()
        data = {
            k: v if isinstance(v, str) else json.dumps(v)
            for k, v in {"prompt_template": prompt_template, **options}.items()
            if v is not None
        }
        files: dict[str, tuple[str, bytes]] = {}
        if file is not None:
            files["file"] = (file.name, file.read_bytes())
        else:  # items or rows, as a file part, next to the shared inputs
            lines = items if items is not None else rows or []
            name = "items.jsonl" if items is not None else "rows.json"
            payload = "\n".join(json.dumps(i) for i in lines) if items is not None else json.dumps(lines)
            files["file"] = (name, payload.encode())
        for name, value in (inputs or {}).items():
            files[name] = (value.name, value.read_bytes()) if isinstance(value, Path) else (name, value)
        return self._checked(self.http.post("/v1/batches", data=data, files=files, headers=headers)).json()

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._checked(self.http.get(f"/v1/batches/{batch_id}")).json()

    def batches(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._checked(self.http.get("/v1/batches", params={"limit": limit})).json()["batches"]

    def batch_items(self, batch_id: str, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        params = {"offset": offset, "limit": limit}
        return self._checked(self.http.get(f"/v1/batches/{batch_id}/items", params=params)).json()

    def batch_results(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """results.jsonl, a line at a time, as it streams."""
        with self.http.stream("GET", f"/v1/batches/{batch_id}/results.jsonl") as response:
            self._checked(response)
            for line in response.iter_lines():
                if line.strip():
                    yield json.loads(line)

    def wait_batch(
        self,
        batch_id: str,
        timeout: float | None = None,
        interval: float = 1.0,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until every item has ended; ``TimeoutError`` after ``timeout`` seconds (the batch goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.batch(batch_id)
            if on_progress is not None:
                on_progress(batch)
            if batch["status"] in BATCH_DONE:
                return batch
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} still {batch['status']} after {timeout} s")
            time.sleep(interval)

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._checked(self.http.post(f"/v1/batches/{batch_id}/cancel")).json()

    def delete_batch(self, batch_id: str) -> None:
        self._checked(self.http.delete(f"/v1/batches/{batch_id}"))

    def download_batch(self, batch_id: str, target: Path) -> list[Path]:
        """The succeeded items' images: into the folder ``target`` as ``<custom_id>.<ext>``, skipping
        files already there (so an interrupted download resumes), or, when ``target`` ends in
        ``.zip``, as the archive (streamed to ``<target>.part``, renamed when complete)."""
        if target.suffix == ".zip":
            part = target.with_name(target.name + ".part")
            with self.http.stream("GET", f"/v1/batches/{batch_id}/images.zip") as response, part.open("wb") as out:
                self._checked(response)
                for chunk in response.iter_bytes():
                    out.write(chunk)
            part.replace(target)
            return [target]
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for line in self.batch_results(batch_id):
            if line["status"] != "succeeded":
                continue
            for n, url in enumerate(line["images"]):
                suffix = f"-{n}" if len(line["images"]) > 1 else ""
                path = target / f"{line['custom_id']}{suffix}{_extension(url)}"
                if not path.exists():
                    part = path.with_name(path.name + ".part")
                    part.write_bytes(self._checked(self.http.get(url)).content)
                    part.replace(path)
                written.append(path)
        return written

    def _checked(self, response: httpx.Response) -> httpx.Response:
        from diffq.app.client import _check  # one place that turns an error answer into APIError

        if response.status_code >= 400:
            response.read()  # a streamed answer's error body
        return _check(response)


def _extension(url: str) -> str:
    name = url.split("?", 1)[0].rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[1] if "." in name else ".png"
