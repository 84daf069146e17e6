"""The client commands of ``diffq``: ``generate``, ``jobs`` and ``cancel``, against a running API.

They use ``diffq.app.client`` (httpx) and tqdm for the progress bar; nothing of the server.
The API's URL: ``--url``, else ``DIFFQ_URL``, else ``http://DIFFQ_HOST:DIFFQ_PORT``.
The API key (when the API has keys on): ``DIFFQ_API_KEY``, sent as ``Authorization: Bearer``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import httpx

from diffq.app.client import APIError, Client, Job, WaitTimeout

EXIT_FAILED = 1  # the job failed or was canceled, or the API refused the request
EXIT_UNREACHABLE = 2
EXIT_INTERRUPTED = 130


class ApiAddress(Protocol):
    """Where the API is: the fields of ``diffq.app.settings.Settings`` these commands read, so that they
    run with the client's dependencies alone (``pip install diffq[client]``: httpx and tqdm)."""

    @property
    def url(self) -> str | None: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...


@dataclass(frozen=True)
class EnvironmentAddress:
    """``ApiAddress`` read from the environment as ``diffq.app.settings.Settings`` reads it, for an
    install without the server's part."""

    url: str | None
    host: str
    port: int

    @classmethod
    def read(cls) -> EnvironmentAddress:
        port = os.environ.get("DIFFQ_PORT", "8000")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise SystemExit(f"diffq: DIFFQ_PORT must be a port number (1-65535), got {port!r}")
        return cls(os.environ.get("DIFFQ_URL") or None, os.environ.get("DIFFQ_HOST", "127.0.0.1"), int(port))


def api_url(args: argparse.Namespace, settings: ApiAddress) -> str:
    if getattr(args, "url", None):
        return args.url
    if settings.url:
        return settings.url
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{settings.port}"


def add_commands(commands: Any, run_generate: Any, run_jobs: Any, run_cancel: Any) -> None:
    """The subcommands' options (``diffq.app.cli`` wires each to its ``run_*``)."""
    generate = commands.add_parser(
        "generate", help="make an image with a running API: live progress, then the PNG(s) written to -o"
    )
    generate.add_argument("prompt", help='what to draw, e.g. "a red circle, blue background"')
    generate.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("image.png"),
        help="PNG to write (default image.png); with --n > 1: NAME-0.png, NAME-1.png, ...",
    )
    generate.add_argument("--n", "--num-images", dest="num_images", type=int, help="images to make (default 1)")
    generate.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    generate.add_argument("--seed", type=int, help="seed of image 0 (default: random, printed)")
    generate.add_argument("--size", help="WIDTHxHEIGHT, e.g. 64x64 (default: the model's)")
    generate.add_argument("--negative", dest="negative_prompt", help="negative prompt")
    generate.add_argument("--guidance", dest="guidance_scale", type=float, help="guidance scale")
    generate.add_argument("--scheduler", help="scheduler name (GET /v1/models lists them)")
    generate.add_argument("--model", help="served model name (default: the deployment's)")
    generate.add_argument("--image", type=Path, help="input image for img2img, inpaint or outpaint")
    generate.add_argument("--mask", help='inpainting mask file (white = repaint), or "alpha"')
    generate.add_argument("--mode", choices=["txt2img", "img2img", "inpaint", "outpaint"], help="editing mode")
    generate.add_argument("--strength", type=float, help="0 < strength <= 1: how much of the input is re-noised")
    generate.add_argument("--timeout", type=float, help="give up waiting after this many seconds (the job goes on)")
    generate.add_argument("--no-progress", action="store_true", help="no progress bar")
    generate.add_argument("--url", help="API base URL (default: DIFFQ_URL, else http://DIFFQ_HOST:DIFFQ_PORT)")
    generate.set_defaults(run=run_generate)

    jobs = commands.add_parser("jobs", help="list the newest jobs (the API needs DIFFQ_JOB_LISTING on)")
    jobs.add_argument("--limit", type=int, default=20, help="how many (default 20, at most 100)")
    jobs.add_argument("--json", action="store_true", help="print the job resources as JSON")
    jobs.add_argument("--url", help="API base URL")
    jobs.set_defaults(run=run_jobs)

    cancel = commands.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id", help="the job's id")
    cancel.add_argument("--url", help="API base URL")
    cancel.set_defaults(run=run_cancel)


def _params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {
        name: getattr(args, name)
        for name in (
            "num_images",
            "steps",
            "seed",
            "negative_prompt",
            "guidance_scale",
            "scheduler",
            "model",
            "mode",
            "strength",
        )
    }
    if args.size:
        width, sep, height = args.size.lower().partition("x")
        if not sep or not width.isdigit() or not height.isdigit():
            raise SystemExit(f"diffq generate: --size must be WIDTHxHEIGHT, e.g. 64x64, not {args.size!r}")
        params["width"], params["height"] = int(width), int(height)
    if args.image is not None:
        params["image"] = args.image
    if args.mask is not None:
        params["mask"] = args.mask if args.mask == "alpha" else Path(args.mask)
    return params


def _outputs(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix or '.png'}") for index in range(count)]


class _Progress:
    """A tqdm bar fed by the job's events (or nothing, with --no-progress)."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=None,
                unit="step",
                desc="queued",
                file=sys.stderr,
                dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]",
            )

    def update(self, event_type: str, data: Any) -> None:
        if self.bar is None:
            return
        if event_type == "progress" and isinstance(data, dict):
            if self.bar.total != data.get("total"):
                self.bar.total = data.get("total")
                self.bar.set_description_str("running")
            self.bar.n = data.get("step", self.bar.n)
            self.bar.refresh()
        elif event_type in ("queued", "running", "succeeded", "failed", "canceled"):
            if event_type == "succeeded" and self.bar.total:
                self.bar.n = self.bar.total
            self.bar.set_description_str(event_type)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def generate(args: argparse.Namespace, settings: ApiAddress) -> int:
    params = _params(args)
    with Client(api_url(args, settings)) as client:
        try:
            job = client.submit(prompt=args.prompt, **params)
        except APIError as error:
            return _refused("generate", error)
        except httpx.TransportError as error:
            return _unreachable(client.base_url, error)
        print(f"diffq: job {job.id} queued (seed {job['request']['seed']})", file=sys.stderr, flush=True)
        progress = _Progress(not args.no_progress)
        try:
            for event in client.events(job, timeout=args.timeout):
                progress.update(event.type, event.data)
            job = client.get(job)
        except KeyboardInterrupt:
            progress.close()
            try:
                client.cancel(job)
                print(f"diffq: interrupted; job {job.id} canceled", file=sys.stderr)
            except (APIError, httpx.HTTPError):
                print(f"diffq: interrupted; job {job.id} may still run", file=sys.stderr)
            return EXIT_INTERRUPTED
        except APIError as error:
            progress.close()
            return _refused("generate", error)
        except WaitTimeout as timeout:
            progress.close()
            print(f"diffq: {timeout}; it goes on: {client.base_url}/v1/jobs/{job.id}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            progress.close()
        if job.status != "succeeded":
            failure = job.error or {}
            print(
                f"diffq: job {job.id} {job.status}"
                + (f": {failure.get('code')}: {failure.get('message')}" if failure else ""),
                file=sys.stderr,
            )
            return EXIT_FAILED
        paths = _outputs(args.output, len(job.image_urls))
        for path, url in zip(paths, job.image_urls, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(client.download(url))
            print(path)
        return 0


def list_jobs(args: argparse.Namespace, settings: ApiAddress) -> int:
    with Client(api_url(args, settings)) as client:
        try:
            jobs = client.jobs(args.limit)
        except APIError as error:
            return _refused("jobs", error)
        except httpx.TransportError as error:
            return _unreachable(client.base_url, error)
    if args.json:
        print(json.dumps([job.data for job in jobs], indent=2))
        return 0
    print(f"{'ID':32}  {'STATUS':9}  {'MODEL':12}  {'CREATED':19}  {'PROGRESS':8}  PROMPT")
    for job in jobs:
        print(_row(job))
    return 0


def _row(job: Job) -> str:
    created = datetime.fromisoformat(job["timings"]["created_at"]).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    progress = job.progress
    done = f"{progress['step']}/{progress['total']}" if progress else ("-" if not job.done else "")
    if job.status == "succeeded":
        done = f"{len(job.image_urls)} img"
    prompt = job["request"]["prompt"].replace("\n", " ")
    prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    return f"{job.id:32}  {job.status:9}  {job['model'][:12]:12}  {created:19}  {done:8}  {prompt}"


def cancel(args: argparse.Namespace, settings: ApiAddress) -> int:
    with Client(api_url(args, settings)) as client:
        try:
            job = client.cancel(args.job_id)
        except APIError as error:
            return _refused("cancel", error)
        except httpx.TransportError as error:
            return _unreachable(client.base_url, error)
    if job.status == "canceled":
        print(f"job {job.id} canceled")
    else:
        print(f"job {job.id} {job.status}: cancel requested, it stops within one denoising step")
    return 0


def _refused(command: str, error: APIError) -> int:
    print(f"diffq {command}: {error.status} {error.code}: {error.message}", file=sys.stderr)
    return EXIT_FAILED


def _unreachable(url: str, error: Exception) -> int:
    print(f"diffq: cannot reach the API at {url}: {error}", file=sys.stderr)
    return EXIT_UNREACHABLE
